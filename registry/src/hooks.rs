//! The run's hooks ([`vlmatch_core::Hook`]): which registered hooks a run
//! turns on, built in the order they run.
//!
//! A hook is on when the config has a `[hooks.NAME]` section (unless it
//! says `enabled = false`), or when the hook's factory finds its own switch
//! on ([`HookContext::enabled`]: `[momentum] enabled`, `train.tensorboard`,
//! `eval.every`, a command-line flag the host passes in
//! [`HookContext::host`]). A `[hooks.NAME]` naming no registered hook is an
//! error listing the registered ones.

use crate::assemble::{Assembly, ModelEnv};
use crate::config::{HookSection, LoadedConfig};
use std::any::Any;
use std::path::Path;
use vlmatch_core::Result;

mod build;
pub use build::{build_hooks, BuiltHook};

/// What a hook factory gets: the run's config, model, layout and the
/// host's resources (in a plugin library: the config and layout only).
pub struct HookContext<'a> {
    /// The hook's registered name (its config section is `hooks.<name>`).
    pub name: &'a str,
    pub loaded: &'a LoadedConfig,
    /// The model and what it was built with: `None` for a hook in a plugin
    /// library, which does not see them ([`HookContext::model`]).
    pub asm: Option<&'a Assembly>,
    pub env: Option<&'a ModelEnv>,
    pub rank: usize,
    pub world: usize,
    /// One epoch in optimizer steps; `None` for a stream of shards.
    pub epoch_steps: Option<i64>,
    /// The run directory (rank 0 writes it).
    pub run_dir: &'a Path,
    /// What the host crate offers its own hooks (the `vlmatch` trainer's
    /// resources); other hooks ignore it.
    pub host: &'a dyn Any,
}

impl<'a> HookContext<'a> {
    /// This hook's `[hooks.NAME]` section, if the config has one.
    pub fn section(&self) -> Option<&HookSection> {
        self.loaded.config.hooks.get(self.name)
    }

    /// Whether the run turns this hook on: its `[hooks.NAME]` section's
    /// `enabled` (default true), else `switch`, the hook's own key or flag.
    pub fn enabled(&self, switch: bool) -> bool {
        match self.section() {
            Some(s) => s.enabled.unwrap_or(true),
            None => switch,
        }
    }

    /// The hook's own keys in `[hooks.NAME]` as `T` (without `enabled` and
    /// `priority`); an absent section gives `T`'s defaults.
    pub fn params<T: serde::de::DeserializeOwned + Default>(&self) -> Result<T> {
        if self.section().is_none() {
            return Ok(T::default());
        }
        crate::config::section_of(
            &self.loaded.figment,
            Some(&self.loaded.stale),
            &format!("hooks.{}", self.name),
        )
    }

    /// The model and its environment, or an error saying that this hook
    /// needs them and, in a plugin library, cannot see them.
    pub fn model(&self) -> Result<(&'a Assembly, &'a ModelEnv)> {
        match (self.asm, self.env) {
            (Some(a), Some(e)) => Ok((a, e)),
            _ => Err(vlmatch_core::Error::plugin(
                self.name,
                "this hook needs the model, which a hook in a plugin library does not see \
                 (plugin ABI 5); link it statically",
            )),
        }
    }

    /// The host's resources as `T`, when the host offers them.
    pub fn host<T: 'static>(&self) -> Option<&T> {
        self.host.downcast_ref::<T>()
    }
}
