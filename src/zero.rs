//! ZeRO stage 1 (`train.dist.shard_optimizer`): the collectives around a
//! sharded [`AdamW`].
//!
//! Each rank owns a contiguous range of the parameters' concatenation
//! ([`crate::optim::FlatLayout`]) and holds AdamW's moments for it alone.
//! A step is then, after backward:
//!
//! 1. the gradients reduce-scattered in buckets ([`clip_grad_norm`], first
//!    thing after backward in `step.rs`; the DDP reducer stands aside,
//!    [`Parallel::shard_gradients`]): round `k` packs every rank's `k`-th
//!    chunk of `train.dist.bucket_mb` of its range into one buffer of
//!    `world` chunks, and one reduce-scatter leaves each rank the sum of
//!    its own chunk, divided by the world size into its range of `.grad`
//!    (the rest of `.grad` keeps this rank's own gradients, which nothing
//!    reads). On NCCL that is `ncclReduceScatter`: half an all-reduce's
//!    traffic. libtorch 2.11's Gloo emulates it with an all-reduce of the
//!    buffer, so on CPUs it works but costs what the reducer's all-reduce
//!    costs. It runs after backward, not overlapped with it: the ranges
//!    are contiguous in parameter order, so every round needs gradients
//!    from the whole model (ARCHITECTURE.md, `dist/`, says why);
//! 2. the squared gradient norm of each rank's range summed over ranks (one
//!    small all-reduce: the global norm the guard and clipping see), and
//!    each rank's range clipped;
//! 3. the masked AdamW step on the rank's range, and the updated ranges
//!    all-gathered into every rank's parameters in the same chunks, before
//!    the hooks after the step (the momentum model's EMA) read them.
//!
//! Parameters without a gradient are treated as the reducer treats them:
//! one all-reduce of a flag per parameter says which ranks had one; where
//! none had, `.grad` stays undefined (AdamW leaves the parameter alone),
//! where some had, the others count as zeros.
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
use vlmatch_dist::to_core_error;

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
    p.shard_gradients();
    let rounds = optim
        .shard_parts()
        .map_or(0, |(layout, _, _, chunk)| rounds(layout, chunk));
    tracing::info!(
        rank = p.rank,
        world = p.world,
        optimizer_bytes = optim.state_bytes(),
        gradient_rounds = rounds,
        "optimizer state sharded"
    );
    Ok(())
}

/// Collectives per reduce-scatter or all-gather of the flat space: `chunk`
/// elements of each rank's range at a time.
fn rounds(layout: &FlatLayout, chunk: i64) -> i64 {
    (layout.max_part() + chunk - 1) / chunk
}

/// Elements per rank in round `k`: `chunk`, or what is left of the
/// largest range in the last round (ranges differ by at most one element,
/// so a round pads at most one per rank).
fn width(layout: &FlatLayout, chunk: i64, k: i64) -> i64 {
    (layout.max_part() - k * chunk).clamp(0, chunk)
}

/// Rank `rank`'s piece of round `k`: `[a, b)` in the flat space.
fn piece(layout: &FlatLayout, chunk: i64, k: i64, rank: usize) -> (i64, i64) {
    let (lo, hi) = layout.range(rank);
    let a = (lo + k * chunk).min(hi);
    (a, (a + chunk).min(hi))
}

/// Clips the gradients to `max_norm` and returns their norm before
/// clipping, as [`AdamW::clip_grad_norm`]. Sharded, the gradients are
/// first reduce-scattered here ([`Parallel::reduce_gradients`] left them
/// as backward computed them), then the norm is summed over the ranks'
/// ranges and each rank clips its range.
pub fn clip_grad_norm(par: Option<&Parallel>, optim: &mut AdamW, max_norm: f64) -> Result<Tensor> {
    match par.filter(|_| optim.is_sharded()) {
        None => Ok(optim.clip_grad_norm(max_norm)),
        Some(p) => {
            reduce_scatter_gradients(p, optim)?;
            clip_range(p, optim, max_norm)
        }
    }
}

/// Step 1 of the module: each rank's range of every `.grad` becomes its
/// mean over ranks.
fn reduce_scatter_gradients(p: &Parallel, optim: &AdamW) -> Result<()> {
    let Some((layout, rank, _, chunk)) = optim.shard_parts() else {
        return Ok(());
    };
    let params: Vec<&Tensor> = optim.parameters().map(|(_, t)| t).collect();
    let Some(like) = params.first().copied() else {
        return Ok(());
    };
    // Which parameters have a gradient on some rank (the reducer's flags).
    let local: Vec<f32> = params
        .iter()
        .map(|t| f32::from(u8::from(t.grad().defined())))
        .collect();
    let counts = p
        .collective()
        .all_reduce_sum(&Tensor::from_slice(&local).to_device(like.device()))?;
    if local.contains(&0.0) {
        let counts = Vec::<f32>::try_from(counts.to_device(Device::Cpu))?;
        for ((t, have), ranks) in params.iter().zip(&local).zip(&counts) {
            if *have == 0.0 && *ranks > 0.5 {
                // Another rank used it: this rank's zeros join the mean.
                vlmatch_dist::set_grad(t, &t.detach().zeros_like()).map_err(to_core_error)?;
            }
        }
    }
    let grads: Vec<Tensor> = params.iter().map(|t| t.grad()).collect();
    let flat = |i: usize| {
        Some(&grads[i])
            .filter(|g| g.defined())
            .map(|g| g.view([-1]))
    };
    let world = layout.world as f64;
    tch::no_grad(|| {
        for k in 0..rounds(layout, chunk) {
            let w = width(layout, chunk, k);
            let buffer: Vec<Tensor> = (0..layout.world)
                .map(|q| pack(layout, &flat, piece(layout, chunk, k, q), w, like))
                .collect();
            let mine = p.reduce_scatter_sum(&Tensor::cat(&buffer, 0))? / world;
            unpack(layout, &flat, piece(layout, chunk, k, rank), &mine);
        }
        Ok::<_, Error>(())
    })
}

