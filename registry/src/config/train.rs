//! `[train]` and `[train.dist]`: the optimisation schedule, checkpointing,
//! precision and the data-parallel settings, with their defaults and checks.

use super::choices::{Precision, TrainDevice};
use super::common::{at, count, one_usize, yes, Checked};
use crate::check;
use serde::{Deserialize, Serialize};
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
    /// Activation checkpointing: `"none"`, `"all"`, or the roles
    /// (`"image"`, `"text"`, `"fusion"`) whose layer stacks keep only each
    /// layer's input and compute the layer again in backward.
    #[serde(default)]
    pub activation_checkpointing: ActivationCheckpointing,
    /// Data-parallel training, when a launcher (`torchrun`, `srun`) starts
    /// several ranks; ignored on one process.
    #[serde(default)]
    pub dist: DistConfig,
    /// What the contrastive objectives (ITC) of an accumulated step see:
    /// `local` (each micro-batch's pairs, summed gradients) or `cached`
    /// (GradCache: the whole accumulated batch of every rank, at the
    /// memory of one micro-batch and the cost of a second forward).
    #[serde(default)]
    pub contrastive_accum: ContrastiveAccum,
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
        t.activation_checkpointing
            .check()
            .map_err(|e| ("train.activation_checkpointing".to_string(), e))?;
        at(
            "train.dist.io_timeout",
            check::positive(
                "train.dist.io_timeout",
                i64::try_from(t.dist.io_timeout).unwrap_or(i64::MAX),
            ),
        )?;

        Ok(())
    }
}

/// `train.contrastive_accum`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastiveAccum {
    /// Each micro-batch contrasts its own pairs (of every rank).
    #[default]
    Local,
    /// Features of every micro-batch first (no gradient), the contrastive
    /// loss over all of them, then each micro-batch again with gradient
    /// from the cached feature gradients.
    Cached,
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

/// `train.activation_checkpointing`: `"none"` (the default), `"all"`, or a
/// list of roles. Read as given and checked by [`TrainConfig::check`], so
/// that a wrong name is an error naming the key and the layer that set it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    untagged,
    expecting = "expected \"none\", \"all\" or a list of roles (\"image\", \"text\", \"fusion\")"
)]
pub enum ActivationCheckpointing {
    /// `"none"` or `"all"`.
    Named(String),
    /// The roles whose stacks are checkpointed.
    Roles(Vec<String>),
}

impl Default for ActivationCheckpointing {
    fn default() -> Self {
        ActivationCheckpointing::Named("none".into())
    }
}

impl ActivationCheckpointing {
    /// The roles a list may name: the model's encoders.
    pub const ROLES: [&'static str; 3] = ["image", "text", "fusion"];

    /// Whether the layer stacks of model role `role` are checkpointed.
    pub fn covers(&self, role: &str) -> bool {
        match self {
            ActivationCheckpointing::Named(n) => n == "all" && Self::ROLES.contains(&role),
            ActivationCheckpointing::Roles(roles) => roles.iter().any(|r| r == role),
        }
    }

    fn check(&self) -> Result<(), String> {
        let roles = || format!("\"{}\"", Self::ROLES.join("\", \""));
        match self {
            ActivationCheckpointing::Named(n) if n == "none" || n == "all" => Ok(()),
            ActivationCheckpointing::Named(n) => Err(format!(
                "expected \"none\", \"all\" or a list of roles ({}), got \"{n}\"",
                roles()
            )),
            ActivationCheckpointing::Roles(list) => {
                for (i, r) in list.iter().enumerate() {
                    if !Self::ROLES.contains(&r.as_str()) {
                        return Err(format!("unknown role \"{r}\"; the roles are {}", roles()));
                    }
                    if list[..i].contains(r) {
                        return Err(format!("role \"{r}\" is listed twice"));
                    }
                }
                Ok(())
            }
        }
    }
}

/// `[train.dist]`: how the ranks of a data-parallel run work together.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Seconds a rank waits for the others (rendezvous, a collective)
    /// before it stops with an error naming the rank that did not answer.
    pub timeout: u64,
    /// Seconds the other ranks wait for rank 0 to write a checkpoint or
    /// run an evaluation, which can take far longer than a collective (a
    /// slow disk, a large held-out set). They stop at once if rank 0 fails
    /// (with its reason) or dies (its heartbeat stops).
    pub io_timeout: u64,
    /// Size of the gradient all-reduce buckets in MiB.
    pub bucket_mb: f64,
    /// Where ITM's in-batch hard negatives are drawn from: `global` (every
    /// rank's pairs, as BLIP) or `local` (the rank's own, as ALBEF; cheaper).
    pub hard_negatives: HardNegatives,
    /// ZeRO stage 1: each rank keeps AdamW's moments of its own part of
    /// the parameters (a contiguous range of their concatenation), steps
    /// that part and all-gathers the updated parameters; checkpoints hold
    /// the whole state, gathered on save.
    pub shard_optimizer: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            timeout: 600,
            io_timeout: 3600,
            bucket_mb: 25.0,
            hard_negatives: HardNegatives::Global,
            shard_optimizer: false,
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
