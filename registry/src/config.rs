//! Layered configuration, lowest layer first:
//!
//! 1. a preset (`configs/<name>.toml`, or a run directory's saved `config.toml`),
//! 2. each `--config FILE`, in order,
//! 3. environment variables `VLMATCH_<SECTION>__<KEY>` (`VLMATCH_TRAIN__STEPS=10`;
//!    `VLMATCH_HF_FIXTURES` and `VLMATCH_TEST_*`, the tests' settings, are not keys),
//! 4. each `--set dotted.key=value` (values parse as TOML, else as strings).
//!
//! Unknown keys and wrong types are errors naming the key and the layer it
//! came from. Typed sections (`train`, `data`, `eval`) are checked here;
//! plugin sections (`model.*`, `objectives.*`, `samplers.*`) name their
//! plugin and are checked by that plugin's own config type through
//! [`crate::BuildContext::params`], with the same error format.

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

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
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Number of optimizer steps.
    pub steps: i64,
    /// Pairs per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[serde(default = "one_usize")]
    pub accum_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    #[serde(default)]
    pub min_lr: f64,
    /// Linear warm-up steps from 0 to `lr`.
    #[serde(default)]
    pub warmup_steps: i64,
    /// AdamW weight decay; never applied to biases, norms or scalars.
    #[serde(default)]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: (f64, f64),
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 disables).
    #[serde(default)]
    pub grad_clip: f64,
    pub seed: u64,
    /// Checkpoint interval in steps (0: only the final checkpoint).
    #[serde(default)]
    pub checkpoint_every: i64,
    /// Checkpoints kept on disk (the newest ones).
    #[serde(default = "default_keep")]
    pub keep_checkpoints: usize,
    /// Metrics interval in steps.
    #[serde(default = "one_i64")]
    pub log_every: i64,
    /// Also write the metrics as TensorBoard event files under `RUN/tb/`.
    #[serde(default = "yes")]
    pub tensorboard: bool,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    #[serde(default = "default_device")]
    pub device: String,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `fp32` or `bf16`.
    #[serde(default = "default_auto")]
    pub precision: String,
    /// libtorch intra-op threads (0: all cores).
    #[serde(default)]
    pub threads: usize,
    /// What a step whose loss or gradient norm is not finite does: it is
    /// never applied; `stop` ends the run, `skip` goes on.
    #[serde(default)]
    pub on_nonfinite: OnNonFinite,
    /// With `on_nonfinite = "skip"`: stop after this many non-finite steps
    /// in a row.
    #[serde(default = "default_max_skipped")]
    pub max_skipped: u32,
    /// Data-parallel training, when a launcher (`torchrun`, `srun`) starts
    /// several ranks; ignored on one process.
    #[serde(default)]
    pub dist: DistConfig,
}

/// `train.on_nonfinite`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// End the run, naming the step, each loss, the gradient norm and the
    /// last good checkpoint.
    #[default]
    Stop,
    /// Drop the step with a warning; stop after `train.max_skipped` in a row.
    Skip,
}

fn default_max_skipped() -> u32 {
    5
}

/// `[train.dist]`: how the ranks of a data-parallel run work together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Seconds a rank waits for the others (rendezvous, a collective, a
    /// checkpoint) before it stops with an error naming the rank that did
    /// not answer.
    pub timeout: u64,
    /// Size of the gradient all-reduce buckets in MiB.
    pub bucket_mb: f64,
    /// Where ITM's in-batch hard negatives are drawn from: `global` (every
    /// rank's pairs, as BLIP) or `local` (the rank's own, as ALBEF; cheaper).
    pub hard_negatives: HardNegatives,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            timeout: 600,
            bucket_mb: 25.0,
            hard_negatives: HardNegatives::Global,
        }
    }
}

/// `train.dist.hard_negatives`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HardNegatives {
    Global,
    Local,
}