/// Step 2 of the module: the global gradient norm from each rank's range
/// (a vector of one squared norm per parameter with a gradient, summed
/// over ranks: a parameter inside one rank's range gets exactly its
/// unsharded entry, one split between ranks the sum of its parts'), and
/// this rank's range clipped to `max_norm`.
fn clip_range(p: &Parallel, optim: &AdamW, max_norm: f64) -> Result<Tensor> {
    let Some((layout, rank, _, _)) = optim.shard_parts() else {
        return Err(Error::Config("clip_range needs a sharded optimizer".into()));
    };
    let (lo, hi) = layout.range(rank);
    let mine = layout.pieces(lo, hi);
    // After the reduce-scatter every rank has the same gradients defined.
    let grads: Vec<(usize, Tensor)> = (optim.parameters().enumerate())
        .map(|(i, (_, t))| (i, t.grad()))
        .filter(|(_, g)| g.defined())
        .collect();
    let Some(device) = grads.first().map(|(_, g)| g.device()) else {
        return Ok(Tensor::from(0f32));
    };
    let part = |i: usize, g: &Tensor| {
        (mine.iter().find(|(j, _, _)| *j == i))
            .map(|&(_, start, len)| g.view([-1]).narrow(0, start, len))
    };
    tch::no_grad(|| {
        let sq: Vec<Tensor> = grads
            .iter()
            .map(|(i, g)| match part(*i, g) {
                Some(own) => own.to_kind(Kind::Float).square().sum(Kind::Float),
                None => Tensor::zeros([], (Kind::Float, device)),
            })
            .collect();
        let norm = p
            .collective()
            .all_reduce_sum(&Tensor::stack(&sq, 0))?
            .sum(Kind::Float)
            .sqrt()
            .to_device(device);
        if max_norm > 0.0 {
            let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
            for (i, g) in &grads {
                if let Some(mut own) = part(*i, g) {
                    let _ = own.g_mul_(&coef);
                }
            }
        }
        Ok::<_, Error>(norm)
    })
}

/// The elements of the flat range `[a, b)`, packed and padded with zeros
/// to `width`; `flat(i)` is parameter `i`'s tensor flattened (`None`:
/// zeros).
fn pack(
    layout: &FlatLayout,
    flat: &dyn Fn(usize) -> Option<Tensor>,
    (a, b): (i64, i64),
    width: i64,
    like: &Tensor,
) -> Tensor {
    let mut parts: Vec<Tensor> = layout
        .pieces(a, b)
        .into_iter()
        .map(|(i, start, len)| match flat(i) {
            Some(t) => t.narrow(0, start, len),
            None => Tensor::zeros([len], (like.kind(), like.device())),
        })
        .collect();
    if b - a < width {
        parts.push(Tensor::zeros(
            [width - (b - a)],
            (like.kind(), like.device()),
        ));
    }
    Tensor::cat(&parts, 0)
}

/// Copies `values` (the flat range `[a, b)`) into the tensors `flat`
/// gives (skipping `None`).
fn unpack(
    layout: &FlatLayout,
    flat: &dyn Fn(usize) -> Option<Tensor>,
    (a, b): (i64, i64),
    values: &Tensor,
) {
    let mut at = 0;
    for (i, start, len) in layout.pieces(a, b) {
        if let Some(t) = flat(i) {
            t.narrow(0, start, len).copy_(&values.narrow(0, at, len));
        }
        at += len;
    }
}

/// Parameter `i` of `params`, detached and flattened (a view).
fn flat_param<'a>(params: &'a [&'a Tensor]) -> impl Fn(usize) -> Option<Tensor> + 'a {
    |i| Some(params[i].detach().view([-1]))
}

/// All-gathers what each rank holds of the flat space, in rounds of
/// `chunk` elements per rank (the last round fewer, [`width`]):
/// `local(offset, len, width)` gives this rank's `len` elements from
/// `offset` in its range, padded to `width`; `sink(rank, (a, b), values)`
/// receives every rank's elements of the flat range `[a, b)`.
fn gather_ranges(
    p: &Parallel,
    layout: &FlatLayout,
    chunk: i64,
    local: impl Fn(i64, i64, i64) -> Tensor,
    mut sink: impl FnMut(usize, (i64, i64), &Tensor),
) -> Result<()> {
    let collective = p.collective();
    for k in 0..rounds(layout, chunk) {
        let w = width(layout, chunk, k);
        let (lo, _) = layout.range(p.rank);
        let (a, b) = piece(layout, chunk, k, p.rank);
        let mine = local(a - lo, b - a, w);
        let all = collective.all_gather(&mine)?;
        for rank in 0..layout.world {
            let (a, b) = piece(layout, chunk, k, rank);
            sink(rank, (a, b), &all.narrow(0, rank as i64 * w, b - a));
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
    let flat = flat_param(&params);
    tch::no_grad(|| {
        let (lo, _) = layout.range(rank);
        gather_ranges(
            p,
            layout,
            chunk,
            |off, len, w| pack(layout, &flat, (lo + off, lo + off + len), w, like),
            |from, range, values| {
                if from != rank {
                    unpack(layout, &flat, range, values);
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
            let targets = flat_param(&targets);
            gather_ranges(
                p,
                layout,
                chunk,
                |off, len, w| {
                    let own = flat.narrow(0, off, len);
                    match w - len {
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
