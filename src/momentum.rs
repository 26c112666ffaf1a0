//! The trainer's side of ALBEF's momentum distillation (`[momentum]`,
//! `configs/mod.toml`; the objectives' side is `vlmatch_core::momentum`).
//!
//! [`MomentumTrainer::build`] assembles a second copy of the model in its
//! own frozen `VarStore` (so it has no gradient and is not in the
//! optimizer), copies the trained weights into it and allocates the ITC
//! queues. After every optimizer step the trainer calls
//! [`MomentumTrainer::after_step`], which moves each momentum parameter as
//! `m = mu * m + (1 - mu) * theta` where the step was applied (the guard's
//! device-side verdict; nothing is read back). Which parameters: those of
//! the image and text encoders, the fusion, the MLM head and the ITC
//! projections (ALBEF's `model_pairs`); not the temperature (ALBEF's
//! momentum similarities use the trained one) nor the matching heads.
//!
//! It is the trainer hook `momentum` ([`vlmatch_core::Hook`]), on when
//! `momentum.enabled` or `[hooks.momentum]`: before each step it sets
//! `alpha`, it attaches the momentum model and queues to each micro-batch's
//! `Forward`, queues the batch's momentum features after the objectives,
//! moves the EMA after the optimizer step and logs `mod_alpha`.
//!
//! Checkpoints hold its state under the hook's name: the momentum
//! parameters (`momentum.model.<name>`), the queues
//! (`momentum.queue.<image|text|image_ids|image_keys|text_keys>`) and the
//! queue pointer (`momentum.queue.ptr`), so resume is exact.

use std::collections::HashMap;
use tch::{nn, Tensor};
use vlmatch_core::hook::priority;
use vlmatch_core::{Error, Forward, Hook, HookState, Momentum, Queue, Result, RunStart};
use vlmatch_registry::config::MomentumConfig;
use vlmatch_registry::hooks::HookContext;
use vlmatch_registry::{assemble_model, Assembly, LoadedConfig, ModelEnv};

vlmatch_registry::register!(hook "momentum" => build_hook);

/// The `momentum` hook: on with `momentum.enabled` (or `[hooks.momentum]`).
fn build_hook(ctx: &HookContext<'_>) -> Result<Option<Box<dyn Hook>>> {
    if !ctx.enabled(ctx.loaded.config.momentum.enabled) {
        return Ok(None);
    }
    let (asm, env) = ctx.model()?;
    let m = MomentumTrainer::build_always(ctx.loaded, env, asm, ctx.world, ctx.epoch_steps)?;
    Ok(Some(Box::new(m)))
}

/// Parameter prefixes the momentum model follows (ALBEF's `model_pairs`).
const FOLLOWED: [&str; 6] = [
    "vision_encoder.",
    "text_encoder.",
    "fusion.",
    "generator.",
    "vision_proj.",
    "text_proj.",
];

/// The checkpoint name prefix of everything momentum distillation saves.
pub const PREFIX: &str = "momentum.";

/// The momentum model, its queues and the schedule of `alpha`.
pub struct MomentumTrainer {
    pub momentum: Momentum,
    /// Owns the momentum model's variables (frozen).
    pub vs: nn::VarStore,
    /// `(name, momentum parameter, trained parameter)`, in name order.
    pairs: Vec<(String, Tensor, Tensor)>,
    mu: f64,
    alpha: f64,
    ramp_steps: i64,
}

/// Checks that the global batch divides `momentum.queue_size`; the error
/// names the nearest sizes that it does divide.
pub fn check_queue_size(queue_size: i64, world: usize, batch_size: usize) -> Result<()> {
    let g = (world * batch_size) as i64;
    if g == 0 || queue_size % g == 0 {
        return Ok(());
    }
    let below = queue_size / g * g;
    let nearest = if below == 0 {
        format!("{}", below + g)
    } else {
        format!("{below} or {}", below + g)
    };
    Err(Error::Config(format!(
        "config key `momentum.queue_size`: the queue takes whole global batches, and {queue_size} \
         is not a multiple of the global batch {g} ({world} rank{} x train.batch_size \
         {batch_size}); the nearest valid sizes are {nearest}",
        if world == 1 { "" } else { "s" }
    )))
}

