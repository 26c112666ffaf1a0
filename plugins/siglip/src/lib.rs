//! SigLIP, the pairwise sigmoid loss (Zhai et al. 2023, "Sigmoid Loss for
//! Language Image Pre-Training"; big_vision's `sigmoid` loss and open_clip's
//! `SigLipLoss` are the reference implementations): every image-text pair
//! of the global batch is its own binary classification,
//!
//! `L = -1/N sum_ij log sigmoid(z_ij (t x_i . y_j + b))`,
//!
//! with `x`, `y` the L2-normalised ITC embeddings (`g_v`, `g_t`), `N` the
//! global batch's image count, `z_ij = 1` where pair `j` is a positive of
//! pair `i` (`Forward::positives`: the project's relation, so duplicate
//! captions and images and captions of the same image id are positives,
//! not only the diagonal) and `-1` otherwise, and learnable `t = exp(t')`
//! (`t'` initialised at `log 10`) and `b` (initialised at -10).
//!
//! Data parallel: each rank scores its own images against every rank's
//! texts (gathered with gradient, whose backward sums every rank's
//! gradient into the owner's rows), and normalises by the global batch
//! through `Forward::global_mean`; the trainer's average of the ranks'
//! gradients is then the gradient of one process holding the global batch.
//!
//! ITM's in-batch hard negatives follow SigLIP's similarities: the plugin
//! hands its `t` to the model's contrastive head
//! (`ContrastiveHead::draw_negatives_with_scale`), so negatives are drawn
//! with `softmax(t x_i . y_j + b)` over a row, that is with temperature
//! `1/t` (`b` shifts a whole row and cancels in the softmax).
//!
//! SigLIP has no momentum distillation: `[momentum]` with it is a config
//! error.
//!
//! Registered as objective `siglip`. Parameters: `objectives.<name>.logit_scale`
//! (`t'`) and `objectives.<name>.logit_bias` (`b`). Loss key: the section
//! name; metrics: `<name>_acc` (top-1 text of each image is a positive),
//! `<name>_scale` (`t`), `<name>_bias` (`b`).

use serde::Deserialize;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Forward, Objective, ObjectiveOutput, Result};
use vlmatch_registry::{check, BuildContext};

vlmatch_registry::register!(objective "siglip" => build);

/// `[objectives.<name>]` for `plugin = "siglip"`, beside the registry's
/// keys (`weight`, `plugin`, `enabled`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SiglipConfig {
    /// `t` at initialisation (the paper's `t' = log 10`): a number > 0.
    pub init_scale: f64,
    /// `b` at initialisation (the paper's -10): a finite number.
    pub init_bias: f64,
}

impl Default for SiglipConfig {
    fn default() -> Self {
        SiglipConfig {
            init_scale: 10.0,
            init_bias: -10.0,
        }
    }
}

pub struct Siglip {
    name: String,
    /// `t'`, with `t = exp(t')`.
    log_scale: Tensor,
    bias: Tensor,
}

/// The logits `t x_i . y_j + b`, `[B, G]`, of images `[B, E]` against texts
/// `[G, E]`, with `t = exp(log_scale)`.
pub fn siglip_logits(images: &Tensor, texts: &Tensor, log_scale: &Tensor, bias: &Tensor) -> Tensor {
    let images = images.to_kind(Kind::Float);
    let texts = texts.to_kind(Kind::Float);
    images.matmul(&texts.tr()) * log_scale.exp() + bias
}

/// `-sum_ij log sigmoid(z_ij logits_ij)` over `logits` `[B, G]` with `z = 1`
/// where `positives` (`[B, G]` bool) and -1 elsewhere: the numerator of the
/// loss, before dividing by the global batch's image count.
pub fn siglip_loss_sum(logits: &Tensor, positives: &Tensor) -> Tensor {
    let z = positives.to_kind(Kind::Float) * 2.0 - 1.0;
    -(z * logits).log_sigmoid().sum(Kind::Float)
}

