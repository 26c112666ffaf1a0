//! What a plugin registers and what it gets back: the [`Registration`]
//! entries `register!` submits ([`Kind`], [`Factory`]), the [`Registry`]
//! that collects them (lookup by kind and name, heads, checkpoint layouts;
//! `load_library` is in `crate::dynamic::host`, which builds plugins of a
//! library through a `BuildContext`), and the
//! [`BuildContext`] a factory is called with, through which it builds
//! other plugins from the same registry.

use crate::assemble::{ModelEnv, Sections, Widths};
use crate::dynamic::sampler::{DynamicSampler, DynamicSamplerInstance, HostSampler};
use crate::hooks::HookContext;
use crate::weights::CheckpointLayout;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use tch::nn;
use vlmatch_core::{
    Discriminator, Encoder, Error, Generator, Head, Hook, Modality, NegativeSampler, Objective,
    Result, VlModel,
};

/// The seven kinds of plugin, one per core trait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Encoder,
    Generator,
    Discriminator,
    NegativeSampler,
    Objective,
    Hook,
    Head,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Encoder,
        Kind::Generator,
        Kind::Discriminator,
        Kind::NegativeSampler,
        Kind::Objective,
        Kind::Hook,
        Kind::Head,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Encoder => "encoder",
            Kind::Generator => "generator",
            Kind::Discriminator => "discriminator",
            Kind::NegativeSampler => "negative_sampler",
            Kind::Objective => "objective",
            Kind::Hook => "hook",
            Kind::Head => "head",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A hook's constructor ([`Factory::Hook`]).
