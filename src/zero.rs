//! ZeRO stage 1 (`train.dist.shard_optimizer`): the collectives around a
//! sharded [`AdamW`].
//!
//! Each rank owns a contiguous range of the parameters' concatenation
//! ([`crate::optim::FlatLayout`]) and holds AdamW's moments for it alone.
//! A step is then: gradients averaged over ranks by the bucketed reducer
//! (Gloo in libtorch 2.11 has no native reduce-scatter and emulates it with
//! an all-reduce, which is what the reducer issues; every rank then reads
//! only its range), the squared gradient norm of each rank's range summed
//! over ranks (one scalar all-reduce: the global norm the guard and
//! clipping see), the masked AdamW step on the rank's range, and the
//! updated ranges all-gathered into every rank's parameters, in chunks of
//! `train.dist.bucket_mb`, before the hooks after the step (the momentum
//! model's EMA) read them.
//!
//! Checkpoints hold the whole state: [`full_state`] gathers every rank's
//! moments onto rank 0 before it writes, and on resume rank 0's whole
//! moments reach each rank's range through [`share_state`]; so a sharded
//! run resumes unsharded, on another rank count, and the other way round.

use std::collections::HashMap;

use tch::{Device, Kind, Tensor};
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::TrainConfig;

use crate::optim::{AdamW, FlatLayout};
use crate::parallel::Parallel;

/// Shards `optim` over the ranks of `par` when `train.dist.shard_optimizer`
/// is on (one process keeps it whole).
pub fn shard(par: Option<&Parallel>, optim: &mut AdamW, tc: &TrainConfig) -> Result<()> {
    let Some(p) = par.filter(|_| tc.dist.shard_optimizer) else {
        return Ok(());
    };
    let chunk = (tc.dist.bucket_mb * 1024.0 * 1024.0) as usize;
    optim
        .shard(p.rank, p.world, chunk)
        .map_err(|e| Error::Config(format!("train.dist.shard_optimizer: {e}")))?;
    tracing::info!(
        rank = p.rank,
        world = p.world,
        optimizer_bytes = optim.state_bytes(),
        "optimizer state sharded"
    );
    Ok(())
}

/// Clips the gradients to `max_norm` and returns their norm before
/// clipping: over ranks when `optim` is sharded (each rank's squared norm
/// of its range, summed by an all-reduce), else as [`AdamW::clip_grad_norm`].
pub fn clip_grad_norm(par: Option<&Parallel>, optim: &mut AdamW, max_norm: f64) -> Result<Tensor> {
    match par.filter(|_| optim.is_sharded()) {
        None => Ok(optim.clip_grad_norm(max_norm)),
        Some(p) => optim.clip_grad_norm_over(max_norm, |sq| p.collective().all_reduce_sum(&sq)),
    }
}

/// `f(param)`'s elements in the flat range `[a, b)`, packed and padded
/// with zeros to `width`.
fn pack(
    layout: &FlatLayout,
    params: &[&Tensor],
    (a, b): (i64, i64),
    width: i64,
    like: &Tensor,
) -> Tensor {
    let mut parts: Vec<Tensor> = layout
        .pieces(a, b)
        .into_iter()
        .map(|(i, start, len)| params[i].detach().view([-1]).narrow(0, start, len))
        .collect();
    if b - a < width {
        parts.push(Tensor::zeros(
            [width - (b - a)],
            (like.kind(), like.device()),
        ));
    }
    Tensor::cat(&parts, 0)
}

/// Copies `values` (the flat range `[a, b)`) into `params`.
fn unpack(layout: &FlatLayout, params: &[&Tensor], (a, b): (i64, i64), values: &Tensor) {
    let mut at = 0;
    for (i, start, len) in layout.pieces(a, b) {
        let mut target = params[i].detach().view([-1]).narrow(0, start, len);
        target.copy_(&values.narrow(0, at, len));
        at += len;
    }
}

/// All-gathers what each rank holds of the flat space, in rounds of
/// `chunk` elements per rank: `local(offset, len)` gives this rank's
/// elements from `offset` in its range; `sink(rank, (a, b), values)`
/// receives every rank's elements of the flat range `[a, b)`.
fn gather_ranges(
    p: &Parallel,
    layout: &FlatLayout,
    chunk: i64,
    local: impl Fn(i64, i64) -> Tensor,
    mut sink: impl FnMut(usize, (i64, i64), &Tensor),
) -> Result<()> {
    let rounds = (layout.max_part() + chunk - 1) / chunk;
    let collective = p.collective();
    for k in 0..rounds {
        let piece = |rank: usize| {
            let (lo, hi) = layout.range(rank);
            let a = (lo + k * chunk).min(hi);
            (a, (a + chunk).min(hi))
        };
        let (lo, _) = layout.range(p.rank);
        let (a, b) = piece(p.rank);
        let mine = local(a - lo, b - a);
        let all = collective.all_gather(&mine)?;
        for rank in 0..layout.world {
            let (a, b) = piece(rank);
            sink(rank, (a, b), &all.narrow(0, rank as i64 * chunk, b - a));
        }
    }
    Ok(())
}

