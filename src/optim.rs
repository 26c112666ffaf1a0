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
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    params: Vec<Param>,
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

impl AdamW {
    pub fn new(vs: &nn::VarStore, betas: (f64, f64), eps: f64, weight_decay: f64) -> Self {
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let params = vars
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(name, value)| Param {
                decay: value.dim() >= 2,
                m: value.zeros_like(),
                v: value.zeros_like(),
                name,
                value,
            })
            .collect();
        AdamW {
            params,
            betas,
            eps,
            weight_decay,
            t: 0,
            skipped: None,
        }
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
    /// included). Decided on the device: no host synchronisation.
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
            for p in &mut self.params {
                let g = p.value.grad();
                if !g.defined() {
                    continue;
                }
                // Non-finite gradients of a masked step must not reach the
                // moments (0 * NaN is NaN).
                let g = g.where_scalarother(&ok, 0.0);
                if p.decay && self.weight_decay > 0.0 {
                    let _ = p.value.g_mul_(&decay);
                }
                let _ = p.m.g_mul_(&keep_m);
                let _ = p.m.g_add_(&(&g * &take_m));
                let _ = p.v.g_mul_(&keep_v);
                let _ = p.v.g_add_(&(g.square() * &take_v));
                let denom = p.v.sqrt() / &bc2_sqrt + self.eps;
                let update = &p.m / denom * &step_size;
                let _ = p.value.g_sub_(&update);
            }
        });
    }

    /// The optimizer state as named tensors (`m.<param>`, `v.<param>`, `t`).
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.params.len() + 1);
        for p in &self.params {
            out.push((format!("m.{}", p.name), p.m.shallow_clone()));
            out.push((format!("v.{}", p.name), p.v.shallow_clone()));
        }
        // Updates applied: masked steps do not count (reading the device
        // counter synchronises, as saving a checkpoint does anyway).
        let skipped = self.skipped.as_ref().map_or(0, |s| s.int64_value(&[]));
        out.push(("t".to_string(), Tensor::from(self.t - skipped)));
        out
    }

    /// Restore [`AdamW::state`]; every moment must be present.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<(), String> {
        tch::no_grad(|| {
            for p in &mut self.params {
                for (prefix, slot) in [("m", &mut p.m), ("v", &mut p.v)] {
                    let key = format!("{prefix}.{}", p.name);
                    let t = state
                        .get(&key)
                        .ok_or_else(|| format!("optimizer state lacks `{key}`"))?;
                    if t.size() != slot.size() {
                        return Err(format!(
                            "optimizer state `{key}` has shape {:?}, expected {:?}",
                            t.size(),
                            slot.size()
                        ));
                    }
                    slot.copy_(t);
                }
            }
            let t = state.get("t").ok_or("optimizer state lacks `t`")?;
            self.t = t.int64_value(&[]);
            self.skipped = None;
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