/// The SigLIP loss of one process holding the whole batch: images `[N, E]`
/// and texts `[N, E]` (normalised), `positives` `[N, N]` bool.
pub fn siglip_loss(
    images: &Tensor,
    texts: &Tensor,
    positives: &Tensor,
    log_scale: &Tensor,
    bias: &Tensor,
) -> Tensor {
    let logits = siglip_logits(images, texts, log_scale, bias);
    siglip_loss_sum(&logits, positives) / images.size()[0].max(1) as f64
}

impl Objective for Siglip {
    /// Reads only the embeddings, the positives and its own scale and
    /// bias: with `train.contrastive_accum = "cached"` it runs once over
    /// the whole accumulated batch (`src/grad_cache.rs`).
    fn contrastive(&self) -> bool {
        true
    }

    fn forward(&self, fwd: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("siglip").entered();
        if fwd.momentum().is_some() {
            // The config check at build time catches this first; a forward
            // built with momentum by other means still gets a clear error.
            return Err(momentum_error(
                &format!("objectives.{}", self.name),
                "the run's `momentum` hook",
            ));
        }
        let (images, texts) = fwd.embeds()?;
        // Local images against every rank's texts: each (image, text) pair
        // of the global batch is scored on exactly one rank.
        let all_texts = match fwd.collective() {
            None => texts.shallow_clone(),
            Some(c) => c.all_gather_with_grad(texts)?,
        };
        let positives = fwd.positives()?;
        let logits = siglip_logits(images, &all_texts, &self.log_scale, &self.bias);
        let sum = siglip_loss_sum(&logits, &positives);
        let count = Tensor::full([], fwd.batch.len(), (Kind::Float, logits.device()));
        let loss = fwd.global_mean(&sum, &count)?;
        let metrics = tch::no_grad(|| {
            let best = logits.argmax(1, true);
            let top1 = positives
                .gather(1, &best, false)
                .to_kind(Kind::Float)
                .mean(Kind::Float);
            vec![
                (format!("{}_acc", self.name), top1),
                (format!("{}_scale", self.name), self.log_scale.exp()),
                (format!("{}_bias", self.name), self.bias.copy()),
            ]
        });
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), loss)],
            metrics,
        })
    }
}

/// `[objectives.<name>]` with momentum distillation on: `switch` is the key
/// that turned it on.
fn momentum_error(key: &str, switch: &str) -> vlmatch_core::Error {
    check::invalid(
        key,
        format!(
            "SigLIP has no momentum distillation, but {switch} turns it on; set \
             `momentum.enabled = false` (and drop `[hooks.momentum]`), or use \
             `[objectives.itc]` with `[momentum]`"
        ),
    )
}

/// The key that turns the `momentum` hook on, if one does: its own
/// `[hooks.momentum]` section (unless `enabled = false`), else
/// `momentum.enabled`, as the hook itself decides.
fn momentum_switch(config: &vlmatch_registry::Config) -> Option<&'static str> {
    match config.hooks.get("momentum") {
        Some(section) => section
            .enabled
            .unwrap_or(true)
            .then_some("`[hooks.momentum]`"),
        None => config
            .momentum
            .enabled
            .then_some("`momentum.enabled = true`"),
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let cfg: SiglipConfig = ctx.params()?;
    check::positive_f64(&format!("{}.init_scale", ctx.key), cfg.init_scale)?;
    check::finite(&format!("{}.init_bias", ctx.key), cfg.init_bias)?;
    if let Some(switch) = ctx.run_config().and_then(momentum_switch) {
        return Err(momentum_error(&ctx.key, switch));
    }
    let log_scale = ctx
        .path
        .var("logit_scale", &[], nn::Init::Const(cfg.init_scale.ln()));
    let bias = ctx
        .path
        .var("logit_bias", &[], nn::Init::Const(cfg.init_bias));
    if let Some(model) = ctx.model {
        model
            .contrastive
            .draw_negatives_with_scale(&log_scale, &ctx.key)?;
    }
    Ok(Box::new(Siglip {
        name: ctx.section_name().to_string(),
        log_scale,
        bias,
    }))
}
