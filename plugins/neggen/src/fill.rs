//! Step 3: refilling the masks piece by piece with a masked language model.

use tch::{Device, Kind, Tensor};
use vlmatch_core::{random, readback, Result, SpecialTokens, TextBatch};

use crate::plan::Plan;

/// Fill the masked spans of `plans` left to right, one piece per step, with
/// `logits_at(text, pos)` giving the `[R, V]` vocabulary logits of row `r`
/// of `text` (`[R, L]`: the plans still filling) at position `pos[r]`.
/// Returns the filled ids per plan. Plan `r`'s draw at step `t` is keyed
/// by `keys[r]` and `t` (`vlmatch_core::random`).
#[allow(clippy::too_many_arguments)]
pub fn fill(
    plans: &[Plan],
    keys: &[i64],
    special: SpecialTokens,
    masks: (&Tensor, &Tensor),
    temperature: f64,
    top_k: i64,
    device: Device,
    mut logits_at: impl FnMut(&TextBatch, &Tensor) -> Result<Tensor>,
) -> Result<Vec<Vec<i64>>> {
    let k = plans.len();
    let l = plans.iter().map(|p| p.ids.len()).max().unwrap_or(2);
    let mut flat = Vec::with_capacity(k * l);
    let mut attn = Vec::with_capacity(k * l);
    for p in plans {
        flat.extend(&p.ids);
        flat.extend(std::iter::repeat_n(special.pad, l - p.ids.len()));
        attn.extend(std::iter::repeat_n(1i64, p.ids.len()));
        attn.extend(std::iter::repeat_n(0i64, l - p.ids.len()));
    }
    let mut ids = Tensor::from_slice(&flat)
        .view([k as i64, l as i64])
        .to_device(device);
    let attn = Tensor::from_slice(&attn)
        .view([k as i64, l as i64])
        .to_device(device);
    // Per plan, its masked positions in order: (position, is first piece, original first piece).
    let steps: Vec<Vec<(usize, bool, i64)>> = plans
        .iter()
        .map(|p| {
            p.spans
                .iter()
                .flat_map(|&(_, start, n, orig)| (0..n).map(move |j| (start + j, j == 0, orig)))
                .collect()
        })
        .collect();
    let depth = steps.iter().map(Vec::len).max().unwrap_or(0);
    let (first_ok, cont_ok) = masks;
    for t in 0..depth {
        let rows: Vec<usize> = (0..k).filter(|&r| steps[r].len() > t).collect();
        let row_t = Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>())
            .to_device(device);
        let pos: Vec<i64> = rows.iter().map(|&r| steps[r][t].0 as i64).collect();
        let pos_t = Tensor::from_slice(&pos).to_device(device);
        // Only the plans still filling, and the head only where it is read:
        // `[R, V]`, not `[K, L, V]` (with a 30k vocabulary that is gigabytes).
        let active = TextBatch::new(ids.index_select(0, &row_t), attn.index_select(0, &row_t));
        let at = logits_at(&active, &pos_t)?.to_kind(Kind::Float);
        let v = at.size()[1];
        let is_first: Vec<bool> = rows.iter().map(|&r| steps[r][t].1).collect();
        let is_first_t = Tensor::from_slice(&is_first).to_device(device).unsqueeze(1);
        let mut allowed = first_ok
            .unsqueeze(0)
            .logical_and(&is_first_t)
            .logical_or(&cont_ok.unsqueeze(0).logical_and(&is_first_t.logical_not()));
        // The original word never comes back: its first piece is forbidden.
        let orig: Vec<i64> = rows.iter().map(|&r| steps[r][t].2).collect();
        let orig_t = Tensor::from_slice(&orig).to_device(device).view([-1, 1]);
        let forbid = orig_t
            .one_hot(v)
            .squeeze_dim(1)
            .to_kind(Kind::Bool)
            .logical_and(&is_first_t);
        allowed = allowed.logical_and(&forbid.logical_not());
        let mut scores =
            (at / temperature.max(1e-6)).masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
        if top_k > 0 && top_k < v {
            let (kth, _) = scores.topk(top_k, 1, true, true);
            let floor = kth.narrow(1, top_k - 1, 1);
            scores = scores.masked_fill(&scores.lt_tensor(&floor), f64::NEG_INFINITY);
        }
        let row_keys: Vec<i64> = rows.iter().map(|&r| keys[r]).collect();
        let row_keys = random::combine(
            &Tensor::from_slice(&row_keys).to_device(device),
            &Tensor::from(t as i64).to_device(device),
        );
        let u = random::uniform(&row_keys, 1).squeeze_dim(1);
        let drawn = random::categorical(&scores.softmax(1, Kind::Float), &u);
        let _ = ids.index_put_(&[Some(row_t), Some(pos_t)], &drawn, false);
    }
    let ids_v = readback::to_vec::<i64>(&ids)?;
    Ok((0..k).map(|r| ids_v[r * l..(r + 1) * l].to_vec()).collect())
}