/// `alpha` at optimizer step `step` (counted from 0): ramped linearly from
/// 0 over `ramp_steps`, as ALBEF does over its first epoch.
pub fn alpha_at(alpha: f64, ramp_steps: i64, step: i64) -> f64 {
    if ramp_steps <= 0 {
        alpha
    } else {
        alpha * (step as f64 / ramp_steps as f64).min(1.0)
    }
}

impl MomentumTrainer {
    /// The momentum copy of `asm`'s model, with its weights, when
    /// `momentum.enabled`. `epoch_steps` is one epoch in optimizer steps
    /// (`None` for streamed shards: then `train.warmup_steps`).
    pub fn build(
        loaded: &LoadedConfig,
        env: &ModelEnv,
        asm: &Assembly,
        world: usize,
        epoch_steps: Option<i64>,
    ) -> Result<Option<MomentumTrainer>> {
        if !loaded.config.momentum.enabled {
            return Ok(None);
        }
        Self::build_always(loaded, env, asm, world, epoch_steps).map(Some)
    }

    /// [`MomentumTrainer::build`] whether or not `momentum.enabled` says
    /// so (`[hooks.momentum]` turns it on too).
    fn build_always(
        loaded: &LoadedConfig,
        env: &ModelEnv,
        asm: &Assembly,
        world: usize,
        epoch_steps: Option<i64>,
    ) -> Result<MomentumTrainer> {
        let cfg: &MomentumConfig = &loaded.config.momentum;
        let tc = &loaded.config.train;
        check_queue_size(cfg.queue_size, world, tc.batch_size)?;
        // The run's registry: its plugin libraries too, whose encoders the
        // momentum model is built with as well.
        let registry = crate::libraries::registry(loaded)?;
        let (mut vs, model) = assemble_model(&registry, loaded, env)?;
        vs.freeze();
        let trained: HashMap<String, Tensor> = asm.vs.variables().into_iter().collect();
        let mut pairs: Vec<(String, Tensor, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(name, _)| FOLLOWED.iter().any(|p| name.starts_with(p)))
            .filter_map(|(name, m)| trained.get(&name).map(|t| (name, m, t.shallow_clone())))
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        let embed_dim = loaded.config.model.embed_dim;
        let queue = Queue::new(cfg.queue_size, embed_dim, env.device);
        let ramp_steps = cfg
            .alpha_ramp_steps
            .or(epoch_steps)
            .unwrap_or(tc.warmup_steps);
        let this = MomentumTrainer {
            momentum: Momentum::new(model, queue),
            vs,
            pairs,
            mu: cfg.mu,
            alpha: cfg.alpha,
            ramp_steps,
        };
        this.copy_params();
        Ok(this)
    }

    /// `m = theta` for every followed parameter (ALBEF's `copy_params`).
    pub fn copy_params(&self) {
        tch::no_grad(|| {
            for (_, m, t) in &self.pairs {
                m.shallow_clone().copy_(t);
            }
        });
    }

    /// Names of the parameters the momentum model follows.
    pub fn followed(&self) -> impl Iterator<Item = &str> {
        self.pairs.iter().map(|(n, _, _)| n.as_str())
    }

    /// Before step `step`'s forward: this step's `alpha`.
    pub fn before_step(&self, step: i64) {
        self.momentum
            .set_alpha(alpha_at(self.alpha, self.ramp_steps, step));
    }

    /// The hook after the optimizer step: `m = mu * m + (1 - mu) * theta`
    /// where `applied` (a bool scalar on the device) holds, else unchanged.
    pub fn after_step(&self, applied: &Tensor) {
        tch::no_grad(|| {
            for (_, m, t) in &self.pairs {
                let moved = m * self.mu + t * (1.0 - self.mu);
                let next = moved.where_self(applied, m);
                m.shallow_clone().copy_(&next);
            }
        });
    }

