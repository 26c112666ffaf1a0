//! AdamW (Loshchilov & Hutter, ICLR 2019) over a `VarStore`, with state held
//! in tensors we own so that checkpoints save and restore it exactly (tch's
//! `nn::Optimizer` cannot). Weight decay skips biases, norms and scalars:
//! every parameter with fewer than two dimensions.

use std::collections::HashMap;
use tch::{nn, Kind, Tensor};

struct Param {
    name: String,
    value: Tensor,
    decay: bool,
}

/// Moments of one parameter, or of this rank's part of it (`part`: first
/// element and length in the flattened parameter) when sharded.
struct Slot {
    param: usize,
    part: Option<(i64, i64)>,
    m: Tensor,
    v: Tensor,
}

/// Where each parameter lies in the concatenation of all of them, each
/// flattened, in the optimizer's order (parameter names sorted), and which
/// contiguous range of it each of `world` ranks owns: rank `r` owns
/// `[total * r / world, total * (r + 1) / world)`, so parts differ by at
/// most one element.
#[derive(Debug, Clone)]
pub struct FlatLayout {
    offsets: Vec<i64>,
    pub world: usize,
}

impl FlatLayout {
    pub fn new(numels: impl IntoIterator<Item = i64>, world: usize) -> FlatLayout {
        let mut offsets = vec![0];
        for n in numels {
            offsets.push(offsets.last().copied().unwrap_or(0) + n);
        }
        FlatLayout { offsets, world }
    }

