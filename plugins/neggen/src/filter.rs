//! Step 4: the filters a generated candidate must pass.

use tch::{Kind, Tensor};
use vlmatch_core::{readback, EncoderInput, Forward, Result, TextCodec};

use crate::config::NegGenConfig;
use crate::par::par_map;
use crate::plan::Plan;
use crate::tagging::{replacements_keep_their_kind, PosTagger};

/// Generated candidates: candidate `i` fills `plans[i]` for caption
/// `owners[i]` of the batch, giving `texts[i]`.
#[derive(Clone, Copy)]
pub(crate) struct Filled<'a> {
    pub owners: &'a [usize],
    pub plans: &'a [Plan],
    pub texts: &'a [String],
}

/// Which of the candidates `texts` (filled from `plans`, candidate `i` for
/// caption `owners[i]` of `fwd`'s batch) pass, and their ITM match
/// probabilities where the ITM filter applied. A candidate is dropped when
/// it is a caption of a positive of its image (the batch's positive
/// relation, `vlmatch_core::positives`), when a replacement is not the
/// same kind of word (`pos_check`), and from `filter_after_steps` on when
/// its ITM match probability is above `filter_threshold`.
pub(crate) fn filter(
    fwd: &Forward<'_>,
    cfg: &NegGenConfig,
    tagger: &dyn PosTagger,
    codec: &dyn TextCodec,
    filled: Filled<'_>,
    step: i64,
) -> Result<(Vec<bool>, Vec<Option<f64>>)> {
    let Filled {
        owners,
        plans,
        texts,
    } = filled;
    let batch = fwd.batch;
    let model = fwd.model;
    let device = batch.text.ids.device();
    let owner_index =
        Tensor::from_slice(&owners.iter().map(|&o| o as i64).collect::<Vec<_>>()).to_device(device);
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encoded = codec.encode(&refs, device);
    let true_of_image = readback::to_vec::<bool>(&batch.text_is_positive(&owner_index, &encoded))?;
    // The POS check tags every candidate: spread over threads.
    let kinds_kept: Vec<bool> = if cfg.pos_check {
        let (tagger, tags) = (tagger, &cfg.tags);
        par_map(plans, |i, p| {
            let masked: Vec<usize> = p.spans.iter().map(|&(w, ..)| w).collect();
            replacements_keep_their_kind(&texts[i], &masked, tagger, tags)
        })
    } else {
        vec![true; plans.len()]
    };
    let mut keep: Vec<bool> = true_of_image
        .iter()
        .zip(kinds_kept)
        .map(|(&positive, kind_kept)| kind_kept && !positive)
        .collect();
    let mut itm = vec![None; texts.len()];
    if step >= cfg.filter_after_steps {
        let probs = tch::no_grad(|| -> Result<Vec<f64>> {
            let states = model.text.forward_t(EncoderInput::Text(&encoded), false)?;
            // Each image's candidates share its cross-attention keys and
            // values (fused by index, not on gathered copies).
            let image = fwd.image()?;
            let image = vlmatch_core::Encoded {
                hidden: image.hidden.detach(),
                mask: image.mask.shallow_clone(),
            };
            let fused = model.fuse_cls_indexed(&states, &image, &owner_index, false)?;
            let p = model
                .discriminator
                .pair_logits(&fused)?
                .softmax(1, Kind::Float)
                .select(1, 1);
            readback::to_vec::<f64>(&p.to_kind(Kind::Double))
        })?;
        for ((k, p), slot) in keep.iter_mut().zip(probs).zip(&mut itm) {
            *k = *k && p <= cfg.filter_threshold;
            *slot = Some(p);
        }
    }
    Ok((keep, itm))
}
