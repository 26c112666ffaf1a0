//! The vlmatch plugin SDK: write a plugin once against the traits of
//! `vlmatch-core` (`Encoder`, `Objective`, `NegativeSampler`, `Generator`,
//! `Discriminator`, `Hook`), register it with
//! [`register!`], and call [`export!`] once in the crate. The same source
//! then works both ways:
//!
//! - statically: a binary that links the crate (`use my_plugin as _;`) finds
//!   its plugins through `inventory`, as vlmatch's own;
//! - dynamically: built as a `cdylib`, it is a plugin library that any
//!   vlmatch of the same versions loads with `--plugin PATH`; its plugins
//!   are picked by name in the config.
//!
//! ```text
//! use vlmatch_plugin_sdk::{register, export, BuildContext};
//! register!(encoder "conv_stem" => build_stem);
//! register!(objective "sigmoid_pairs" => build_loss);
//! export!();
//! ```
//!
//! The C side (the plugin table, tensor handles, JSON configs, caught
//! panics, the version handshake) is `vlmatch_registry::dynamic`; nothing
//! of it shows in a plugin's source. What a plugin in a library can and
//! cannot reach is listed in PLUGINS.md ("Dynamic plugins").

pub use tch;
pub use vlmatch_core as core;
pub use vlmatch_registry as registry;
pub use vlmatch_registry::dynamic::TextSampler;
pub use vlmatch_registry::{register, BuildContext};

/// Export the crate's registered encoders, objectives, negative samplers,
/// generators, discriminators and hooks (and the
/// [`TextSampler`] types listed, if any) as a plugin library. Call it once
/// per crate; it defines the library's entry symbol
/// (`vlmatch_plugin_table`), unused when the crate is linked statically.
///
/// ```text
/// vlmatch_plugin_sdk::export!();
/// vlmatch_plugin_sdk::export!("color_flip" => ColorFlip);
/// ```
#[macro_export]
macro_rules! export {
    ($($name:literal => $ty:ty),* $(,)?) => {
        $crate::registry::export_dynamic_samplers!($($name => $ty),*);
    };
}