/// After a sharded step: every rank's updated range of the parameters to
/// every rank. Nothing to do unsharded.
pub fn gather_parameters(par: Option<&Parallel>, optim: &AdamW) -> Result<()> {
    let (Some(p), Some((layout, rank, _, chunk))) = (par, optim.shard_parts()) else {
        return Ok(());
    };
    let params: Vec<&Tensor> = optim.parameters().map(|(_, t)| t).collect();
    let like = params[0];
    tch::no_grad(|| {
        let (lo, _) = layout.range(rank);
        gather_ranges(
            p,
            layout,
            chunk,
            |off, len| pack(layout, &params, (lo + off, lo + off + len), chunk, like),
            |from, range, values| {
                if from != rank {
                    unpack(layout, &params, range, values);
                }
            },
        )
    })
}

/// The whole optimizer state as [`AdamW::state`] names it: on one process
/// and unsharded, the optimizer's own; sharded, every rank's moments
/// gathered onto rank 0 (every rank must call this; the others get
/// `None`, and hold no more than one chunk of it at a time).
pub fn full_state(par: Option<&Parallel>, optim: &AdamW) -> Result<Option<Vec<(String, Tensor)>>> {
    let (Some(p), Some((layout, _, (m, v), chunk))) = (par, optim.shard_parts()) else {
        return Ok(Some(optim.state()));
    };
    let main = p.is_main();
    let whole = || -> Vec<Tensor> {
        match main {
            true => optim
                .parameters()
                .map(|(_, t)| t.detach().zeros_like())
                .collect(),
            false => Vec::new(),
        }
    };
    let (full_m, full_v) = (whole(), whole());
    tch::no_grad(|| {
        for (flat, full) in [(m, &full_m), (v, &full_v)] {
            let targets: Vec<&Tensor> = full.iter().collect();
            gather_ranges(
                p,
                layout,
                chunk,
                |off, len| {
                    let own = flat.narrow(0, off, len);
                    match chunk - len {
                        0 => own.contiguous(),
                        pad => Tensor::cat(
                            &[own, flat.new_zeros([pad], (flat.kind(), flat.device()))],
                            0,
                        ),
                    }
                },
                |_, range, values| {
                    if main {
                        unpack(layout, &targets, range, values);
                    }
                },
            )?;
        }
        Ok::<_, Error>(())
    })?;
    if !main {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(2 * full_m.len() + 1);
    for ((name, _), (fm, fv)) in optim.parameters().zip(full_m.into_iter().zip(full_v)) {
        out.push((format!("m.{name}"), fm));
        out.push((format!("v.{name}"), fv));
    }
    out.push(("t".to_string(), Tensor::from(optim.applied_steps())));
    Ok(Some(out))
}

/// On resume of a sharded optimizer: rank 0's whole moments (`saved`, as
/// it read them; `None` on the other ranks) broadcast in chunks of
/// parameters, each rank keeping its range. Rank 0 has loaded its own
/// part already.
pub fn share_state(
    p: &Parallel,
    optim: &mut AdamW,
    saved: Option<&HashMap<String, Tensor>>,
    device: Device,
) -> Result<()> {
    let Some((_, _, _, chunk)) = optim.shard_parts() else {
        return Err(Error::Config(
            "share_state needs a sharded optimizer".into(),
        ));
    };
    let names: Vec<(String, Vec<i64>, Kind)> = optim
        .parameters()
        .map(|(n, t)| (n.to_string(), t.size(), t.kind()))
        .collect();
    let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
    let mut elems = 0i64;
    for (i, (_, size, _)) in names.iter().enumerate() {
        let n: i64 = 2 * size.iter().product::<i64>();
        if elems + n > chunk && !groups.last().is_some_and(Vec::is_empty) {
            groups.push(Vec::new());
            elems = 0;
        }
        groups.last_mut().expect("a group").push(i);
        elems += n;
    }
    for group in groups.iter().filter(|g| !g.is_empty()) {
        let mut keys = Vec::new();
        let mut tensors = Vec::new();
        for &i in group {
            let (name, size, kind) = &names[i];
            for prefix in ["m", "v"] {
                let key = format!("{prefix}.{name}");
                let t = match saved.and_then(|s| s.get(&key)) {
                    Some(t) => t.to_device(device).to_kind(*kind).contiguous(),
                    None => Tensor::empty(size.as_slice(), (*kind, device)),
                };
                keys.push(key);
                tensors.push(t);
            }
        }
        p.broadcast(&tensors)?;
        if !p.is_main() {
            let part: HashMap<String, Tensor> = keys.into_iter().zip(tensors).collect();
            optim
                .load_moments(&part, false)
                .map_err(|e| Error::Config(format!("optimizer state: {e}")))?;
        }
    }
    Ok(())
}
