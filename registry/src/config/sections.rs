//! The typed sections of the configuration (`model`, `train`, `data`,
//! `eval`, `momentum`, `plugins`, and the plugin sections' common keys),
//! each with its defaults and the checks of its values beyond their types.

use crate::check;
use figment::value::Value;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use vlmatch_core::Result;

pub use super::choices::{DataSource, Precision, Rerank, TrainDevice};

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
    #[serde(default)]
    pub device: TrainDevice,
    /// `auto` (bf16 on CUDA, fp32 on CPU), `fp32` or `bf16`.
    #[serde(default)]
    pub precision: Precision,
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

impl TrainConfig {
    /// The values of `[train]` beyond their types.
    pub fn check(&self) -> Checked {
        let t = self;
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

        Ok(())
    }
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// `synthetic` (built in, no download), `annotations` (ALBEF/BLIP JSON)
    /// or `webdataset` (tar shards, streamed).
    pub source: DataSource,
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
    /// The most pixels (width x height, read from the image's header before
    /// decoding) an image may have; larger ones are refused as a
    /// decompression bomb (skipped and counted under `on_error = "skip"`).
    /// Default: PIL's limit, 2 x 89,478,485.
    #[serde(default = "default_max_image_pixels")]
    pub max_image_pixels: u64,
    /// The most bytes a tar shard's image member may hold, checked from its
    /// header before it is read. Default 64 MiB.
    #[serde(default = "default_max_image_bytes")]
    pub max_image_bytes: u64,
    /// The most bytes a tar shard's text member (`.txt`, `.json`) may hold,
    /// checked from its header before it is read. Default 1 MiB.
    #[serde(default = "default_max_text_bytes")]
    pub max_text_bytes: u64,
    /// Captions longer than this many bytes are cut (at a character
    /// boundary) before tokenising, not rejected. Unset: 64 x `max_len`.
    #[serde(default)]
    pub max_caption_bytes: Option<usize>,
    /// The longest line an annotation file may have, in bytes. Default 1 MiB.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// The most captions one annotation entry or shard sample may list.
    /// Default 1000.
    #[serde(default = "default_max_captions_per_image")]
    pub max_captions_per_image: usize,
    #[serde(default)]
    pub synthetic: SyntheticConfig,
}

fn default_max_image_pixels() -> u64 {
    2 * 89_478_485
}

fn default_max_image_bytes() -> u64 {
    64 << 20
}

fn default_max_text_bytes() -> u64 {
    1 << 20
}

fn default_max_line_bytes() -> usize {
    1 << 20
}

fn default_max_captions_per_image() -> usize {
    1000
}

impl DataConfig {
    /// `data.max_caption_bytes`, or its default of 64 x `data.max_len`.
    pub fn caption_bytes(&self) -> usize {
        self.max_caption_bytes
            .unwrap_or_else(|| 64 * usize::try_from(self.max_len).unwrap_or(0))
    }

    /// The values of `[data]` beyond their types.
    pub fn check(&self) -> Checked {
        let d = self;
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
        if d.max_image_pixels == 0 {
            return Err((
                "data.max_image_pixels".into(),
                "must be positive (the most pixels an image may have)".into(),
            ));
        }
        let limits = [
            (
                "data.max_image_bytes",
                d.max_image_bytes == 0,
                "bytes of an image tar member",
            ),
            (
                "data.max_text_bytes",
                d.max_text_bytes == 0,
                "bytes of a text tar member",
            ),
            (
                "data.max_caption_bytes",
                d.max_caption_bytes == Some(0),
                "bytes of a caption",
            ),
            (
                "data.max_line_bytes",
                d.max_line_bytes == 0,
                "bytes of an annotation line",
            ),
            (
                "data.max_captions_per_image",
                d.max_captions_per_image == 0,
                "captions of one image",
            ),
        ];
        if let Some((key, _, what)) = limits.iter().find(|l| l.1) {
            return Err(((*key).into(), format!("must be positive (the most {what})")));
        }
        at(
            "data.synthetic.captions_per_scene",
            check::positive(
                "data.synthetic.captions_per_scene",
                count(d.synthetic.captions_per_scene),
            ),
        )?;
        let required = |key: &str, source: &str| {
            Err((
                key.to_string(),
                format!("required when data.source = \"{source}\""),
            ))
        };
        match d.source {
            DataSource::Annotations if d.annotations.is_none() => {
                required("data.annotations", "annotations")
            }
            DataSource::Webdataset if d.shards.is_none() => required("data.shards", "webdataset"),
            _ => Ok(()),
        }
    }
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

/// The fewest tokens `data.max_len` may allow: `[CLS]`, `[SEP]` and one word.
pub const MIN_MAX_LEN: i64 = 3;

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
        self.momentum.check()
    }
}

/// A section's check: `Err((dotted key, what is wrong))` for the first
/// offending key.
pub type Checked = std::result::Result<(), (String, String)>;

/// `r`, a [`crate::check`] result for `key`, as a [`Checked`].
fn at(key: &str, r: Result<()>) -> Checked {
    r.map_err(|e| {
        let msg = e.to_string();
        let prefix = format!("config key `{key}`: ");
        let problem = msg.strip_prefix(&prefix).unwrap_or(&msg).to_string();
        (key.to_string(), problem)
    })
}

/// A count as the `i64` the checks take.
fn count(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
