//! GradCache contrastive accumulation (Gao et al. 2021; open_clip's
//! `--accum-freq`): with `train.accum_steps = k` and
//! `train.contrastive_accum = "cached"`, the contrastive objectives (ITC:
//! [`vlmatch_core::Objective::contrastive`]) see all `k` micro-batches of
//! every rank at once, at the activation memory of one micro-batch:
//!
//! 1. each micro-batch's ITC embeddings, without gradient;
//! 2. the contrastive loss over the whole accumulated batch from those
//!    embeddings (leaves), back-propagated: the temperature's gradient, and
//!    the embeddings' gradients, cached;
//! 3. each micro-batch again with gradient: the other objectives, plus the
//!    surrogate `sum(e_v * g_v) + sum(e_t * g_t)`, whose gradient through
//!    the encoders is the cached one.
//!
//! libtorch's generator is reseeded for each micro-batch before 1. and
//! again before 3. (from the run's seed, the step and the micro-batch), and
//! 3. computes the embeddings first, so dropout draws the same masks in
//! both passes and the gradient is exact.
//!
//! What the other objectives see is each micro-batch, as with `"local"`:
//! ITM's in-batch hard negatives, in particular, are drawn from the
//! micro-batch's own similarities (every rank's pairs of micro-batch `m`),
//! not from the whole accumulated batch. Momentum distillation (queues and
//! soft targets per micro-batch) is refused with `"cached"` by the config
//! check.

use crate::hooks::Hooks;
use crate::parallel::Parallel;
use crate::step::{forward, run_objectives, Micro};
use std::cell::RefCell;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, Error, Result};
use vlmatch_registry::config::TrainConfig;
use vlmatch_registry::Assembly;

/// The seed libtorch's generator gets before micro-batch `m` of step
/// `step`, in both passes.
pub fn micro_seed(seed: u64, step: i64, m: usize) -> i64 {
    (crate::rng::mix(&[seed, step as u64, m as u64, 0x006C_AC4E]) >> 1) as i64
}

/// One accumulated step's micro-batches and, once the whole batch's
/// contrastive loss has been back-propagated, its embedding leaves (whose
/// gradients are the cache).
pub struct GradCache<'a> {
    asm: &'a Assembly,
    tc: &'a TrainConfig,
    par: Option<&'a Parallel>,
    hooks: &'a Hooks,
    step: i64,
    batches: Vec<Batch>,
    leaves: RefCell<Option<(Tensor, Tensor)>>,
}

impl<'a> GradCache<'a> {
    /// The step's `batches` (one per micro-batch, this rank's part).
    pub fn new(
        asm: &'a Assembly,
        tc: &'a TrainConfig,
        par: Option<&'a Parallel>,
        hooks: &'a Hooks,
        step: i64,
        batches: Vec<Batch>,
    ) -> Self {
        GradCache {
            asm,
            tc,
            par,
            hooks,
            step,
            batches,
            leaves: RefCell::new(None),
        }
    }

    fn seed(&self, m: usize) {
        tch::manual_seed(micro_seed(self.tc.seed, self.step, m));
    }

    /// Steps 1 and 2: every micro-batch's embeddings without gradient,
    /// then the contrastive objectives over all of them, from leaves that
    /// keep their gradients for [`GradCache::micro`]. The caller
    /// back-propagates the returned loss ([`crate::step::Stepper::step_with`]).
    pub fn whole(&self) -> Result<Micro> {
        let mut images = Vec::with_capacity(self.batches.len());
        let mut texts = Vec::with_capacity(self.batches.len());
        for (m, batch) in self.batches.iter().enumerate() {
            self.seed(m);
            let fwd = forward(self.asm, self.tc, self.par, self.hooks, batch);
            let (image, text) = tch::no_grad(|| -> Result<(Tensor, Tensor)> {
                let (i, t) = fwd.embeds()?;
                Ok((i.detach(), t.detach()))
            })?;
            images.push(image);
            texts.push(text);
        }
        let image = Tensor::cat(&images, 0).set_requires_grad(true);
        let text = Tensor::cat(&texts, 0).set_requires_grad(true);
        let all = Batch::cat(&self.batches)
            .ok_or_else(|| Error::Config("train.accum_steps must be at least 1".into()))?;
        let fwd = forward(self.asm, self.tc, self.par, self.hooks, &all)
            .with_embeds(image.shallow_clone(), text.shallow_clone());
        let micro = run_objectives(self.asm, &fwd, self.step, |o| o.contrastive())?;
        *self.leaves.borrow_mut() = Some((image, text));
        micro.ok_or_else(|| {
            Error::Config(
                "train.contrastive_accum = \"cached\" needs a contrastive objective (itc) in \
                 `objectives`"
                    .into(),
            )
        })
    }

    /// Step 3 for micro-batch `m`: its embeddings again, with gradient, as
    /// the surrogate of the cached gradients, then the other objectives.
    pub fn micro(&self, m: usize) -> Result<Micro> {
        let leaves = self.leaves.borrow();
        let (image_leaf, text_leaf) = leaves
            .as_ref()
            .expect("GradCache::whole runs before the micro-batches");
        let batch = &self.batches[m];
        let rows = batch.len();
        let cached = |leaf: &Tensor| {
            let g = leaf.grad();
            if g.defined() {
                g.narrow(0, m as i64 * rows, rows)
            } else {
                leaf.zeros_like().narrow(0, m as i64 * rows, rows)
            }
        };
        self.seed(m);
        let fwd = forward(self.asm, self.tc, self.par, self.hooks, batch);
        let (image, text) = fwd.embeds()?;
        let surrogate = (image * cached(image_leaf)).sum(Kind::Float)
            + (text * cached(text_leaf)).sum(Kind::Float);
        let others = run_objectives(self.asm, &fwd, self.step, |o| !o.contrastive())?;
        self.hooks.after_objectives(&fwd);
        Ok(match others {
            Some(mut o) => {
                o.surrogate = Some(surrogate);
                o
            }
            None => Micro {
                total: surrogate.zeros_like(),
                values: Vec::new(),
                losses: Vec::new(),
                surrogate: Some(surrogate),
            },
        })
    }
}