pub type HookFactory = fn(&HookContext<'_>) -> Result<Option<Box<dyn Hook>>>;

/// A plugin's constructor, typed by kind.
#[derive(Clone, Copy)]
pub enum Factory {
    Encoder(fn(&BuildContext<'_>) -> Result<Rc<dyn Encoder>>),
    Generator(fn(&BuildContext<'_>) -> Result<Rc<dyn Generator>>),
    Discriminator(fn(&BuildContext<'_>) -> Result<Rc<dyn Discriminator>>),
    NegativeSampler(fn(&BuildContext<'_>) -> Result<Box<dyn NegativeSampler>>),
    Objective(fn(&BuildContext<'_>) -> Result<Box<dyn Objective>>),
    /// A trainer hook; `None` when the run does not turn it on
    /// ([`crate::hooks::HookContext::enabled`]).
    Hook(HookFactory),
    /// A downstream task's head ([`HeadSpec`]).
    Head(fn(&HeadSpec<'_>) -> Result<Box<dyn Head>>),
    /// A negative sampler from a dynamic plugin library.
    DynamicSampler(&'static DynamicSampler),
}

impl Factory {
    pub fn kind(&self) -> Kind {
        match self {
            Factory::Encoder(_) => Kind::Encoder,
            Factory::Generator(_) => Kind::Generator,
            Factory::Discriminator(_) => Kind::Discriminator,
            Factory::NegativeSampler(_) | Factory::DynamicSampler(_) => Kind::NegativeSampler,
            Factory::Objective(_) => Kind::Objective,
            Factory::Hook(_) => Kind::Hook,
            Factory::Head(_) => Kind::Head,
        }
    }
}

/// What a head factory gets: where its parameters go, the width of the
/// `[CLS]` states it reads, how many outputs the task has, and the compute
/// dtype of its matmuls.
pub struct HeadSpec<'a> {
    pub path: tch::nn::Path<'a>,
    pub width: i64,
    pub outputs: i64,
    pub compute: tch::Kind,
}

/// One registered plugin. Submitted with [`crate::register!`].
pub struct Registration {
    pub name: &'static str,
    /// Where the plugin came from: the registering crate's name.
    pub origin: &'static str,
    pub factory: Factory,
    /// How the plugin loads and exports HuggingFace checkpoints, if it does
    /// (`register!(encoder "bert" => build, layout = &LAYOUT)`).
    pub layout: Option<&'static dyn CheckpointLayout>,
}

inventory::collect!(Registration);

#[derive(Debug)]
pub enum RegistryError {
    Duplicate {
        kind: Kind,
        name: String,
        first: String,
        second: String,
    },
}

impl fmt::Display for RegistryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RegistryError::Duplicate {
                kind,
                name,
                first,
                second,
            } => write!(
                f,
                "{kind} plugin `{name}` is registered twice (by `{first}` and by `{second}`); \
                 rename one of them"
            ),
        }
    }
}

impl std::error::Error for RegistryError {}

/// A registered plugin as the registry holds it.
#[derive(Clone)]
pub struct Entry {
    pub name: String,
    pub origin: String,
    pub factory: Factory,
}

/// All plugins linked into this process, by kind and name.
pub struct Registry {
    entries: BTreeMap<(Kind, String), Entry>,
    /// Checkpoint layouts by kind and plugin name (`crate::weights`).
    layouts: BTreeMap<(Kind, String), &'static dyn CheckpointLayout>,
}

impl Registry {
    /// Collect every [`Registration`] submitted with `inventory`. A plugin
    /// crate that nothing references is not linked and does not appear: the
    /// binary references each one (`use vlmatch_vit as _;`).
    pub fn from_inventory() -> Result<Self, RegistryError> {
        let mut registry = Registry {
            entries: BTreeMap::new(),
            layouts: BTreeMap::new(),
        };
        for r in inventory::iter::<Registration> {
            registry.insert(Entry {
                name: r.name.to_string(),
                origin: r.origin.to_string(),
                factory: r.factory,
            })?;
            if let Some(layout) = r.layout {
                registry
                    .layouts
                    .insert((r.factory.kind(), r.name.to_string()), layout);
            }
        }
        Ok(registry)
    }

    /// Add one plugin; a name already taken within its kind is an error.
    pub fn insert(&mut self, entry: Entry) -> Result<(), RegistryError> {
        let key = (entry.factory.kind(), entry.name.clone());
        if let Some(first) = self.entries.get(&key) {
            return Err(RegistryError::Duplicate {
                kind: key.0,
                name: key.1,
                first: first.origin.clone(),
                second: entry.origin,
            });
        }
        self.entries.insert(key, entry);
        Ok(())
    }

    /// Registered names of one kind, sorted.
    pub fn names(&self, kind: Kind) -> Vec<&str> {
        self.entries
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, n)| n.as_str())
            .collect()
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    /// The plugin `name` of `kind`; an unknown name is an error listing the
    /// registered names of that kind. `key` says where the name came from.
    pub fn get(&self, kind: Kind, name: &str, key: &str) -> Result<&Entry> {
        self.entries.get(&(kind, name.to_string())).ok_or_else(|| {
            let names = self.names(kind);
            let known = if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            };
            vlmatch_core::Error::Config(format!(
                "config key `{key}`: unknown {kind} plugin `{name}`; registered {kind} plugins: {known} \
                 (a plugin crate registers with `vlmatch_registry::register!` and must be linked into the binary)"
            ))
        })
    }

    /// Build head `name` (the error lists the registered heads).
    pub fn head(&self, name: &str, spec: &HeadSpec<'_>) -> Result<Box<dyn Head>> {
        let entry = self.get(Kind::Head, name, "head")?;
        match entry.factory {
            Factory::Head(build) => build(spec),
            _ => unreachable!("an entry of kind head has a head factory"),
        }
    }

    /// The checkpoint layout the plugin `name` of `kind` registered, if any.
    pub fn layout(&self, kind: Kind, name: &str) -> Option<&'static dyn CheckpointLayout> {
        self.layouts.get(&(kind, name.to_string())).copied()
    }

    /// Plugins of `kind` whose layout loads `model_type`, sorted by name.
    pub fn loading(
        &self,
        kind: Kind,
        model_type: &str,
    ) -> Vec<(&str, &'static dyn CheckpointLayout)> {
        self.layouts
            .iter()
            .filter(|((k, _), l)| *k == kind && l.model_types().contains(&model_type))
            .map(|((_, n), l)| (n.as_str(), *l))
            .collect()
    }

    /// Every `model_type` some layout of `kind` loads, sorted.
    pub fn loadable(&self, kind: Kind) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = self
            .layouts
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .flat_map(|(_, l)| l.model_types().iter().copied())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Add the checkpoint layout of plugin `name` of `kind` (a library's).
    pub fn insert_layout(&mut self, kind: Kind, name: &str, layout: &'static dyn CheckpointLayout) {
        self.layouts.insert((kind, name.to_string()), layout);
    }

    // `load_library`, which registers a dynamic library's plugins, is in
    // `crate::dynamic::host`.
}

/// What a plugin factory gets: where to put its parameters, its own config
/// section, the run facts, and access to other plugins (objectives build
/// their negative samplers through it).
pub struct BuildContext<'a> {
    /// The plugin's parameters go under this path (and so on its device).
    pub path: nn::Path<'a>,
    /// The plugin's registered name.
    pub plugin: &'a str,
    /// The dotted config key of its section (`model.image`).
    pub key: String,
    pub env: &'a ModelEnv,
    pub widths: Widths,
    registry: &'a Registry,
    config: Sections<'a>,
    /// The text encoder, once built (generators tie their decoder to its
    /// word embeddings).
    pub text_encoder: Option<Rc<dyn Encoder>>,
    /// The model, for objectives and samplers (built after it).
    pub model: Option<&'a VlModel>,
}

impl<'a> BuildContext<'a> {
    /// This plugin's config section as `T` (use `#[serde(deny_unknown_fields)]`
    /// so a typo is an error naming the key and file).
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        crate::config::section_of(self.config.figment, self.config.stale, &self.key)
    }

    /// A context for building plugin `plugin` from its section `key` in
    /// `sections`, with no widths and no model yet (set them on the result
    /// where known). Outside a run (a frozen fill model's text encoder and
    /// head, [`crate::weights::build_masked_lm`]) `sections` holds only the
    /// sections being built, and it cannot build generators or samplers of
    /// a run.
    pub(crate) fn new(
        path: nn::Path<'a>,
        plugin: &'a str,
        key: &str,
        env: &'a ModelEnv,
        registry: &'a Registry,
        sections: Sections<'a>,
        text_encoder: Option<Rc<dyn Encoder>>,
    ) -> Self {
        BuildContext {
            path,
            plugin,
            key: key.to_string(),
            env,
            widths: Widths::default(),
            registry,
            config: sections,
            text_encoder,
            model: None,
        }
    }

    /// The run's typed config, when building for a run (`None` outside
    /// one), for checks across sections: an objective that cannot run with
    /// `[momentum]` reads `momentum.enabled`.
    pub fn run_config(&self) -> Option<&'a crate::Config> {
        self.config.config
    }

    /// The host's activation checkpointing for the layer stacks of the
    /// encoder this context builds: `Some` where its section is a model
    /// role (`model.image`, `model.text`, `model.fusion`) that
    /// `train.activation_checkpointing` names, `None` otherwise; an error
    /// where it is named and the host offers no mechanism.
    pub fn checkpointer(&self) -> Result<Option<vlmatch_core::checkpoint::Checkpointer>> {
        let (Some(role), Some(config)) = (self.key.strip_prefix("model."), self.config.config)
        else {
            return Ok(None);
        };
        if !config.train.activation_checkpointing.covers(role) {
            return Ok(None);
        }
        self.env.checkpointer.map(Some).ok_or_else(|| {
            Error::Config(format!(
                "config key `train.activation_checkpointing`: checkpointing `{}` needs the \
                 host's mechanism, and this program offers none (ModelEnv::checkpointer)",
                self.key
            ))
        })
    }

    /// This plugin's config section as JSON, without the keys a lower
    /// layer set for another plugin (what a plugin in a library reads).
    pub(crate) fn section_json(&self) -> serde_json::Value {
        let mut value = self
            .config
            .figment
            .find_value(&self.key)
            .ok()
            .and_then(|v| serde_json::to_value(v).ok())
            .unwrap_or_else(|| serde_json::json!({}));
        if let (Some(stale), Some(map)) = (self.config.stale, value.as_object_mut()) {
            map.retain(|k, _| !stale.contains(&format!("{}.{k}", self.key)));
        }
        value
    }

    /// The last component of the section key: an objective's loss name.
    pub fn section_name(&self) -> &str {
        self.key.rsplit('.').next().unwrap_or(&self.key)
    }

    /// The width of states from a role, or an error saying it is missing.
    pub fn width(&self, role: &str) -> Result<i64> {
        let w = match role {
            "image" => self.widths.image,
            "text" => self.widths.text,
            "fusion" => self.widths.fusion,
            _ => None,
        };
        w.ok_or_else(|| {
            Error::plugin(
                self.plugin,
                format!("needs the {role} encoder's width, which is not built yet"),
            )
        })
    }

    /// Build an extra encoder from the plugin section at `key` (for example a
    /// separate VL-RTD generator encoder), its parameters under `path`.
    pub fn encoder(
        &self,
        key: &str,
        expected: Modality,
        path: nn::Path<'a>,
    ) -> Result<Rc<dyn Encoder>> {
        let plugin: String = self
            .config
            .figment
            .extract_inner(&format!("{key}.plugin"))
            .map_err(|e| {
                Error::Config(crate::config::describe_error(e, self.config.figment, &[]))
            })?;
        let entry = self
            .registry
            .get(Kind::Encoder, &plugin, &format!("{key}.plugin"))?;
        let Factory::Encoder(build) = entry.factory else {
            unreachable!("kind checked")
        };
        let ctx = BuildContext {
            path,
            plugin: &entry.name,
            key: key.to_string(),
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: None,
            model: None,
        };
        let enc = build(&ctx)?;
        if enc.modality() != expected {
            return Err(Error::Config(format!(
                "config key `{key}.plugin`: `{plugin}` is a {:?} encoder, expected a {expected:?} encoder",
                enc.modality()
            )));
        }
        Ok(enc)
    }

    /// Build another instance of the model's generator (`[model.generator]`)
    /// tied to `text`, its parameters under `path`.
    pub fn generator(
        &self,
        text: Rc<dyn Encoder>,
        path: nn::Path<'a>,
    ) -> Result<Rc<dyn Generator>> {
        let generator = self.config.config.and_then(|c| c.model.generator.as_ref());
        let section = generator.ok_or_else(|| {
            Error::Config(format!(
                "config key `{}`: needs `[model.generator]` (e.g. plugin = \"mlm_head\")",
                self.key
            ))
        })?;
        let entry =
            self.registry
                .get(Kind::Generator, &section.plugin, "model.generator.plugin")?;
        let Factory::Generator(build) = entry.factory else {
            unreachable!("kind checked")
        };
        let ctx = BuildContext {
            path,
            plugin: &entry.name,
            key: "model.generator".to_string(),
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: Some(text),
            model: None,
        };
        build(&ctx)
    }

    /// Build the negative sampler configured as `[samplers.<name>]`.
    pub fn negative_sampler(&self, name: &str) -> Result<Box<dyn NegativeSampler>> {
        let samplers = self.config.config.map(|c| &c.samplers);
        let section = samplers.and_then(|s| s.get(name)).ok_or_else(|| {
            let known: Vec<&String> = samplers.into_iter().flat_map(|s| s.keys()).collect();
            Error::Config(format!(
                "config key `{}`: sampler `{name}` has no `[samplers.{name}]` section (configured samplers: {known:?})",
                self.key
            ))
        })?;
        let key = format!("samplers.{name}");
        let entry = self.registry.get(
            Kind::NegativeSampler,
            &section.plugin,
            &format!("{key}.plugin"),
        )?;
        let build = match entry.factory {
            Factory::NegativeSampler(build) => build,
            Factory::DynamicSampler(spec) => {
                let json = self
                    .config
                    .figment
                    .find_value(&key)
                    .ok()
                    .and_then(|v| serde_json::to_string(&v).ok())
                    .unwrap_or_else(|| "{}".into());
                let instance = DynamicSamplerInstance::new(spec, &json, &entry.name)?;
                return Ok(Box::new(HostSampler::new(instance, self.env.text.clone())));
            }
            _ => unreachable!("kind checked"),
        };
        let ctx = BuildContext {
            path: &self.path / "samplers" / name,
            plugin: &entry.name,
            key,
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: self.text_encoder.clone(),
            model: self.model,
        };
        build(&ctx)
    }
}
