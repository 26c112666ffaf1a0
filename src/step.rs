//! The one guarded optimizer step, shared by pretraining, every
//! fine-tuning task and the benchmark: `accum_steps` micro-batches, each
//! one's loss back-propagated (gradients all-reduced over ranks on the
//! last), the gradients clipped, and AdamW applied unless the loss or the
//! gradient norm is not finite ([`crate::guard`]). Nothing is read back
//! from the device, so what the benchmark times is what training runs.
//!
//! This is the only module that calls the optimizer's step
//! (`tests/tidy.rs` checks it).

use crate::guard::Guard;
use crate::hooks::Hooks;
use crate::optim::AdamW;
use crate::parallel::Parallel;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, Error, Forward, Result};
use vlmatch_registry::config::{HardNegatives, TrainConfig};
use vlmatch_registry::Assembly;

/// What one optimiser step returns: every loss and metric averaged over the
/// accumulated batches (still on the device: reading them syncs), and the
/// gradient norm before clipping.
pub struct StepOutput {
    pub values: BTreeMap<String, Tensor>,
    pub grad_norm: Tensor,
    /// Whether the step was applied (a bool on the device; see
    /// [`crate::guard`]).
    pub applied: Tensor,
}

/// Which step (counted from 0) and at which learning rate.
#[derive(Debug, Clone, Copy)]
pub struct StepAt {
    pub step: i64,
    pub lr: f64,
}

/// One micro-batch's result: the weighted total loss to back-propagate,
/// and the named values to log (`losses` names those among them that are
/// losses, which the guard reports when a step is not finite).
pub struct Micro {
    pub total: Tensor,
    pub values: Vec<(String, Tensor)>,
    pub losses: Vec<String>,
    /// Back-propagated with the micro-batch but neither averaged over the
    /// micro-batches nor logged: GradCache's surrogate, whose gradient is
    /// the cached gradient of the whole batch's contrastive loss
    /// ([`crate::grad_cache`]).
    pub surrogate: Option<Tensor>,
}

/// What every step of a run shares: the optimizer, the guard, the ranks
/// and the hooks.
pub struct Stepper<'a> {
    pub optim: &'a mut AdamW,
    pub guard: &'a mut Guard,
    pub par: Option<&'a Parallel>,
    pub hooks: &'a Hooks,
    pub accum_steps: usize,
    pub grad_clip: f64,
}

impl Stepper<'_> {
    /// One optimizer step at `at` over `accum_steps` micro-batches from
    /// `micro` (given the micro-batch's index).
    pub fn step(
        &mut self,
        at: StepAt,
        micro: impl FnMut(usize) -> Result<Micro>,
    ) -> Result<StepOutput> {
        self.step_with(at, || Ok(None), micro)
    }

    /// [`Stepper::step`], with a loss over the whole accumulated batch
    /// first (`whole`: GradCache's contrastive loss), back-propagated and
    /// logged as it is (not averaged over micro-batches) before the
    /// micro-batches run.
    pub fn step_with(
        &mut self,
        at: StepAt,
        whole: impl FnOnce() -> Result<Option<Micro>>,
        mut micro: impl FnMut(usize) -> Result<Micro>,
    ) -> Result<StepOutput> {
        let accum = self.accum_steps;
        let mut values: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_keys: Vec<String> = vec!["loss".into()];
        // A value's share of the step's logged value: a micro-batch's is
        // divided by `accum` (the mean over micro-batches), the whole
        // batch's is taken as it is (divided by 1).
        let mut add = |k: String, v: Tensor, parts: usize| {
            let v = v.detach().to_kind(Kind::Float) / parts as f64;
            match values.remove(&k) {
                Some(old) => values.insert(k, old + v),
                None => values.insert(k, v),
            };
        };
        self.hooks.before_step(at.step);
        if let Some(w) = whole()? {
            loss_keys.extend(w.losses);
            for (k, v) in w.values {
                add(k, v, 1);
            }
            let total = self.hooks.before_backward(at.step, w.total);
            add("loss".into(), total.shallow_clone(), 1);
            if let Some(p) = self.par {
                p.sync_gradients(false);
            }
            self.guard.gate(&total).f_backward()?;
        }
        for m in 0..accum {
            let out = micro(m)?;
            for k in out.losses {
                if !loss_keys.contains(&k) {
                    loss_keys.push(k);
                }
            }
            for (k, v) in out.values {
                add(k, v, accum);
            }
            let total = self.hooks.before_backward(at.step, out.total);
            add("loss".into(), total.shallow_clone(), accum);
            if let Some(p) = self.par {
                // Only the last micro-batch's backward reduces (DDP's no_sync).
                p.sync_gradients(m + 1 == accum);
            }
            // A collective in backward (gathered ITC features) reports its
            // failure as an error here rather than a panic.
            let mut back = total / accum as f64;
            if let Some(s) = out.surrogate {
                back += s;
            }
            self.guard.gate(&back).f_backward()?;
        }
        if let Some(p) = self.par {
            p.reduce_gradients()?;
        }
        // Sharded (ZeRO-1), the norm is summed over every rank's part.
        let grad_norm = crate::zero::clip_grad_norm(self.par, self.optim, self.grad_clip)?;
        let losses: BTreeMap<String, Tensor> = values
            .iter()
            .filter(|(k, _)| loss_keys.contains(k))
            .map(|(k, v)| (k.clone(), v.shallow_clone()))
            .collect();
        let applied = self.guard.decide(at.step, &grad_norm, &losses);
        self.optim.step_masked(at.lr, &applied);
        // Sharded, each rank stepped its part: every part to every rank
        // before anything reads the weights.
        crate::zero::gather_parameters(self.par, self.optim)?;
        // The momentum model, for one, follows the weights just updated
        // (where the step was applied).
        self.hooks.after_optimizer_step(&applied);
        self.optim.zero_grad();
        Ok(StepOutput {
            values,
            grad_norm,
            applied,
        })
    }
}