    /// Elements of all parameters together.
    pub fn total(&self) -> i64 {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Rank `rank`'s range `[lo, hi)`.
    pub fn range(&self, rank: usize) -> (i64, i64) {
        let (t, w) = (self.total() as i128, self.world as i128);
        let at = |r: usize| (t * r as i128 / w) as i64;
        (at(rank), at(rank + 1))
    }

    /// The largest part a rank owns.
    pub fn max_part(&self) -> i64 {
        (0..self.world)
            .map(|r| {
                let (lo, hi) = self.range(r);
                hi - lo
            })
            .max()
            .unwrap_or(0)
    }

    /// The parameters' pieces in `[a, b)`: (parameter, first element in
    /// it, length), in order.
    pub fn pieces(&self, a: i64, b: i64) -> Vec<(usize, i64, i64)> {
        let mut out = Vec::new();
        for i in 0..self.offsets.len().saturating_sub(1) {
            let (lo, hi) = (self.offsets[i].max(a), self.offsets[i + 1].min(b));
            if lo < hi {
                out.push((i, lo - self.offsets[i], hi - lo));
            }
        }
        out
    }
}

/// This rank's share of a sharded optimizer.
struct Shard {
    rank: usize,
    layout: FlatLayout,
    /// The moments of this rank's range, flat; each slot's are views.
    m: Tensor,
    v: Tensor,
    /// Elements per rank and all-gather when parameters or moments travel.
    chunk: i64,
}

pub struct AdamW {
    params: Vec<Param>,
    slots: Vec<Slot>,
    shard: Option<Shard>,
    betas: (f64, f64),
    eps: f64,
    weight_decay: f64,
    /// Steps taken so far, applied or masked out.
    pub t: i64,
    /// Steps masked out by [`AdamW::step_masked`] (an i64 scalar on the
    /// parameters' device, so that masking needs no host read). Bias
    /// correction counts `t - skipped` updates, as if the masked steps had
    /// not been taken.
    skipped: Option<Tensor>,
}

/// `t`'s flattened elements `[start, start + len)`, sharing its storage.
fn flat_part(t: &Tensor, part: Option<(i64, i64)>) -> Tensor {
    match part {
        None => t.shallow_clone(),
        Some((start, len)) => t.view([-1]).narrow(0, start, len),
    }
}

impl AdamW {
    pub fn new(vs: &nn::VarStore, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params: Vec<Param> = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, value)| Param {
                decay: value.dim() >= 2,
                name,
                value,
            })
            .collect();
        let slots = params
            .iter()
            .enumerate()
            .map(|(i, p)| Slot {
                param: i,
                part: None,
                m: p.value.zeros_like(),
                v: p.value.zeros_like(),
            })
            .collect();
        AdamW {
            params,
            slots,
            shard: None,
            betas,
            eps,
            weight_decay,
            t: 0,
            skipped: None,
        }
    }

    /// ZeRO stage 1: from now on this optimizer keeps the moments of rank
    /// `rank`'s part of the parameters only ([`FlatLayout`]; zero, as
    /// fresh) and steps only that part; the caller all-gathers the updated
    /// parameters after each step (`crate::zero`). `chunk_bytes` bounds
    /// what travels per collective. Needs contiguous parameters of one
    /// dtype, none sharing storage with another.
    pub fn shard(&mut self, rank: usize, world: usize, chunk_bytes: usize) -> Result<(), String> {
        let Some(first) = self.params.first() else {
            return Ok(());
        };
        let (kind, device) = (first.value.kind(), first.value.device());
        let mut seen = HashMap::new();
        for p in &self.params {
            if p.value.kind() != kind || p.value.device() != device {
                return Err(format!(
                    "parameter `{}` is {:?} on {:?}, `{}` {kind:?} on {device:?}: a sharded \
                     optimizer needs one dtype and device",
                    p.name,
                    p.value.kind(),
                    p.value.device(),
                    first.name
                ));
            }
            if !p.value.is_contiguous() {
                return Err(format!("parameter `{}` is not contiguous", p.name));
            }
            if p.value.numel() > 0 {
                if let Some(other) = seen.insert(p.value.data_ptr() as usize, &p.name) {
                    return Err(format!(
                        "parameters `{other}` and `{}` share storage",
                        p.name
                    ));
                }
            }
        }
        let layout = FlatLayout::new(self.params.iter().map(|p| p.value.numel() as i64), world);
        let (lo, hi) = layout.range(rank);
        let m = Tensor::zeros([hi - lo], (kind, device));
        let v = Tensor::zeros([hi - lo], (kind, device));
        let mut at = 0;
        self.slots = layout
            .pieces(lo, hi)
            .into_iter()
            .map(|(param, start, len)| {
                let slot = Slot {
                    param,
                    part: Some((start, len)),
                    m: m.narrow(0, at, len),
                    v: v.narrow(0, at, len),
                };
                at += len;
                slot
            })
            .collect();
        let chunk = (chunk_bytes / kind.elt_size_in_bytes()).max(1) as i64;
        self.shard = Some(Shard {
            rank,
            layout,
            m,
            v,
            chunk,
        });
        Ok(())
    }

    /// Whether [`AdamW::shard`] split the state over ranks.
    pub fn is_sharded(&self) -> bool {
        self.shard.is_some()
    }

    /// When sharded: the layout, this rank, its flat moments `(m, v)` and
    /// the elements per collective.
    pub fn shard_parts(&self) -> Option<(&FlatLayout, usize, (&Tensor, &Tensor), i64)> {
        self.shard
            .as_ref()
            .map(|s| (&s.layout, s.rank, (&s.m, &s.v), s.chunk))
    }

    /// The parameters, in the optimizer's (and [`FlatLayout`]'s) order.
    pub fn parameters(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.params.iter().map(|p| (p.name.as_str(), &p.value))
    }

    /// Bytes of optimizer moments this rank holds.
    pub fn state_bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| 2 * s.m.numel() * s.m.kind().elt_size_in_bytes())
            .sum()
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut g = p.value.grad();
            if g.defined() {
                let _ = g.detach_().zero_();
            }
        }
    }

    /// Scale gradients so their global L2 norm is at most `max_norm`; returns
    /// the norm before clipping as a scalar tensor (no host sync).
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Tensor {
        match self.shard {
            None => self.clip_whole(max_norm),
            // Sharded over one rank: its sum is the sum over ranks.
            Some(_) => self
                .clip_grad_norm_over(max_norm, Ok::<_, ()>)
                .unwrap_or_else(|()| Tensor::from(f32::NAN)),
        }
    }

    fn clip_whole(&mut self, max_norm: f64) -> Tensor {
        tch::no_grad(|| {
            let grads: Vec<Tensor> = self
                .params
                .iter()
                .map(|p| p.value.grad())
                .filter(Tensor::defined)
                .collect();
            let Some(first) = grads.first() else {
                return Tensor::from(0f32);
            };
            let sq: Vec<Tensor> = grads
                .iter()
                .map(|g| g.to_kind(Kind::Float).square().sum(Kind::Float))
                .collect();
            let norm = Tensor::stack(&sq, 0)
                .sum(Kind::Float)
                .sqrt()
                .to_device(first.device());
            if max_norm > 0.0 {
                let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
                for mut g in grads {
                    let _ = g.g_mul_(&coef);
                }
            }
            norm
        })
    }

    /// [`AdamW::clip_grad_norm`] of a sharded optimizer whose every rank
    /// holds the whole averaged gradients (one process, and this module's
    /// tests; a multi-rank ZeRO-1 run reduce-scatters them instead and
    /// clips in `zero::clip_grad_norm`), the parameters' squared norms
    /// summed over ranks by `sum_over_ranks` (an all-reduce of a vector
    /// with one entry per parameter that has a gradient, the same
    /// parameters on every rank). Each parameter's entry comes from the
    /// rank that owns its first element and is 0 on the others, so the sum
    /// is exact and the norm bit for bit the unsharded one; each rank then
    /// scales its own part. Unsharded, `sum_over_ranks` is not called.
    pub fn clip_grad_norm_over<E>(
        &mut self,
        max_norm: f64,
        sum_over_ranks: impl FnOnce(Tensor) -> Result<Tensor, E>,
    ) -> Result<Tensor, E> {
        if self.shard.is_none() {
            return Ok(self.clip_whole(max_norm));
        }
        tch::no_grad(|| {
            let grads: Vec<(usize, Tensor)> = (self.params.iter().enumerate())
                .map(|(i, p)| (i, p.value.grad()))
                .filter(|(_, g)| g.defined())
                .collect();
            let Some(device) = grads.first().map(|(_, g)| g.device()) else {
                return Ok(Tensor::from(0f32));
            };
            let first_owned = |i: usize| {
                self.slots
                    .iter()
                    .any(|s| s.param == i && s.part.is_some_and(|(start, _)| start == 0))
            };
            let sq: Vec<Tensor> = grads
                .iter()
                .map(|(i, g)| match first_owned(*i) {
                    true => g.to_kind(Kind::Float).square().sum(Kind::Float),
                    false => Tensor::zeros([], (Kind::Float, g.device())),
                })
                .collect();
            let norm = sum_over_ranks(Tensor::stack(&sq, 0))?
                .sum(Kind::Float)
                .sqrt()
                .to_device(device);
            if max_norm > 0.0 {
                let coef = (max_norm / (&norm + 1e-6)).clamp_max(1.0);
                for s in &self.slots {
                    let g = self.params[s.param].value.grad();
                    if g.defined() {
                        let _ = flat_part(&g, s.part).g_mul_(&coef);
                    }
                }
            }
            Ok(norm)
        })
    }

    /// One AdamW update at learning rate `lr`.
    pub fn step(&mut self, lr: f64) {
        let Some(device) = self.params.first().map(|p| p.value.device()) else {
            self.t += 1;
            return;
        };
        self.step_masked(lr, &Tensor::ones([], (Kind::Bool, device)));
    }

    /// [`AdamW::step`] if `ok` (a bool scalar on the parameters' device) is
    /// true; otherwise nothing changes, not the weights, not the moments,
    /// not the bias correction, whatever the gradients hold (NaN and inf
    /// included). Decided on the device: no host synchronisation. Sharded,
    /// only this rank's part changes.
    pub fn step_masked(&mut self, lr: f64, ok: &Tensor) {
        self.t += 1;
        let Some(device) = self.params.first().map(|p| p.value.device()) else {
            return;
        };
        let (b1, b2) = self.betas;
        tch::no_grad(|| {
            let ok = ok.to_device(device);
            let skipped = match self.skipped.take() {
                Some(s) => s + ok.logical_not().to_kind(Kind::Int64),
                None => ok.logical_not().to_kind(Kind::Int64),
            };
            // Updates applied including this one, at least 1 so that a
            // masked first step divides by nothing of zero.
            let applied = (-&skipped + self.t).clamp_min(1).to_kind(Kind::Double);
            self.skipped = Some(skipped);
            let bc1 = -Tensor::pow_scalar(b1, &applied) + 1.0;
            let bc2_sqrt = (-Tensor::pow_scalar(b2, &applied) + 1.0).sqrt();
            // Every factor in double on the device, as the host scalars they
            // replace; a masked step turns each into the identity.
            let pick = |yes: Tensor, no: f64| yes.where_scalarother(&ok, no);
            // Filled on the device: copying a host scalar to a GPU would
            // synchronise the step.
            let one = |x: f64| Tensor::full([], x, (Kind::Double, device));
            let keep_m = pick(one(b1), 1.0);
            let take_m = pick(one(1.0 - b1), 0.0);
            let keep_v = pick(one(b2), 1.0);
            let take_v = pick(one(1.0 - b2), 0.0);
            let step_size = pick(one(lr) / &bc1, 0.0);
            let decay = pick(one(1.0 - lr * self.weight_decay), 1.0);
            for s in &mut self.slots {
                let p = &self.params[s.param];
                let g = p.value.grad();
                if !g.defined() {
                    continue;
                }
                let (mut value, g) = match s.part {
                    None => (p.value.shallow_clone(), g),
                    part => (flat_part(&p.value.detach(), part), flat_part(&g, part)),
                };
                // Non-finite gradients of a masked step must not reach the
                // moments (0 * NaN is NaN).
                let g = g.where_scalarother(&ok, 0.0);
                if p.decay && self.weight_decay > 0.0 {
                    let _ = value.g_mul_(&decay);
                }
                let _ = s.m.g_mul_(&keep_m);
                let _ = s.m.g_add_(&(&g * &take_m));
                let _ = s.v.g_mul_(&keep_v);
                let _ = s.v.g_add_(&(g.square() * &take_v));
                let denom = s.v.sqrt() / &bc2_sqrt + self.eps;
                let update = &s.m / denom * &step_size;
                let _ = value.g_sub_(&update);
            }
        });
    }

    /// Updates applied so far: masked steps do not count (reading the
    /// device counter synchronises, as saving a checkpoint does anyway).
    pub fn applied_steps(&self) -> i64 {
        let skipped = self.skipped.as_ref().map_or(0, |s| s.int64_value(&[]));
        self.t - skipped
    }

    /// The optimizer state as named tensors (`m.<param>`, `v.<param>`, `t`)
    /// of an unsharded optimizer; a sharded one's is gathered from the
    /// ranks by `crate::zero::full_state`.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        assert!(
            self.shard.is_none(),
            "a sharded optimizer's state is gathered by zero::full_state"
        );
        let mut out = Vec::with_capacity(2 * self.slots.len() + 1);
        for s in &self.slots {
            let name = &self.params[s.param].name;
            out.push((format!("m.{name}"), s.m.shallow_clone()));
            out.push((format!("v.{name}"), s.v.shallow_clone()));
        }
        out.push(("t".to_string(), Tensor::from(self.applied_steps())));
        out
    }

    /// Restore [`AdamW::state`] (whole tensors; sharded, this rank takes
    /// its part of each); every moment must be present.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<(), String> {
        self.load_moments(state, true)?;
        let t = state.get("t").ok_or("optimizer state lacks `t`")?;
        self.t = t.int64_value(&[]);
        self.skipped = None;
        Ok(())
    }

    /// Copies the moments `state` holds (whole tensors, by name) into this
    /// optimizer's, or its part of them; with `all`, each must be there.
    pub fn load_moments(
        &mut self,
        state: &HashMap<String, Tensor>,
        all: bool,
    ) -> Result<(), String> {
        tch::no_grad(|| {
            for s in &mut self.slots {
                let p = &self.params[s.param];
                for (prefix, slot) in [("m", &mut s.m), ("v", &mut s.v)] {
                    let key = format!("{prefix}.{}", p.name);
                    let Some(t) = state.get(&key) else {
                        if all {
                            return Err(format!("optimizer state lacks `{key}`"));
                        }
                        continue;
                    };
                    if t.size() != p.value.size() {
                        return Err(format!(
                            "optimizer state `{key}` has shape {:?}, expected {:?}",
                            t.size(),
                            p.value.size()
                        ));
                    }
                    let source = match s.part {
                        None => t.shallow_clone(),
                        part => flat_part(&t.contiguous(), part),
                    };
                    slot.copy_(&source);
                }
            }
            Ok(())
        })
    }
}

