//! Token masking shared by MLM, VL-RTD and NegGen (BERT, Devlin et al. 2019;
//! ELECTRA, Clark et al. 2020). All functions work on `[B, L]` tensors on any
//! device. Random choices are keyed by row (`keys` `[B]` i64, from
//! `Forward::random_keys`) and position, so they do not depend on the
//! batch's split over ranks or its padding (`vlmatch_core::random`).
//! Losses return their numerator and count, for `Forward::global_mean`.

use tch::{Kind, Tensor};
use vlmatch_core::random::{combine, uniform};
use vlmatch_core::SpecialTokens;

/// `[B, L]` bool: real tokens that are not `[CLS]`, `[SEP]` or `[PAD]`.
pub fn maskable(ids: &Tensor, attention: &Tensor, special: SpecialTokens) -> Tensor {
    attention
        .to_kind(Kind::Bool)
        .logical_and(&ids.ne(special.cls))
        .logical_and(&ids.ne(special.sep))
        .logical_and(&ids.ne(special.pad))
}

/// Choose each maskable position independently with probability `ratio`.
pub fn choose_positions(
    ids: &Tensor,
    attention: &Tensor,
    special: SpecialTokens,
    ratio: f64,
    keys: &Tensor,
) -> Tensor {
    let draw = uniform(keys, ids.size()[1]).lt(ratio);
    draw.logical_and(&maskable(ids, attention, special))
}

/// BERT's corruption of chosen `positions`: `[MASK]` with probability
/// `mask_prob`, a uniformly random non-special token with probability
/// `random_prob`, the original token otherwise.
pub fn corrupt(
    ids: &Tensor,
    positions: &Tensor,
    special: SpecialTokens,
    vocab_size: i64,
    mask_prob: f64,
    random_prob: f64,
    keys: &Tensor,
) -> Tensor {
    let len = ids.size()[1];
    let r = uniform(keys, len);
    let to_mask = positions.logical_and(&r.lt(mask_prob));
    let to_random = positions
        .logical_and(&r.ge(mask_prob))
        .logical_and(&r.lt(mask_prob + random_prob));
    let random = (uniform(&combine(keys, &Tensor::from(1i64)), len) * vocab_size as f64)
        .floor()
        .to_kind(Kind::Int64)
        .clamp_max(vocab_size - 1);
    // A random draw that lands on a special token keeps the original instead.
    let is_special = random
        .eq(special.pad)
        .logical_or(&random.eq(special.cls))
        .logical_or(&random.eq(special.sep))
        .logical_or(&random.eq(special.mask))
        .logical_or(&random.eq(special.unk));
    let random = random.where_self(&is_special.logical_not(), ids);
    let out = ids.where_self(&to_random.logical_not(), &random);
    out.masked_fill(&to_mask, special.mask)
}

/// VL-RTD labels: 1.0 where `corrupted` differs from `original` on a real
/// token, 0.0 elsewhere (a sampled token equal to the original is original).
pub fn replaced_labels(original: &Tensor, corrupted: &Tensor, attention: &Tensor) -> Tensor {
    corrupted
        .ne_tensor(original)
        .logical_and(&attention.to_kind(Kind::Bool))
        .to_kind(Kind::Float)
}

/// Cross-entropy of `logits` `[B, L, V]` against `targets` `[B, L]` at
/// `positions` only, averaged over them (0 when there are none, without a
/// host sync).
pub fn masked_lm_loss(logits: &Tensor, targets: &Tensor, positions: &Tensor) -> Tensor {
    let (sum, count) = masked_lm_loss_parts(logits, targets, positions);
    sum / count.clamp_min(1.0)
}

/// [`masked_lm_loss`] as `(sum over positions, number of positions)`.
pub fn masked_lm_loss_parts(
    logits: &Tensor,
    targets: &Tensor,
    positions: &Tensor,
) -> (Tensor, Tensor) {
    let v = logits.size()[2];
    let per_token = logits
        .to_kind(Kind::Float)
        .view([-1, v])
        .cross_entropy_loss::<Tensor>(&targets.view([-1]), None, tch::Reduction::None, -100, 0.0);
    let w = positions.view([-1]).to_kind(Kind::Float);
    ((per_token * &w).sum(Kind::Float), w.sum(Kind::Float))
}

/// Binary cross-entropy of per-token `logits` `[B, L]` against `labels`,
/// averaged over real tokens (`attention` = 1).
pub fn token_bce_loss(logits: &Tensor, labels: &Tensor, attention: &Tensor) -> Tensor {
    let (sum, count) = token_bce_loss_parts(logits, labels, attention);
    sum / count.clamp_min(1.0)
}

/// [`token_bce_loss`] as `(sum over real tokens, number of real tokens)`.
pub fn token_bce_loss_parts(
    logits: &Tensor,
    labels: &Tensor,
    attention: &Tensor,
) -> (Tensor, Tensor) {
    let per_token = logits
        .to_kind(Kind::Float)
        .binary_cross_entropy_with_logits::<Tensor>(labels, None, None, tch::Reduction::None);
    let w = attention.to_kind(Kind::Float);
    ((per_token * &w).sum(Kind::Float), w.sum(Kind::Float))
}
