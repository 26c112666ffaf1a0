//! The plugin registry: every plugin crate registers its factories here with
//! [`register!`]; a [`Registry`] collects them (rejecting a name registered
//! twice), looks them up by kind and name, and [`assemble`]s a model and its
//! objectives from a layered [`config`].
//!
//! Only this crate collects `inventory` entries (ARCHITECTURE.md).

pub mod assemble;
pub mod check;
pub mod config;
pub mod dynamic;
pub mod hooks;
pub mod registration;
pub mod samplers;
pub mod weights;

pub use assemble::{
    assemble, assemble_model, Assembly, MaskedLm, MaskedLmLoader, ModelEnv, WeightedObjective,
};
pub use config::{Config, ConfigLayers, LoadedConfig, PluginSection};
pub use registration::{
    BuildContext, Factory, HeadSpec, Kind, Registration, Registry, RegistryError,
};
pub use samplers::{run_sampler, standalone_sampler};

#[doc(hidden)]
pub use inventory;

/// Register a plugin factory under a kind and a name:
///
/// ```text
/// vlmatch_registry::register!(encoder "vit" => build);
/// ```
///
/// where `build: fn(&BuildContext) -> vlmatch_core::Result<Rc<dyn Encoder>>`
/// (`Box<dyn ...>` for negative samplers and objectives; `Option<Box<dyn
/// Hook>>` for hooks, `None` when the run leaves the hook off;
/// `fn(&HeadSpec) -> Result<Box<dyn Head>>` for heads). Kinds: `encoder`,
/// `generator`, `discriminator`, `negative_sampler`, `objective`, `hook`,
/// `head`. The crate
/// name is recorded as the plugin's origin. An encoder or generator that
/// loads HuggingFace checkpoints also registers its
/// [`weights::CheckpointLayout`]:
///
/// ```text
/// vlmatch_registry::register!(encoder "bert" => build, layout = &BertLayout);
/// ```
#[macro_export]
macro_rules! register {
    (encoder $name:literal => $f:expr, layout = $layout:expr) => {
        $crate::register!(@submit Encoder $name $f, Some($layout));
    };
    (generator $name:literal => $f:expr, layout = $layout:expr) => {
        $crate::register!(@submit Generator $name $f, Some($layout));
    };
    (encoder $name:literal => $f:expr) => {
        $crate::register!(@submit Encoder $name $f);
    };
    (generator $name:literal => $f:expr) => {
        $crate::register!(@submit Generator $name $f);
    };
    (discriminator $name:literal => $f:expr) => {
        $crate::register!(@submit Discriminator $name $f);
    };
    (negative_sampler $name:literal => $f:expr) => {
        $crate::register!(@submit NegativeSampler $name $f);
    };
    (objective $name:literal => $f:expr) => {
        $crate::register!(@submit Objective $name $f);
    };
    (hook $name:literal => $f:expr) => {
        $crate::register!(@submit Hook $name $f);
    };
    (head $name:literal => $f:expr) => {
        $crate::register!(@submit Head $name $f);
    };
    (@submit $variant:ident $name:literal $f:expr) => {
        $crate::register!(@submit $variant $name $f, None);
    };
    (@submit $variant:ident $name:literal $f:expr, $layout:expr) => {
        $crate::inventory::submit! {
            $crate::Registration {
                name: $name,
                origin: env!("CARGO_PKG_NAME"),
                factory: $crate::Factory::$variant($f),
                layout: $layout,
            }
        }
    };
}