fn one_usize() -> usize {
    1
}
fn one_i64() -> i64 {
    1
}
fn default_betas() -> (f64, f64) {
    (0.9, 0.999)
}
fn default_eps() -> f64 {
    1e-8
}
fn default_keep() -> usize {
    2
}
fn default_device() -> String {
    "auto".into()
}
fn default_auto() -> String {
    "auto".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic` (built in, no download), `annotations` (ALBEF/BLIP JSON)
    /// or `webdataset` (tar shards, streamed).
    pub source: String,
    /// Input resolution (square); the image encoder is built for it.
    pub image_size: i64,
    /// Maximum text length in tokens, `[CLS]` and `[SEP]` included.
    pub max_len: i64,
    /// `builtin` (the synthetic captions' words plus characters, or the
    /// tokenizer of `model.text.init`), a `vocab.txt` path, a HuggingFace
    /// `tokenizer.json` path, or a directory holding either.
    #[serde(default = "default_vocab")]
    pub vocab: String,
    /// Lowercase before WordPiece (a `tokenizer.json` has its own normaliser).
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// ALBEF/BLIP annotation file (JSON array or JSONL) for `annotations`.
    #[serde(default)]
    pub annotations: Option<PathBuf>,
    /// Karpathy split(s) of `annotations` to train on, e.g. `train,restval`
    /// (Karpathy-format files only).
    #[serde(default)]
    pub split: Option<String>,
    /// Held-out annotation file for the end-of-training evaluation.
    #[serde(default)]
    pub heldout_annotations: Option<PathBuf>,
    /// Karpathy split(s) of `heldout_annotations`, e.g. `val`.
    #[serde(default)]
    pub heldout_split: Option<String>,
    /// Directory the annotations' `image` paths are relative to.
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Tar shards for `webdataset`, relative to the working directory; brace
    /// ranges and lists expand: `shards/train-{000000..000012}.tar`, `{a,b}`.
    #[serde(default)]
    pub shards: Option<String>,
    /// Samples in the `webdataset` shuffle buffer.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// A bad annotation entry or shard sample, a missing image file or an
    /// image that does not decode: `fail` (an error naming file and line or
    /// member) or `skip` (a warning; the pair is dropped or replaced).
    #[serde(default)]
    pub on_error: OnError,
    /// Which pairs of a batch are positives of each other (ITC targets,
    /// never drawn as negatives): `identical` (default: same image id, or
    /// identical tokenised caption, or identical decoded image) or
    /// `image_id` (same image id only, exactly ALBEF). See
    /// `vlmatch_core::positives`.
    #[serde(default)]
    pub positives: Positives,
    /// Image decoding and tokenising threads.
    #[serde(default = "one_usize")]
    pub workers: usize,
    /// Batches prepared ahead of the training step.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// Per-channel normalisation (CLIP's, as ALBEF uses). Unset, each comes
    /// from `model.image.init`'s `preprocessor_config.json` where it has one.
    #[serde(default = "default_mean")]
    pub mean: [f32; 3],
    #[serde(default = "default_std")]
    pub std: [f32; 3],
    #[serde(default)]
    pub synthetic: SyntheticConfig,
}

/// What the data pipeline does with a bad entry or image (`data.on_error`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnError {
    #[default]
    Fail,
    Skip,
}

/// `data.positives`: see [`vlmatch_core::positives`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Positives {
    #[default]
    Identical,
    ImageId,
}

impl From<Positives> for vlmatch_core::PositiveRule {
    fn from(p: Positives) -> Self {
        match p {
            Positives::Identical => vlmatch_core::PositiveRule::Identical,
            Positives::ImageId => vlmatch_core::PositiveRule::ImageId,
        }
    }
}

fn default_shuffle_buffer() -> usize {
    1000
}
fn default_vocab() -> String {
    "builtin".into()
}
fn yes() -> bool {
    true
}
fn default_prefetch() -> usize {
    4
}
fn default_mean() -> [f32; 3] {
    [0.481_454_66, 0.457_827_5, 0.408_210_73]
}
fn default_std() -> [f32; 3] {
    [0.268_629_54, 0.261_302_6, 0.275_777_1]
}

/// The built-in procedurally generated dataset.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticConfig {
    /// Scenes in the training split.
    pub train_scenes: usize,
    /// Scenes in the held-out split (disjoint seeds).
    pub heldout_scenes: usize,
    /// Different phrasings generated per scene.
    pub captions_per_scene: usize,
    /// Seed of the scene generator (independent of `train.seed`).
    pub seed: u64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        SyntheticConfig {
            train_scenes: 4000,
            heldout_scenes: 200,
            captions_per_scene: 3,
            seed: 1234,
        }
    }
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
    pub rerank: String,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            batch_size: 64,
            at_end: true,
            every: 0,
            k: 128,
            rerank: "itm".into(),
        }
    }
}

/// The fewest tokens `data.max_len` may allow: `[CLS]`, `[SEP]` and one word.
pub const MIN_MAX_LEN: i64 = 3;

impl Config {
    /// Check the values of the typed sections (`train`, `data`, `eval`, the
    /// objectives' weights) beyond their types: counts positive, rates
    /// finite and in range, room for a word in `data.max_len`. Returns the
    /// first offending dotted key and what is wrong with it. Run by
    /// [`ConfigLayers::load`]; plugin sections are checked by their plugins.
    pub fn check_values(&self) -> std::result::Result<(), (String, String)> {
        use crate::check;
        let at = |key: &str, r: Result<()>| {
            r.map_err(|e| {
                let msg = e.to_string();
                let prefix = format!("config key `{key}`: ");
                let problem = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
                (key.to_string(), problem)
            })
        };
        let count = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
        let t = &self.train;
        at("train.steps", check::positive("train.steps", t.steps))?;
        at(
            "train.batch_size",
            check::positive("train.batch_size", count(t.batch_size)),
        )?;
        at(
            "train.accum_steps",
            check::positive("train.accum_steps", count(t.accum_steps)),
        )?;
        at("train.lr", check::positive_f64("train.lr", t.lr))?;
        at(
            "train.min_lr",
            check::non_negative_f64("train.min_lr", t.min_lr),
        )?;
        if t.min_lr > t.lr {
            return Err((
                "train.min_lr".into(),
                format!(
                    "must not exceed train.lr {} (the cosine decays from lr to min_lr), got {}",
                    t.lr, t.min_lr
                ),
            ));
        }
        at(
            "train.warmup_steps",
            check::at_least("train.warmup_steps", t.warmup_steps, 0),
        )?;
        at(
            "train.weight_decay",
            check::non_negative_f64("train.weight_decay", t.weight_decay),
        )?;
        for (i, beta) in [t.betas.0, t.betas.1].into_iter().enumerate() {
            if !(0.0..1.0).contains(&beta) {
                return Err((
                    "train.betas".into(),
                    format!("beta{} must be in [0, 1), got {beta}", i + 1),
                ));
            }
        }
        at("train.eps", check::positive_f64("train.eps", t.eps))?;
        at(
            "train.grad_clip",
            check::non_negative_f64("train.grad_clip", t.grad_clip),
        )?;
        at(
            "train.checkpoint_every",
            check::at_least("train.checkpoint_every", t.checkpoint_every, 0),
        )?;
        at(
            "train.log_every",
            check::positive("train.log_every", t.log_every),
        )?;
        at(
            "train.dist.bucket_mb",
            check::positive_f64("train.dist.bucket_mb", t.dist.bucket_mb),
        )?;

        let d = &self.data;
        at(
            "data.image_size",
            check::positive("data.image_size", d.image_size),
        )?;
        if d.max_len < MIN_MAX_LEN {
            return Err((
                "data.max_len".into(),
                format!(
                    "must be at least {MIN_MAX_LEN} ([CLS], [SEP] and room for one word), got {}",
                    d.max_len
                ),
            ));
        }
        for (i, (m, s)) in d.mean.iter().zip(&d.std).enumerate() {
            at("data.mean", check::finite("data.mean", f64::from(*m)))
                .map_err(|(k, p)| (k, format!("channel {i}: {p}")))?;
            at("data.std", check::positive_f64("data.std", f64::from(*s)))
                .map_err(|(k, p)| (k, format!("channel {i}: {p}")))?;
        }
        at(
            "data.synthetic.captions_per_scene",
            check::positive(
                "data.synthetic.captions_per_scene",
                count(d.synthetic.captions_per_scene),
            ),
        )?;

        let e = &self.eval;
        at(
            "eval.batch_size",
            check::positive("eval.batch_size", count(e.batch_size)),
        )?;
        at("eval.every", check::at_least("eval.every", e.every, 0))?;
        at("eval.k", check::positive("eval.k", count(e.k)))?;
        if e.rerank != "itm" && e.rerank != "itm+itc" {
            return Err((
                "eval.rerank".into(),
                format!("expected \"itm\" or \"itm+itc\", got \"{}\"", e.rerank),
            ));
        }
        for (name, o) in &self.objectives {
            let key = format!("objectives.{name}.weight");
            at(&key, check::non_negative_f64(&key, o.weight))?;
        }
        let m = &self.momentum;
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

/// A named TOML text, used for presets and saved run configs.
#[derive(Clone)]
struct NamedToml {
    name: String,
    path: Option<PathBuf>,
    text: String,
}

impl Provider for NamedToml {
    fn metadata(&self) -> Metadata {
        let m = Metadata::named(self.name.clone());
        match &self.path {
            Some(p) => m.source(p.as_path()),
            None => m,
        }
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Toml::string(&self.text).data()
    }
}

/// `--set key=value` pairs, as their own layer so errors name them.
#[derive(Clone)]
struct SetOverrides(Vec<(String, String)>);

impl Provider for SetOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command line").interpolater(|_, keys| format!("--set {}", keys.join(".")))
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        let mut root = Dict::new();
        for (key, raw) in &self.0 {
            let value = parse_value(raw);
            insert_dotted(&mut root, key, value);
        }
        let mut map = Map::new();
        map.insert(Profile::Global, root);
        Ok(map)
    }
}

fn parse_value(raw: &str) -> Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(table) => {
            let v = table.get("v").cloned().expect("parsed key");
            Value::serialize(v).unwrap_or_else(|_| Value::from(raw.to_string()))
        }
        Err(_) => Value::from(raw.to_string()),
    }
}

fn insert_dotted(root: &mut Dict, key: &str, value: Value) {
    let mut parts = key.split('.').peekable();
    let mut dict = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            dict.insert(part.to_string(), value);
            return;
        }
        let entry = dict
            .entry(part.to_string())
            .or_insert_with(|| Value::Dict(Tag::Default, Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::Dict(Tag::Default, Dict::new());
        }
        let Value::Dict(_, next) = entry else {
            unreachable!()
        };
        dict = next;
    }
}

/// What to layer, in order. Built by the CLI from its arguments.
#[derive(Debug, Clone, Default)]
pub struct ConfigLayers {
    /// The bottom layer: `(display name, path if a file, TOML text)`.
    pub base: Option<(String, Option<PathBuf>, String)>,
    /// `--config` files, lowest first.
    pub files: Vec<PathBuf>,
    /// Read `VLMATCH_*` environment variables.
    pub env: bool,
    /// `--set` pairs as given (`a.b=c`).
    pub sets: Vec<String>,
}

/// The merged configuration, typed, with the figment that produced it (for
/// plugin sections and error sources).
pub struct LoadedConfig {
    pub figment: Figment,
    pub config: Config,
    /// Plugin-section keys dropped because a higher layer switched the
    /// section to another plugin (full dotted keys).
    pub stale: std::collections::BTreeSet<String>,
}

impl ConfigLayers {
    pub fn load(&self) -> Result<LoadedConfig> {
        let mut figment = Figment::new();
        // Each layer alone too, to tell which layer set a section's plugin.
        let mut layers: Vec<(String, Figment)> = Vec::new();
        if let Some((name, path, text)) = &self.base {
            check_toml(name, text)?;
            let layer = NamedToml {
                name: name.clone(),
                path: path.clone(),
                text: text.clone(),
            };
            layers.push((name.clone(), Figment::from(layer.clone())));
            figment = figment.merge(layer);
        }
        for file in &self.files {
            let text = crate::check::read_utf8(file).map_err(|e| match e {
                Error::Io { source, .. } => Error::Config(format!(
                    "cannot read config file {}: {source}",
                    file.display()
                )),
                other => other,
            })?;
            let name = format!("file {}", file.display());
            check_toml(&name, &text)?;
            let layer = NamedToml {
                name: name.clone(),
                path: Some(file.clone()),
                text,
            };
            layers.push((name, Figment::from(layer.clone())));
            figment = figment.merge(layer);
        }
        if self.env {
            // VLMATCH_HF_FIXTURES names parity-fixture directories for the
            // test suite, VLMATCH_TEST_* are the tests' fault points; they
            // are not config keys.
            let env = || {
                Env::prefixed("VLMATCH_")
                    .ignore(&["HF_FIXTURES"])
                    .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
                    .split("__")
                    .global()
            };
            layers.push((env().metadata().name.to_string(), Figment::from(env())));
            figment = figment.merge(env());
        }
        let mut sets = Vec::new();
        for s in &self.sets {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::Config(format!(
                    "--set `{s}`: expected `dotted.key=value`, e.g. `--set train.steps=100`"
                )));
            };
            if k.trim().is_empty() || k.split('.').any(|p| p.trim().is_empty()) {
                return Err(Error::Config(format!(
                    "--set `{s}`: the key `{k}` is not a dotted key"
                )));
            }
            sets.push((k.trim().to_string(), v.trim().to_string()));
        }
        if !sets.is_empty() {
            let layer = SetOverrides(sets);
            layers.push((
                layer.metadata().name.to_string(),
                Figment::from(layer.clone()),
            ));
            figment = figment.merge(layer);
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| Error::Config(describe_error(e, &figment, &[])))?;
        if let Err((key, problem)) = config.check_values() {
            let source = key_source(&figment, &key, None);
            return Err(Error::Config(format!(
                "config key `{key}`{source}: {problem}"
            )));
        }
        checkpoint_normalisation(&mut config, &figment)?;
        let stale = drop_stale_keys(&mut config, &figment, &layers);
        Ok(LoadedConfig {
            figment,
            config,
            stale,
        })
    }
}

/// `data.mean` and `data.std`, each where no layer sets it, from
/// `model.image.init`'s `preprocessor_config.json` (`image_mean`,
/// `image_std`): the normalisation the image checkpoint was trained with
/// (CLIP's for CLIP, 0.5 for HuggingFace ViT). The values go into the
/// config, so the run's `config.toml` records them (and a resume keeps them).
fn checkpoint_normalisation(config: &mut Config, figment: &Figment) -> Result<()> {
    let Ok(dir) = figment.extract_inner::<PathBuf>("model.image.init") else {
        return Ok(());
    };
    let file = dir.join("preprocessor_config.json");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    let bad = |message: String| Error::Data {
        path: file.clone(),
        line: None,
        message,
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("invalid preprocessor_config.json: {e}")))?;
    let data = &mut config.data;
    for (key, field, target) in [
        ("data.mean", "image_mean", &mut data.mean),
        ("data.std", "image_std", &mut data.std),
    ] {
        let (Some(value), None) = (json.get(field), figment.find_metadata(key)) else {
            continue;
        };
        let v: [f32; 3] = serde_json::from_value(value.clone()).map_err(|e| {
            bad(format!(
                "`{field}`: expected 3 numbers (one per RGB channel): {e}"
            ))
        })?;
        let valid = v
            .iter()
            .all(|x| x.is_finite() && (field == "image_mean" || *x > 0.0));
        if !valid {
            return Err(bad(format!("`{field}` {v:?} cannot normalise images")));
        }
        tracing::info!(key, value = ?v, from = %file.display(), "image normalisation from the checkpoint");
        *target = v;
    }
    Ok(())
}

/// Switching a section's plugin in a higher layer (`--config` with
/// `[model.image] plugin = "conv_stem"` over a ViT preset) must not hand the
/// new plugin the old one's keys. A plugin-section key is kept only if it
/// was set in or above the lowest layer from which on the section's plugin
/// has its final value; the others are dropped from the config.
fn drop_stale_keys(
    config: &mut Config,
    figment: &Figment,
    layers: &[(String, Figment)],
) -> std::collections::BTreeSet<String> {
    let layer_of = |name: &str| layers.iter().rposition(|(n, _)| n == name);
    let first_layer = |key: &str, plugin: &str| -> usize {
        let mut start = None;
        for (i, (_, layer)) in layers.iter().enumerate() {
            match layer.extract_inner::<String>(&format!("{key}.plugin")) {
                Ok(p) if p == plugin => start = start.or(Some(i)),
                Ok(_) => start = None,
                Err(_) => {}
            }
        }
        start.unwrap_or(0)
    };
    let mut stale = std::collections::BTreeSet::new();
    let mut filter = |key: &str, plugin: &str, params: &mut BTreeMap<String, Value>| {
        let start = first_layer(key, plugin);
        if start == 0 {
            return;
        }
        params.retain(|k, _| {
            let full = format!("{key}.{k}");
            let set_in = figment.find_metadata(&full).and_then(|m| layer_of(&m.name));
            let keep = set_in.is_none_or(|i| i >= start);
            if !keep {
                stale.insert(full);
            }
            keep
        });
    };
    let m = &mut config.model;
    filter("model.image", &m.image.plugin.clone(), &mut m.image.params);
    filter("model.text", &m.text.plugin.clone(), &mut m.text.params);
    filter(
        "model.fusion",
        &m.fusion.plugin.clone(),
        &mut m.fusion.params,
    );
    filter(
        "model.discriminator",
        &m.discriminator.plugin.clone(),
        &mut m.discriminator.params,
    );
    if let Some(g) = &mut m.generator {
        filter("model.generator", &g.plugin.clone(), &mut g.params);
    }
    for (name, o) in &mut config.objectives {
        let plugin = o.plugin.clone().unwrap_or_else(|| name.clone());
        filter(&format!("objectives.{name}"), &plugin, &mut o.params);
    }
    for (name, s) in &mut config.samplers {
        filter(
            &format!("samplers.{name}"),
            &s.plugin.clone(),
            &mut s.params,
        );
    }
    stale
}

/// Reject a syntactically broken TOML layer with its line.
fn check_toml(name: &str, text: &str) -> Result<()> {
    text.parse::<toml::Table>().map(|_| ()).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
        let message = e.message().trim().replace('\n', "; ");
        Error::Config(format!("{name}{at}: invalid TOML: {message}"))
    })
}

impl LoadedConfig {
    /// The merged configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.config).expect("the config serialises to TOML")
    }

    /// Deserialize the plugin section at `key` (dotted) into `T`, ignoring
    /// the role keys (`plugin`; `weight`, `enabled` of objectives) that the
    /// registry itself reads.
    pub fn section<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        section_of(&self.figment, Some(&self.stale), key)
    }
}

/// [`LoadedConfig::section`] over any figment; `stale`: keys to drop.
pub(crate) fn section_of<T: serde::de::DeserializeOwned>(
    figment: &Figment,
    stale: Option<&std::collections::BTreeSet<String>>,
    key: &str,
) -> Result<T> {
    let value = figment
        .find_value(key)
        .map_err(|e| Error::Config(format!("config key `{key}`: {}", e.kind)))?;
    let Value::Dict(tag, mut dict) = value else {
        return Err(Error::Config(format!(
            "config key `{key}`: expected a table"
        )));
    };
    dict.remove("plugin");
    dict.retain(|k, _| !stale.is_some_and(|s| s.contains(&format!("{key}.{k}"))));
    if key.starts_with("objectives.") {
        dict.remove("weight");
        dict.remove("enabled");
    }
    let prefix: Vec<&str> = key.split('.').collect();
    Value::Dict(tag, dict)
        .deserialize::<T>()
        .map_err(|e| Error::Config(describe_error(e, figment, &prefix)))
}

/// One line naming the key, the layer it came from, and what is wrong.
pub fn describe_error(err: figment::Error, figment: &Figment, prefix: &[&str]) -> String {
    let err = err
        .into_iter()
        .next()
        .expect("an error has at least one entry");
    let mut path: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    path.extend(err.path.iter().cloned());
    if let figment::error::Kind::UnknownField(field, _) = &err.kind {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    if let figment::error::Kind::MissingField(field) = &err.kind {
        path.push(field.to_string());
    }
    let key = path.join(".");
    let problem = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            let hint = closest(field, expected)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!(
                "unknown key `{field}`{hint}; expected one of: {}",
                expected.join(", ")
            )
        }
        figment::error::Kind::MissingField(field) => format!("missing required key `{field}`"),
        other => other.to_string(),
    };
    let source = key_source(figment, &key, err.metadata.as_ref());
    let what = if key.is_empty() {
        "config".to_string()
    } else {
        format!("config key `{key}`")
    };
    format!("{what}{source}: {problem}")
}

/// `config key `K`: problem` (as [`crate::check`] words it) with the layer
/// that set `K` added: `config key `K` (from `--set K`): problem`. Other
/// errors, and keys no layer set, are returned as they are.
pub fn with_key_source(err: Error, figment: &Figment) -> Error {
    let Error::Config(message) = &err else {
        return err;
    };
    let Some((key, problem)) = message
        .strip_prefix("config key `")
        .and_then(|rest| rest.split_once("`: "))
    else {
        return err;
    };
    let source = key_source(figment, key, None);
    if source.is_empty() {
        return err;
    }
    Error::Config(format!("config key `{key}`{source}: {problem}"))
}

