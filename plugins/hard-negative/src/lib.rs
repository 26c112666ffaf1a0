//! In-batch hard negatives (ALBEF, Li et al. 2021, section 3.2): for each
//! image a text drawn with probability `softmax(s(I, .))` and for each text an
//! image drawn from `softmax(s(., T))`, with every positive of the pair
//! masked out (`Forward::positives`: same image id, and by default identical
//! captions and identical images too, so a duplicate caption, the most
//! similar text there is, is never drawn as a negative). In data-parallel
//! training the candidates are the global batch (BLIP), and draws are keyed
//! by sample, so the split over ranks does not change them. Sampling runs without gradient from the ITC similarities.
//!
//! Registered as negative sampler `hard_negative`.

use serde::Deserialize;
use tch::{Kind, Tensor};
use vlmatch_core::{random, NegativeSampler, Negatives, Result, SamplerInput};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(negative_sampler "hard_negative" => build);

/// `[samplers.<name>]` for `plugin = "hard_negative"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardNegativeConfig {
    /// Also never draw a candidate that ITC finds at least as similar as
    /// the row's own pair (a guard against captions that differ from the
    /// positive's but are still true of the image, which the positive
    /// relation cannot see). Off by default, as in ALBEF.
    #[serde(default)]
    pub similarity_guard: bool,
}

pub struct HardNegative {
    cfg: HardNegativeConfig,
}

/// For each row of `sim` `[B, G]` (local rows against the global batch), the
/// index of a column drawn with probability `softmax(row)` over columns that
/// are not `positives` (`[B, G]` bool), at the row's uniform `u` (`[B]`,
/// keyed draws: `vlmatch_core::random`). A row whose columns are all
/// positive gets -1. Non-finite similarities (a diverging step, which the
/// trainer will not apply) count as 0, so the draw stays a valid negative.
pub fn sample_hard_negatives(sim: &Tensor, positives: &Tensor, u: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let sim = sim.to_kind(Kind::Float);
        let sim = sim.where_scalarother(&sim.isfinite(), 0.0);
        // ALBEF adds 1e-5 so a column whose softmax underflows can still be drawn.
        let weights = sim.softmax(1, Kind::Float) + 1e-5;
        let weights = weights.masked_fill(positives, 0.0);
        let has_negative = positives.logical_not().any_dim(1, false);
        // Rows without a negative draw from uniform weights, then become -1.
        let safe = weights.where_self(&has_negative.unsqueeze(1), &weights.ones_like());
        let drawn = random::categorical(&safe, u);
        drawn.where_self(&has_negative, &drawn.full_like(-1))
    })
}

impl NegativeSampler for HardNegative {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let fwd = input.forward;
        let (i2t, t2i, positives) = fwd.negative_candidates()?;
        let (i2t_excluded, t2i_excluded) = if self.cfg.similarity_guard {
            let own = fwd.own_candidates().unsqueeze(1);
            let guard = |sim: &Tensor| {
                tch::no_grad(|| {
                    sim.ge_tensor(&sim.gather(1, &own, false))
                        .logical_or(&positives)
                })
            };
            (guard(&i2t), guard(&t2i))
        } else {
            (positives.shallow_clone(), positives.shallow_clone())
        };
        let u_text = random::uniform(&fwd.random_keys(), 1).squeeze_dim(1);
        let u_image = random::uniform(&fwd.random_keys(), 1).squeeze_dim(1);
        Ok(Negatives::InBatch {
            text_for_image: sample_hard_negatives(&i2t, &i2t_excluded, &u_text),
            image_for_text: sample_hard_negatives(&t2i, &t2i_excluded, &u_image),
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let cfg: HardNegativeConfig = ctx.params()?;
    Ok(Box::new(HardNegative { cfg }))
}
