use crate::BuildContext;
use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use vlmatch_core::{
    Discriminator, Encoder, Generator, Head, Hook, NegativeSampler, Objective, Result,
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
pub type HookFactory = fn(&crate::hooks::HookContext<'_>) -> Result<Option<Box<dyn Hook>>>;

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
    DynamicSampler(&'static crate::dynamic::DynamicSampler),
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

impl Registry {
    /// Build head `name` (the error lists the registered heads).
    pub fn head(&self, name: &str, spec: &HeadSpec<'_>) -> Result<Box<dyn Head>> {
        let entry = self.get(Kind::Head, name, "head")?;
        match entry.factory {
            Factory::Head(build) => build(spec),
            _ => unreachable!("an entry of kind head has a head factory"),
        }
    }
}

/// One registered plugin. Submitted with [`crate::register!`].
pub struct Registration {
    pub name: &'static str,
    /// Where the plugin came from: the registering crate's name.
    pub origin: &'static str,
    pub factory: Factory,
    /// How the plugin loads and exports HuggingFace checkpoints, if it does
    /// (`register!(encoder "bert" => build, layout = &LAYOUT)`).
    pub layout: Option<&'static dyn crate::weights::CheckpointLayout>,
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
    pub(crate) layouts: BTreeMap<(Kind, String), &'static dyn crate::weights::CheckpointLayout>,
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
}
