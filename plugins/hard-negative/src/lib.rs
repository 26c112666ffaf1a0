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
pub struct HardNegativeConfig {}

pub struct HardNegative;

/// For each row of `sim` `[B, G]` (local rows against the global batch), the
/// index of a column drawn with probability `softmax(row)` over columns that
/// are not `positives` (`[B, G]` bool), at the row's uniform `u` (`[B]`,
/// keyed draws: `vlmatch_core::random`). A row whose columns are all
/// positive gets -1.
pub fn sample_hard_negatives(sim: &Tensor, positives: &Tensor, u: &Tensor) -> Tensor {
    tch::no_grad(|| {
        // ALBEF adds 1e-5 so a column whose softmax underflows can still be drawn.
        let weights = sim.to_kind(Kind::Float).softmax(1, Kind::Float) + 1e-5;
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
        let u_text = random::uniform(&fwd.random_keys(), 1).squeeze_dim(1);
        let u_image = random::uniform(&fwd.random_keys(), 1).squeeze_dim(1);
        Ok(Negatives::InBatch {
            text_for_image: sample_hard_negatives(&i2t, &positives, &u_text),
            image_for_text: sample_hard_negatives(&t2i, &positives, &u_image),
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let _: HardNegativeConfig = ctx.params()?;
    Ok(Box::new(HardNegative))
}
