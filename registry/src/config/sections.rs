//! The typed sections of the configuration (`model`, `train`, `data`,
//! `eval`, `momentum`, `plugins`, and the plugin sections' common keys),
//! each with its defaults and the checks of its values beyond their types.

use crate::check;
use figment::value::Value;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

pub use super::choices::{DataSource, Precision, Rerank, TrainDevice};
use super::common::{at, count, yes, Checked};
use super::data::DataConfig;
use super::train::TrainConfig;

/// The whole configuration. Every key has one home and one default here or in
/// a plugin's config type.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub model: ModelConfig,
    /// Objectives by name; the section's `plugin` defaults to its name.
    #[serde(default)]
    pub objectives: BTreeMap<String, ObjectiveSection>,
    /// Negative samplers by name, referred to by objectives.
    #[serde(default)]
    pub samplers: BTreeMap<String, PluginSection>,
    pub train: TrainConfig,
    pub data: DataConfig,
    #[serde(default)]
    pub eval: EvalConfig,
    #[serde(default)]
    pub plugins: PluginsConfig,
    /// ALBEF's momentum distillation (off unless `momentum.enabled`).
    #[serde(default)]
    pub momentum: MomentumConfig,
    /// Trainer hooks by registered name (`[hooks.NAME]`): a section turns
    /// its hook on unless it says `enabled = false`. Hooks with keys of
    /// their own elsewhere (`[momentum]`, `train.tensorboard`, `eval.every`)
    /// are also turned on by those.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hooks: BTreeMap<String, HookSection>,
}

/// `[hooks.NAME]`: whether the hook runs, where it runs among the others
/// (lower first; default the hook's own priority), and its own keys.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HookSection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(flatten)]
    pub params: BTreeMap<String, Value>,
}

/// `[momentum]`: ALBEF's momentum distillation (`configs/mod.toml` turns it
/// on): an EMA copy of the encoders, the MLM head and the ITC projections,
/// ITC feature queues and soft targets (`src/momentum.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MomentumConfig {
    pub enabled: bool,
    /// EMA rate: `m = mu * m + (1 - mu) * theta` after each optimizer step.
    pub mu: f64,
    /// Queued ITC features; a multiple of the global batch.
    pub queue_size: i64,
    /// Weight of the momentum model's soft targets (ITC and MLM).
    pub alpha: f64,
    /// Steps over which `alpha` ramps up linearly from 0; unset: one epoch
    /// of the training pairs (`train.warmup_steps` for streamed shards).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha_ramp_steps: Option<i64>,
}

impl MomentumConfig {
    /// The values of `[momentum]` beyond their types.
    pub fn check(&self) -> Checked {
        let m = self;
        if !(0.0..1.0).contains(&m.mu) {
            return Err((
                "momentum.mu".into(),
                format!("must be in [0, 1), got {}", m.mu),
            ));
        }
        at(
            "momentum.alpha",
            check::probability("momentum.alpha", m.alpha),
        )?;
        at(
            "momentum.queue_size",
            check::at_least("momentum.queue_size", m.queue_size, 0),
        )?;
        if let Some(r) = m.alpha_ramp_steps {
            at(
                "momentum.alpha_ramp_steps",
                check::at_least("momentum.alpha_ramp_steps", r, 0),
            )?;
        }
        Ok(())
    }
}

impl Default for MomentumConfig {
    fn default() -> Self {
        MomentumConfig {
            enabled: false,
            mu: 0.995,
            queue_size: 65_536,
            alpha: 0.4,
            alpha_ramp_steps: None,
        }
    }
}

/// Plugins beyond those linked into the binary.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginsConfig {
    /// Dynamic plugin libraries (`cdylib`s exporting `vlmatch_plugin_table`)
    /// to load at start-up, relative to the working directory.
    #[serde(default)]
    pub paths: Vec<PathBuf>,
}

/// Which plugin fills each model role, and the plugins' own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Width of the ITC embedding space (ALBEF: 256).
    pub embed_dim: i64,
    pub image: PluginSection,
    pub text: PluginSection,
    pub fusion: PluginSection,
    pub discriminator: PluginSection,
    #[serde(default)]
    pub generator: Option<PluginSection>,
}

/// A plugin section: `plugin = "name"` plus that plugin's own keys.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PluginSection {
    pub plugin: String,
    #[serde(flatten)]
    pub params: BTreeMap<String, Value>,
}

/// An objective section: its plugin (default: the section name), its loss
/// weight, whether it runs, and the plugin's own keys. `enabled = false`
/// lets a layer switch off an objective that a lower layer configured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ObjectiveSection {
    #[serde(default)]
    pub plugin: Option<String>,
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "one")]
    pub weight: f64,
    #[serde(flatten)]
    pub params: BTreeMap<String, Value>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Pairs per evaluation batch.
    pub batch_size: usize,
    /// Run the held-out retrieval evaluation at the end of training.
    pub at_end: bool,
    /// Also evaluate every this many steps into `eval.jsonl` (0: never).
    pub every: i64,
    /// `vlmatch eval --task retrieval`: candidates per query re-ranked by ITM.
    pub k: usize,
    /// Re-ranking score: `itm` (ITM match probability, as ALBEF) or
    /// `itm+itc` (that plus the ITC similarity).
    pub rerank: Rerank,
}

impl EvalConfig {
    /// The values of `[eval]` beyond their types.
    pub fn check(&self) -> Checked {
        let e = self;
        at(
            "eval.batch_size",
            check::positive("eval.batch_size", count(e.batch_size)),
        )?;
        at("eval.every", check::at_least("eval.every", e.every, 0))?;
        at("eval.k", check::positive("eval.k", count(e.k)))?;
        Ok(())
    }
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            batch_size: 64,
            at_end: true,
            every: 0,
            k: 128,
            rerank: Rerank::Itm,
        }
    }
}

impl Config {
    /// Check the values of the typed sections (`train`, `data`, `eval`,
    /// `momentum`, the objectives' weights) beyond their types, each by its
    /// own `check`: counts positive, rates finite and in range, room for a
    /// word in `data.max_len`. Returns the first offending dotted key and
    /// what is wrong with it. Run by [`super::ConfigLayers::load`]; plugin
    /// sections are checked by their plugins.
    pub fn check_values(&self) -> Checked {
        self.train.check()?;
        self.data.check()?;
        self.eval.check()?;
        for (name, o) in &self.objectives {
            let key = format!("objectives.{name}.weight");
            at(&key, check::non_negative_f64(&key, o.weight))?;
        }
        if self.train.contrastive_accum == super::train::ContrastiveAccum::Cached
            && self.momentum.enabled
        {
            return Err((
                "train.contrastive_accum".into(),
                "\"cached\" does not combine with momentum distillation (`momentum.enabled = \
                 true`): its queues and soft targets are per micro-batch. Use \"local\", or \
                 turn momentum off"
                    .into(),
            ));
        }
        self.momentum.check()
    }
}