/// Linear warm-up to `lr` over `warmup` steps, then cosine decay to `min_lr`
/// at `total`. `step` counts from 0.
pub fn lr_at(step: i64, total: i64, warmup: i64, lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let span = (total - warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).clamp(0.0, 1.0);
    min_lr + (lr - min_lr) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        assert!((lr_at(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(50, 100, 10, 1.0, 0.1) < lr_at(40, 100, 10, 1.0, 0.1));
    }

    /// One step equals PyTorch's `torch.optim.AdamW` formula, written out.
    #[test]
    fn adamw_matches_reference_formula() {
        let (vs, w, b) = two_params();
        let mut opt = AdamW::new(&vs, (0.9, 0.999), 1e-8, 0.1);
        let loss = (&w * &w).sum(Kind::Float) + (&b * 3.0).sum(Kind::Float);
        loss.backward();
        opt.step(0.01);
        // w: decay then update; g = 2w; m = 0.1 g; v = 0.001 g^2; update = lr * sign(g) (t = 1).
        let w0 = Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]);
        let expected_w = &w0 * (1.0 - 0.01 * 0.1) - w0.sign() * 0.01;
        assert!(w.allclose(&expected_w, 1e-5, 1e-6, false));
        // b: no decay (1-d), g = 3.
        let expected_b = Tensor::from_slice(&[0.49f32, -0.51]);
        assert!(b.allclose(&expected_b, 1e-5, 1e-6, false));
    }

    fn two_params() -> (nn::VarStore, Tensor, Tensor) {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let w = vs.root().var_copy(
            "w",
            &Tensor::from_slice(&[1.0f32, -2.0, 0.5, 3.0]).view([2, 2]),
        );
        let b = vs
            .root()
            .var_copy("b", &Tensor::from_slice(&[0.5f32, -0.5]));
        (vs, w, b)
    }

    /// Two optimizers sharded as ranks 0 and 1 of 2, each stepping its
    /// part of its own copy of the parameters with the same gradients,
    /// the parts exchanged after each step (the all-gather), hold what one
    /// unsharded optimizer holds: weights and moments (clipped by the norm
    /// over both parts), with half the state bytes each.
    #[test]
    fn sharded_parts_step_as_the_whole() {
        let new = |shard: Option<usize>| {
            let (vs, w, b) = two_params();
            let mut opt = AdamW::new(&vs, (0.9, 0.999), 1e-8, 0.1);
            if let Some(rank) = shard {
                opt.shard(rank, 2, 1 << 20).unwrap();
            }
            (vs, w, b, opt)
        };
        let mut runs = [new(None), new(Some(0)), new(Some(1))];
        for lr in [0.01, 0.02, 0.03] {
            for (k, (_, w, b, opt)) in runs.iter_mut().enumerate() {
                backward(w, b, 1.0);
                let sq = |g: Tensor| g.square().sum(Kind::Float);
                // Parameters in name order: `b`, `w`; rank 0 owns both
                // first elements, so its entries are the norms, rank 1's 0.
                let whole = Tensor::stack(&[sq(b.grad()), sq(w.grad())], 0);
                let norm = opt
                    .clip_grad_norm_over(1.0, |own| {
                        let expected = match k {
                            2 => whole.zeros_like(),
                            _ => whole.shallow_clone(),
                        };
                        assert!(own.equal(&expected), "rank {}", k - 1);
                        // The all-reduce: the two ranks' entries summed.
                        Ok::<_, ()>(whole.shallow_clone())
                    })
                    .unwrap();
                let expected = whole.sum(Kind::Float).sqrt();
                assert!(norm.equal(&expected));
                opt.step(lr);
                opt.zero_grad();
            }
            // Six elements: `b` (2) sorts first, then `w` (4); rank 0 owns
            // `b` and `w`'s first element, rank 1 the rest.
            tch::no_grad(|| {
                let w = Tensor::cat(
                    &[
                        runs[1].1.view([-1]).narrow(0, 0, 1),
                        runs[2].1.view([-1]).narrow(0, 1, 3),
                    ],
                    0,
                );
                let b = runs[1].2.copy();
                for r in &mut runs[1..] {
                    r.1.view([-1]).copy_(&w);
                    r.2.copy_(&b);
                }
            });
        }
        // Bit for bit, the clipping norm included.
        let close = |x: &Tensor, y: &Tensor| x.equal(y);
        let [whole, part0, part1] = runs;
        assert!(close(&part0.1, &whole.1) && close(&part0.2, &whole.2));
        let (whole, part0, part1) = (whole.3, part0.3, part1.3);
        assert_eq!(
            part0.state_bytes() + part1.state_bytes(),
            whole.state_bytes()
        );
        assert_eq!(part0.state_bytes(), part1.state_bytes());
        let s: HashMap<String, Tensor> = whole.state().into_iter().collect();
        for (i, key) in ["m", "v"].into_iter().enumerate() {
            let part = |o: &AdamW| {
                let (m, v) = o.shard_parts().unwrap().2;
                [m, v][i].shallow_clone()
            };
            let flat = Tensor::cat(
                &[
                    s[&format!("{key}.b")].view([-1]),
                    s[&format!("{key}.w")].view([-1]),
                ],
                0,
            );
            assert!(close(&Tensor::cat(&[part(&part0), part(&part1)], 0), &flat));
        }
    }

    fn backward(w: &Tensor, b: &Tensor, poison: f64) {
        let loss = (w * w).sum(Kind::Float) + (b * 3.0).sum(Kind::Float) * poison;
        loss.backward();
    }

    /// A masked step with NaN and inf gradients changes nothing, and the
    /// next real step is the one a run without the masked step would take
    /// (bias correction included); the saved `t` counts applied updates.
    #[test]
    fn a_masked_step_is_no_step_at_all() {
        let (vs_a, wa, ba) = two_params();
        let mut a = AdamW::new(&vs_a, (0.9, 0.999), 1e-8, 0.1);
        backward(&wa, &ba, 1.0);
        a.step(0.01);
        a.zero_grad();
        backward(&wa, &ba, 1.0);
        a.step(0.02);

        let (vs_b, wb, bb) = two_params();
        let mut b = AdamW::new(&vs_b, (0.9, 0.999), 1e-8, 0.1);
        backward(&wb, &bb, 1.0);
        b.step(0.01);
        b.zero_grad();
        let before: Vec<Tensor> = [&wb, &bb].iter().map(|t| t.copy()).collect();
        backward(&wb, &bb, f64::NAN);
        let _ = wb.grad().get(0).get(0).fill_(f64::INFINITY);
        b.step_masked(0.5, &Tensor::from(false));
        assert!(wb.equal(&before[0]) && bb.equal(&before[1]));
        let t: HashMap<String, Tensor> = b.state().into_iter().collect();
        assert_eq!(t["t"].int64_value(&[]), 1);
        b.zero_grad();
        backward(&wb, &bb, 1.0);
        b.step(0.02);
        assert!(wa.equal(&wb) && ba.equal(&bb));
        let sa: HashMap<String, Tensor> = a.state().into_iter().collect();
        let sb: HashMap<String, Tensor> = b.state().into_iter().collect();
        for (k, v) in &sa {
            assert!(v.equal(&sb[k]), "optimizer state {k} differs");
        }
    }
}
