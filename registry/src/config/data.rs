//! `[data]` and `[data.synthetic]`: where pairs come from, how they are
//! read, the limits on everything read from data, and their checks.

use super::choices::DataSource;
use super::common::{at, count, one_usize, yes, Checked, MIN_MAX_LEN};
use crate::check;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
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
    /// How training reads `annotations`: `auto` (default) through an
    /// index cached beside the file (or under the per-user cache), captions
    /// and paths read by offset on demand, the same batches; `off` holds
    /// every pair in memory. Karpathy-format files are always held whole.
    #[serde(default)]
    pub index: AnnotationIndexMode,
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
    /// How a `webdataset` stream is divided among ranks and loader workers:
    /// `disjoint` (each reads its own shards) or `exact` (every rank walks
    /// the whole stream, as one process would). Unset: `disjoint` for a new
    /// run at more than one rank or worker, else `exact`; a run's saved
    /// config records the resolved value, and one without it means `exact`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard_split: Option<ShardSplit>,
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
    /// Training on CUDA: the loader thread puts each batch in page-locked
    /// host memory and the step copies it to the GPU without waiting
    /// (PyTorch's `pin_memory=True` with `non_blocking=True`). No effect
    /// on the CPU. Default true.
    #[serde(default = "yes")]
    pub pin_memory: bool,
    /// Seconds the data loader may go without progress (no file opened,
    /// no image decoded, no batch made) before the trainer warns, naming
    /// the file or shard being read; after three times this it stops with
    /// an error naming it (a hung network file system, a stuck read).
    /// Default 300.
    #[serde(default = "default_stall_timeout")]
    pub stall_timeout: u64,
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
    /// ALBEF's training augmentations, off by default; never in evaluation.
    #[serde(default)]
    pub augment: AugmentConfig,
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
        at(
            "data.stall_timeout",
            check::positive(
                "data.stall_timeout",
                i64::try_from(d.stall_timeout).unwrap_or(i64::MAX),
            ),
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
        d.augment.check()?;
        let required = |key: &str, source: &str| {
            Err((
                key.to_string(),
                format!("required when data.source = \"{source}\""),
            ))
        };
        if d.shard_split.is_some() && d.source != DataSource::Webdataset {
            return Err((
                "data.shard_split".into(),
                "applies only to data.source = \"webdataset\" (tar shards); unset it".into(),
            ));
        }
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

/// `data.shard_split`: how ranks and loader workers divide a shard stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardSplit {
    /// Each rank and loader worker reads only its own shards, reassigned
    /// every epoch (webdataset's node and worker splitting).
    Disjoint,
    /// Every rank walks the whole stream and keeps its part of each global
    /// batch: what a run computes does not depend on the rank count.
    Exact,
}

/// `data.index`: whether training reads an annotation file through its
/// index or holds it in memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnnotationIndexMode {
    #[default]
    Auto,
    Off,
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
fn default_stall_timeout() -> u64 {
    300
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

/// `[data.augment]`: ALBEF's training augmentations, applied to the decoded
/// RGB image in this order: random resized crop, horizontal flip,
/// RandAugment. Off by default; evaluation never augments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// torchvision's `RandomResizedCrop` to `data.image_size` (bicubic);
    /// off, the whole image is resized.
    pub crop: bool,
    /// The crop's area as a fraction of the image's, drawn uniformly.
    pub crop_scale: [f64; 2],
    /// The crop's aspect ratio (width / height), drawn log-uniformly.
    pub crop_ratio: [f64; 2],
    /// Probability of a horizontal flip; 0 is off.
    pub flip: f64,
    /// Swap the words "left" and "right" in a flipped image's caption.
    pub flip_swap_left_right: bool,
    /// ALBEF's `RandomAugment` N: ops drawn per image (each then applied
    /// with probability 0.5); 0 is off.
    pub randaug_n: usize,
    /// ALBEF's `RandomAugment` M: the magnitude, 0 to 10.
    pub randaug_m: f64,
    /// The ops RandAugment draws from (with replacement).
    pub randaug_ops: Vec<AugmentOp>,
}

/// One of ALBEF's RandAugment ops (`data.augment.randaug_ops`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentOp {
    Identity,
    Autocontrast,
    Equalize,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Rotate,
}

impl AugmentOp {
    /// ALBEF's pretraining list, in its order.
    pub const ALBEF: [AugmentOp; 10] = [
        AugmentOp::Identity,
        AugmentOp::Autocontrast,
        AugmentOp::Equalize,
        AugmentOp::Brightness,
        AugmentOp::Sharpness,
        AugmentOp::ShearX,
        AugmentOp::ShearY,
        AugmentOp::TranslateX,
        AugmentOp::TranslateY,
        AugmentOp::Rotate,
    ];
}

/// The most ops RandAugment may draw per image (`data.augment.randaug_n`).
pub const MAX_RANDAUG_N: usize = 16;

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            crop: false,
            crop_scale: [0.08, 1.0],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            flip: 0.0,
            flip_swap_left_right: false,
            randaug_n: 0,
            randaug_m: 7.0,
            randaug_ops: AugmentOp::ALBEF.to_vec(),
        }
    }
}

impl AugmentConfig {
    /// Whether any augmentation is on.
    pub fn enabled(&self) -> bool {
        self.crop || self.flip > 0.0 || self.randaug_n > 0
    }

    /// The values of `[data.augment]` beyond their types.
    pub fn check(&self) -> Checked {
        let bad = |key: &str, problem: String| Err((format!("data.augment.{key}"), problem));
        let [s0, s1] = self.crop_scale;
        if !(s0.is_finite() && s1.is_finite() && 0.0 < s0 && s0 <= s1 && s1 <= 1.0) {
            return bad(
                "crop_scale",
                format!("must be [min, max] with 0 < min <= max <= 1, got [{s0}, {s1}]"),
            );
        }
        let [r0, r1] = self.crop_ratio;
        if !(r0.is_finite() && r1.is_finite() && 0.0 < r0 && r0 <= r1) {
            return bad(
                "crop_ratio",
                format!("must be [min, max] with 0 < min <= max, got [{r0}, {r1}]"),
            );
        }
        at(
            "data.augment.flip",
            check::probability("data.augment.flip", self.flip),
        )?;
        if self.randaug_n > MAX_RANDAUG_N {
            return bad(
                "randaug_n",
                format!("must be at most {MAX_RANDAUG_N}, got {}", self.randaug_n),
            );
        }
        let m = self.randaug_m;
        if !(m.is_finite() && (0.0..=10.0).contains(&m)) {
            return bad(
                "randaug_m",
                format!("must be a magnitude from 0 to 10, got {m}"),
            );
        }
        if self.randaug_n > 0 && self.randaug_ops.is_empty() {
            return bad(
                "randaug_ops",
                "must list at least one op when data.augment.randaug_n > 0".into(),
            );
        }
        Ok(())
    }
}