/// One pretraining micro-batch: every objective on `batch`, through one
/// [`Forward`] cache that the hooks may attach to; the losses weighted and
/// summed. As one rank of several (`par`), the forward sees the global
/// batch through the process group.
pub fn objectives(
    asm: &Assembly,
    tc: &TrainConfig,
    par: Option<&Parallel>,
    hooks: &Hooks,
    step: i64,
    batch: &Batch,
) -> Result<Micro> {
    let fwd = forward(asm, tc, par, hooks, batch);
    let micro = run_objectives(asm, &fwd, step, |_| true)?;
    hooks.after_objectives(&fwd);
    micro.ok_or_else(|| Error::Config("no objective produced a loss".into()))
}

/// The training [`Forward`] of `batch`: the hooks' attachments, and as one
/// rank of several the global batch through the process group.
pub fn forward<'a>(
    asm: &'a Assembly,
    tc: &TrainConfig,
    par: Option<&Parallel>,
    hooks: &'a Hooks,
    batch: &'a Batch,
) -> Forward<'a> {
    let mut fwd = hooks.before_forward(Forward::new(&asm.model, batch, true));
    if let Some(p) = par {
        fwd = fwd.with_collective(p.collective());
        if tc.dist.hard_negatives == HardNegatives::Local {
            fwd = fwd.with_local_negatives();
        }
    }
    fwd
}

/// The objectives that `pick` selects on `fwd`, their losses weighted and
/// summed; `None` when none produced a loss.
pub fn run_objectives(
    asm: &Assembly,
    fwd: &Forward<'_>,
    step: i64,
    pick: impl Fn(&dyn vlmatch_core::Objective) -> bool,
) -> Result<Option<Micro>> {
    let mut total: Option<Tensor> = None;
    let (mut values, mut losses) = (Vec::new(), Vec::new());
    for o in asm.objectives.iter().filter(|o| pick(o.objective.as_ref())) {
        let _span = tracing::trace_span!("objective", name = %o.name).entered();
        let out = o.objective.forward(fwd, step)?;
        for (k, l) in out.losses {
            let weighted = &l * o.weight;
            losses.push(k.clone());
            values.push((k, l));
            total = Some(match total {
                Some(t) => t + weighted,
                None => weighted,
            });
        }
        values.extend(out.metrics);
    }
    Ok(total.map(|total| Micro {
        total,
        values,
        losses,
        surrogate: None,
    }))
}

/// One pretraining step without hooks or ranks (the benchmark's): see
/// [`Stepper::step`] and [`objectives`].
pub fn train_step(
    asm: &Assembly,
    optim: &mut AdamW,
    tc: &TrainConfig,
    step: i64,
    lr: f64,
    guard: &mut Guard,
    mut next_batch: impl FnMut() -> Result<Batch>,
) -> Result<StepOutput> {
    let hooks = Hooks::none();
    let mut stepper = Stepper {
        optim,
        guard,
        par: None,
        hooks: &hooks,
        accum_steps: tc.accum_steps,
        grad_clip: tc.grad_clip,
    };
    stepper.step(StepAt { step, lr }, |_| {
        objectives(asm, tc, None, &hooks, step, &next_batch()?)
    })
}
