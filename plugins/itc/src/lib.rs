//! ITC, the image-text contrastive loss (`shared/method.md`, ITC; ALBEF and
//! CLIP): symmetric cross-entropy over the batch's similarity matrix, where
//! every positive of a pair (`Batch::positives`: same image id, identical
//! caption or identical image) is a target and the target mass is spread
//! evenly over them.
//!
//! With momentum distillation (`[momentum]`, ALBEF), the similarities are
//! taken against `[momentum batch features; queue]` and the targets mix in
//! the momentum model's (`vlmatch_core::momentum`).
//!
//! Registered as objective `itc`. Loss key: the section name (`itc`).

use serde::Deserialize;
use tch::{Kind, Tensor};
use vlmatch_core::momentum::soft_targets;
use vlmatch_core::{Forward, MomentumContrast, Objective, ObjectiveOutput, Result};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(objective "itc" => build);

/// `[objectives.itc]` has only the registry's keys (`weight`, `plugin`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItcConfig {}

pub struct Itc {
    name: String,
}

/// The ITC loss for similarities `i2t` `[B, B]` and `positives` `[B, B]`
/// bool (row: image, column: text). Each direction spreads a row's target
/// evenly over that row's positives. (Normalising once and transposing, as
/// ALBEF does, is the same only when positives form groups; the pairwise
/// relation of `vlmatch_core::positives` need not.)
pub fn itc_loss(i2t: &Tensor, positives: &Tensor) -> Tensor {
    itc_loss_global(i2t, &i2t.tr(), positives, &positives.tr())
}

/// The ITC loss of local rows against the global batch: `i2t` `[B, G]`
/// (local images, global texts), `t2i` `[B, G]` (local texts, global
/// images) and their positives. Averaged over local rows: on `R` ranks of
/// equal batches the mean over ranks is the loss of the global batch.
pub fn itc_loss_global(i2t: &Tensor, t2i: &Tensor, i2t_pos: &Tensor, t2i_pos: &Tensor) -> Tensor {
    let direction = |sim: &Tensor, pos: &Tensor| {
        let pos = pos.to_kind(Kind::Float);
        let targets = &pos / pos.sum_dim_intlist(1, true, Kind::Float);
        -(sim.log_softmax(1, Kind::Float) * targets)
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float)
    };
    (direction(i2t, i2t_pos) + direction(t2i, t2i_pos)) / 2.0
}

/// The distilled ITC loss of ALBEF: each direction's cross-entropy against
/// [`soft_targets`] of the momentum similarities (`[B, C]` each, columns
/// `[momentum batch; queue]`) and the columns' `positives`.
pub fn itc_loss_distilled(c: &MomentumContrast, alpha: f64) -> Tensor {
    let direction = |sim: &Tensor, sim_m: &Tensor| {
        let targets = soft_targets(sim_m, &c.positives, alpha);
        -(sim.log_softmax(1, Kind::Float) * targets)
            .sum_dim_intlist(1, false, Kind::Float)
            .mean(Kind::Float)
    };
    (direction(&c.i2t, &c.i2t_m) + direction(&c.t2i, &c.t2i_m)) / 2.0
}

impl Objective for Itc {
    /// Reads only the embeddings, their similarities and the positives
    /// (momentum distillation, which is per micro-batch, is refused with
    /// `train.contrastive_accum = "cached"` by the config check).
    fn contrastive(&self) -> bool {
        true
    }

    fn forward(&self, fwd: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("itc").entered();
        let sim = fwd.similarity()?;
        // Local rows against the global batch; the relation is symmetric,
        // so texts' positives among the images are the same matrix.
        let positives = fwd.positives()?;
        let loss = match (fwd.momentum(), fwd.momentum_contrast()?) {
            (Some(m), Some(c)) => itc_loss_distilled(c, m.alpha()),
            _ => itc_loss_global(&sim.i2t, &sim.t2i, &positives, &positives),
        };
        let top1 = tch::no_grad(|| {
            let best = sim.i2t.argmax(1, true);
            positives
                .gather(1, &best, false)
                .to_kind(Kind::Float)
                .mean(Kind::Float)
        });
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), loss)],
            metrics: vec![(format!("{}_acc", self.name), top1)],
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let _: ItcConfig = ctx.params()?;
    Ok(Box::new(Itc {
        name: ctx.section_name().to_string(),
    }))
}