    /// The number of momentum parameters (elements).
    pub fn parameters(&self) -> i64 {
        self.pairs.iter().map(|(_, m, _)| m.numel() as i64).sum()
    }
}

impl Hook for MomentumTrainer {
    fn priority(&self) -> i32 {
        priority::MODEL
    }

    /// The momentum parameters (`model.<name>`), the queues
    /// (`queue.<name>`) and the queue pointer (`queue.ptr`).
    fn state(&self) -> HookState {
        let mut tensors: Vec<(String, Tensor)> = self
            .pairs
            .iter()
            .map(|(n, m, _)| (format!("model.{n}"), m.shallow_clone()))
            .collect();
        let queue = self.momentum.queue();
        for (n, t) in queue.named_tensors() {
            tensors.push((format!("queue.{n}"), t));
        }
        HookState {
            tensors,
            counters: vec![("queue.ptr".into(), queue.ptr)],
        }
    }

    fn set_counters(&mut self, counters: &[(String, i64)]) -> Result<()> {
        let mut queue = self.momentum.queue_mut();
        for (name, &ptr) in counters.iter().map(|(n, v)| (n.as_str(), v)) {
            if name != "queue.ptr" {
                continue;
            }
            if ptr < 0 || (ptr > 0 && ptr >= queue.len()) {
                return Err(Error::Config(format!(
                    "`{PREFIX}queue.ptr` is {ptr}, outside the queue of {}",
                    queue.len()
                )));
            }
            queue.ptr = ptr;
        }
        Ok(())
    }

    /// A fresh run's momentum model starts as the (initialised) weights.
    fn on_start(&mut self, start: RunStart) -> Result<()> {
        if !start.resumed {
            self.copy_params();
        }
        Ok(())
    }

    fn before_step(&self, step: i64) {
        MomentumTrainer::before_step(self, step);
    }

    fn before_forward<'a>(&'a self, forward: Forward<'a>) -> Forward<'a> {
        forward.with_momentum(&self.momentum)
    }

    /// The queue takes this batch's momentum features after every
    /// objective has read it.
    fn after_objectives(&self, forward: &Forward<'_>) {
        forward.enqueue_momentum();
    }

    fn after_optimizer_step(&self, applied: &Tensor) {
        self.after_step(applied);
    }

    fn on_log(&mut self, _step: i64, line: &mut Vec<(String, f64)>) {
        line.push(("mod_alpha".into(), self.momentum.alpha()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// A queue size is accepted exactly when the global batch divides
        /// it, and the sizes the error offers are multiples of the global
        /// batch on either side of it (the one above when none is below).
        #[test]
        fn queue_size_check_names_the_nearest_multiples(q in 0i64..5000, world in 1usize..5, b in 1usize..100) {
            let g = (world * b) as i64;
            match check_queue_size(q, world, b) {
                Ok(()) => prop_assert_eq!(q % g, 0),
                Err(e) => {
                    prop_assert!(q % g != 0);
                    let msg = e.to_string();
                    let below = q / g * g;
                    let want = if below == 0 {
                        format!("are {}", g)
                    } else {
                        format!("are {below} or {}", below + g)
                    };
                    prop_assert!(msg.ends_with(&want), "{}", msg);
                    prop_assert!(msg.contains("`momentum.queue_size`"));
                }
            }
        }

        /// alpha ramps from 0, never decreases, never exceeds its value and
        /// reaches it at the end of the ramp.
        #[test]
        fn alpha_ramps_linearly_to_its_value(alpha in 0.0f64..=1.0, ramp in 0i64..1000, step in 0i64..2000) {
            let a = alpha_at(alpha, ramp, step);
            prop_assert!((0.0..=alpha).contains(&a));
            prop_assert!(alpha_at(alpha, ramp, step + 1) >= a);
            if step >= ramp {
                prop_assert_eq!(a, alpha);
            }
            if ramp > 0 {
                prop_assert_eq!(alpha_at(alpha, ramp, 0), 0.0);
            }
        }
    }
}
