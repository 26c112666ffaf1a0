//! ITC, the image-text contrastive loss (`shared/method.md`, ITC; ALBEF and
//! CLIP): symmetric cross-entropy over the batch's similarity matrix, where
//! every caption sharing the image id is a positive and the target mass is
//! spread evenly over them.
//!
//! Registered as objective `itc`. Loss key: the section name (`itc`).

use serde::Deserialize;
use tch::{Kind, Tensor};
use vlmatch_core::{Forward, Objective, ObjectiveOutput, Result};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(objective "itc" => build);

/// `[objectives.itc]` has only the registry's keys (`weight`, `plugin`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItcConfig {}

pub struct Itc {
    name: String,
}

/// The ITC loss for similarities `i2t` `[B, B]` and `positives` `[B, B]` bool.
pub fn itc_loss(i2t: &Tensor, positives: &Tensor) -> Tensor {
    let pos = positives.to_kind(Kind::Float);
    let targets = &pos / pos.sum_dim_intlist(1, true, Kind::Float);
    let i2t_loss = -(i2t.log_softmax(1, Kind::Float) * &targets)
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float);
    let t2i = i2t.tr();
    let t2i_loss = -(t2i.log_softmax(1, Kind::Float) * targets.tr())
        .sum_dim_intlist(1, false, Kind::Float)
        .mean(Kind::Float);
    (i2t_loss + t2i_loss) / 2.0
}

impl Objective for Itc {
    fn forward(&self, fwd: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("itc").entered();
        let sim = fwd.similarity()?;
        let positives = fwd.batch.positives();
        let loss = itc_loss(&sim.i2t, &positives);
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