/// Where the value of the dotted `key` came from, as ` (in FILE)`, ` (from
/// `--set KEY`)`, ` (from environment variable VLMATCH_...)` or ` (from
/// LAYER)`; `fallback` when no layer set the key; empty if neither says.
fn key_source(figment: &Figment, key: &str, fallback: Option<&Metadata>) -> String {
    let metadata = figment.find_metadata(key).or(fallback);
    metadata
        .map(|m| {
            let keys: Vec<&str> = key.split('.').filter(|k| !k.is_empty()).collect();
            let shown = m.interpolate(&Profile::Default, &keys);
            match &m.source {
                Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                _ if m.name == "command line" => format!(" (from `{shown}`)"),
                _ if m.name.contains("environment") => {
                    format!(
                        " (from environment variable VLMATCH_{})",
                        keys.join("__").to_uppercase()
                    )
                }
                _ => format!(" (from {})", m.name),
            }
        })
        .unwrap_or_default()
}

/// The expected name nearest to a misspelt one, if it is close.
fn closest<'e>(name: &str, expected: &[&'e str]) -> Option<&'e str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    expected
        .iter()
        .map(|e| (distance(name, e), *e))
        .filter(|(d, e)| *d <= (e.len() / 3).max(2))
        .min()
        .map(|(_, e)| e)
}

/// Read a TOML preset file as the base layer.
pub fn base_from_file(path: &Path) -> Result<(String, Option<PathBuf>, String)> {
    let text = crate::check::read_utf8(path).map_err(|e| match e {
        Error::Io { source, .. } => Error::Config(format!(
            "cannot read config file {}: {source}",
            path.display()
        )),
        other => other,
    })?;
    Ok((
        format!("file {}", path.display()),
        Some(path.to_path_buf()),
        text,
    ))
}
