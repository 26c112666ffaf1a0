//! Image-conditioned masked language modelling, the baseline's third loss
//! (ALBEF; `shared/method.md`, Total): 15% of the non-special tokens are
//! chosen, 80/10/10 masked/randomised/kept, and predicted from the fusion
//! encoder's states (text encoder, then cross-attention to the image) by the
//! model's generator head.
//!
//! With momentum distillation (`[momentum]`, ALBEF), the loss is `(1 -
//! alpha) * CE(hard) + alpha * CE(soft)`, the soft targets the momentum
//! model's predictions for the same corrupted caption and image.
//!
//! Registered as objective `mlm`. Loss key: the section name; metric
//! `<name>_acc` (accuracy on the chosen positions).

use serde::Deserialize;
use tch::{Kind, Tensor};
use vlmatch_core::{
    EncoderInput, Error, Forward, Objective, ObjectiveOutput, Result, SpecialTokens, TextBatch,
};
use vlmatch_layers::masking;
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(objective "mlm" => build);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlmConfig {
    #[serde(default = "ratio")]
    pub mask_ratio: f64,
    #[serde(default = "mask_prob")]
    pub mask_prob: f64,
    #[serde(default = "random_prob")]
    pub random_prob: f64,
}

fn ratio() -> f64 {
    0.15
}
fn mask_prob() -> f64 {
    0.8
}
fn random_prob() -> f64 {
    0.1
}

pub struct Mlm {
    name: String,
    cfg: MlmConfig,
    special: SpecialTokens,
    vocab_size: i64,
}

impl Objective for Mlm {
    fn forward(&self, fwd: &Forward<'_>, _step: i64) -> Result<ObjectiveOutput> {
        let _span = tracing::trace_span!("mlm").entered();
        let generator = fwd.generator(&self.name)?;
        let text = &fwd.batch.text;
        let (choose_keys, corrupt_keys) = (fwd.random_keys(), fwd.random_keys());
        let (positions, corrupted) = tch::no_grad(|| {
            let positions = masking::choose_positions(
                &text.ids,
                &text.mask,
                self.special,
                self.cfg.mask_ratio,
                &choose_keys,
            );
            let corrupted = masking::corrupt(
                &text.ids,
                &positions,
                self.special,
                self.vocab_size,
                self.cfg.mask_prob,
                self.cfg.random_prob,
                &corrupt_keys,
            );
            (positions, corrupted)
        });
        let masked = TextBatch::new(corrupted, text.mask.shallow_clone());
        let states = fwd
            .model
            .text
            .forward_t(EncoderInput::Text(&masked), fwd.train)?;
        let fused = fwd.model.fuse(&states, fwd.image()?, fwd.train)?;
        let logits = generator.logits(&fused, fwd.train)?;
        // Averaged over the masked tokens of the global batch.
        let (sum, count) = masking::masked_lm_loss_parts(&logits, &text.ids, &positions);
        let mut loss = fwd.global_mean(&sum, &count)?;
        if let (Some(m), Some(image_m)) = (fwd.momentum(), fwd.momentum_image()?) {
            let soft = tch::no_grad(|| -> Result<Tensor> {
                let generator_m = m.model.generator.as_ref().ok_or_else(|| {
                    Error::plugin(&self.name, "the momentum model has no MLM generator")
                })?;
                let states_m = m
                    .model
                    .text
                    .forward_t(EncoderInput::Text(&masked), fwd.train)?;
                let fused_m = m.model.fuse(&states_m, image_m, fwd.train)?;
                Ok(generator_m
                    .logits(&fused_m, fwd.train)?
                    .softmax(-1, Kind::Float))
            })?;
            let per_token = -(logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float) * soft)
                .sum_dim_intlist(-1, false, Kind::Float);
            let distill_sum = (per_token * positions.to_kind(Kind::Float)).sum(Kind::Float);
            let distill = fwd.global_mean(&distill_sum, &count)?;
            loss = loss * (1.0 - m.alpha()) + distill * m.alpha();
        }
        let acc = tch::no_grad(|| {
            let w = positions.to_kind(Kind::Float);
            let hit = logits
                .argmax(-1, false)
                .eq_tensor(&text.ids)
                .to_kind(Kind::Float);
            (hit * &w).sum(Kind::Float) / w.sum(Kind::Float).clamp_min(1.0)
        });
        Ok(ObjectiveOutput {
            losses: vec![(self.name.clone(), loss)],
            metrics: vec![(format!("{}_acc", self.name), acc)],
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let cfg: MlmConfig = ctx.params()?;
    check_probabilities(&ctx.key, cfg.mask_ratio, cfg.mask_prob, cfg.random_prob)?;
    Ok(Box::new(Mlm {
        name: ctx.section_name().to_string(),
        cfg,
        special: ctx.env.special,
        vocab_size: ctx.env.vocab_size,
    }))
}

fn check_probabilities(key: &str, ratio: f64, mask: f64, random: f64) -> Result<()> {
    use vlmatch_registry::check;
    check::probability(&format!("{key}.mask_ratio"), ratio)?;
    check::probability(&format!("{key}.mask_prob"), mask)?;
    check::probability(&format!("{key}.random_prob"), random)?;
    if mask + random > 1.0 {
        return Err(check::invalid(
            &format!("{key}.random_prob"),
            format!("mask_prob + random_prob must be at most 1, got {mask} + {random}"),
        ));
    }
    Ok(())
}
