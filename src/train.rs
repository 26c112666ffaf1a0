//! The trainer: the loop that steps, logs, checkpoints, evaluates and stops,
//! with every other training feature a hook ([`crate::hooks`]).
//!
//! Each step is [`crate::step::Stepper::step`] (AdamW with warm-up and
//! cosine decay, clipping, accumulation, the non-finite guard) over the
//! objectives of [`crate::step::objectives`]. Every `train.log_every` steps
//! rank 0 appends a line to `metrics.jsonl`; every
//! `train.checkpoint_every` steps it writes an atomic checkpoint
//! ([`crate::checkpoint`]) holding the weights, the optimizer, the
//! trainer's named counters and each hook's state. A stop signal writes a
//! checkpoint and stops; `--resume` continues exactly.
//!
//! Determinism: libtorch's generator is reseeded from `(train.seed, step)`
//! before every step, and batch `g` of the loader is a function of the seed
//! and `g`; so a run resumed from a checkpoint continues exactly as if it had
//! never stopped (bit-exact on CPU).
//!
//! Data parallelism: started by a launcher as one of several ranks
//! (`vlmatch_dist::LaunchEnv`), [`train`] trains on `train.batch_size`
//! pairs per rank of each global batch, with the global batch's losses and
//! the ranks' averaged gradients ([`crate::parallel`]): the same steps one
//! process holding the global batch takes. Rank 0 alone writes the run
//! directory; logged values are means over ranks.

mod entry;
mod files;
mod owner;
mod start;

pub use entry::{train, train_launched, TrainOptions, TrainSummary};
pub use files::truncate_metrics;
pub use start::Run;

use crate::grad_cache::GradCache;
use crate::optim::lr_at;
use crate::rng::mix;
use crate::step::{objectives, StepAt, StepOutput, Stepper};
use serde_json::{json, Map, Value};
use std::io::Write;
use vlmatch_core::{Error, Record, Result, RunEnd};
use vlmatch_registry::config::{ContrastiveAccum, OnNonFinite};

fn step_seed(seed: u64, step: i64) -> i64 {
    (mix(&[seed, step as u64, 0x5EED]) >> 1) as i64
}

/// The loop: steps from the run's start to `train.steps`, each followed by
/// what is due (logging, a checkpoint, evaluation, a stop).
pub(crate) fn run(mut r: Run<'_>, halt_after: Option<i64>) -> Result<TrainSummary> {
    let tc = r.tc.clone();
    let stop = crate::signals::StopSignal::install()?;
    stop.clear();
    let started = std::time::Instant::now();
    let (mut logged, mut last_saved, mut nonfinite_skipped) = (Vec::new(), -1, 0i64);
    let summary = |r: &Run<'_>, logged, eval| TrainSummary {
        run_dir: r.run_dir.clone(),
        start_step: r.start_step,
        last_step: r.state.step,
        logged,
        eval,
    };
    for step in r.start_step..tc.steps {
        // Named by a panic's one-line report (counted from 1, as logged).
        crate::panics::set_step(step + 1);
        tch::manual_seed(step_seed(tc.seed, step));
        let lr = lr_at(step, tc.steps, tc.warmup_steps, tc.lr, tc.min_lr);
        let out = r.step(StepAt { step, lr })?;
        r.state.step = step + 1;
        let done = r.state.step;
        let log_now = done % tc.log_every == 0 || done == tc.steps;
        let save_now = tc.checkpoint_every > 0 && done % tc.checkpoint_every == 0;
        let eval_now = r.hooks.evaluates_at(done);
        // The guard's counters are read where the step synchronises anyway,
        // and before anything is saved or evaluated: a checkpoint never
        // holds the state after a non-finite step under a later step's name.
        // (Every rank reads at the same steps: a stop signal is acted on
        // at once by one process only; ranks agree on it at log steps.)
        let mut skipped_now = 0;
        if log_now || save_now || eval_now || (r.par.is_none() && stop.requested()) {
            let report = r.guard.read()?;
            skipped_now = report.count;
            crate::guard::act(&report, &r.guard, done, r.last_good.as_deref())?;
        }
        if log_now {
            nonfinite_skipped += skipped_now;
            let line = r.log_line(done, lr, &out, nonfinite_skipped, started)?;
            logged.push(line);
        }
        if save_now {
            r.save()?;
            last_saved = done;
        }
        if eval_now {
            let (hooks, model) = (&mut r.hooks, &r.asm.model);
            let what = format!("evaluate at step {done}");
            crate::parallel::on_rank0(r.par, &what, || hooks.evaluate(model, done, false))?;
        }
        let stop_now =
            crate::parallel::agreed_stop(r.par, stop.requested(), done % tc.log_every == 0)?;
        if stop_now && done < tc.steps {
            if last_saved != done {
                r.save()?;
            }
            r.hooks.on_end(RunEnd::Stopped { step: done })?;
            let signal = stop.signal();
            return Err(Error::Stopped {
                signal,
                message: format!(
                    "stopped by {} after step {done} of {}; the checkpoint is written: continue \
                     with `vlmatch train --resume {}`",
                    crate::signals::name(signal),
                    tc.steps,
                    r.run_dir.display()
                ),
            });
        }
        if let Some(p) = r.par {
            p.beat(done);
        }
        r.hooks.on_step_end(done)?;
        if halt_after == Some(done) {
            r.hooks.on_end(RunEnd::Halted { step: done })?;
            return Ok(summary(&r, logged, None));
        }
    }
    if last_saved != r.state.step {
        r.save()?;
    }
    if r.main {
        r.hooks.evaluate(&r.asm.model, r.state.step, true)?;
    }
    r.hooks.on_end(RunEnd::Finished { step: r.state.step })?;
    let eval = r.resources.final_heldout.borrow_mut().take();
    Ok(summary(&r, logged, eval))
}

impl Run<'_> {
    /// One optimizer step over `train.accum_steps` batches of the loader.
    fn step(&mut self, at: StepAt) -> Result<StepOutput> {
        let Run {
            tc,
            asm,
            loader,
            optim,
            guard,
            hooks,
            par,
            state,
            device,
            ..
        } = self;
        let mut stepper = Stepper {
            optim,
            guard,
            par: *par,
            hooks,
            accum_steps: tc.accum_steps,
            grad_clip: tc.grad_clip,
        };
        if tc.contrastive_accum == ContrastiveAccum::Cached {
            let batches = (0..tc.accum_steps)
                .map(|_| {
                    state.batches += 1;
                    Ok(loader.next_batch()?.to_device_async(*device))
                })
                .collect::<Result<Vec<_>>>()?;
            let cache = GradCache::new(asm, tc, *par, hooks, at.step, batches);
            return stepper.step_with(at, || cache.whole().map(Some), |m| cache.micro(m));
        }
        stepper.step(at, |_| {
            state.batches += 1;
            let batch = loader.next_batch()?.to_device_async(*device);
            objectives(asm, tc, *par, hooks, at.step, &batch)
        })
    }

    /// The line logged after step `step`: the step's values (means over
    /// ranks), the hooks' scalars, the counters of skipped data and steps;
    /// appended to `metrics.jsonl` and recorded by every hook.
    fn log_line(
        &mut self,
        step: i64,
        lr: f64,
        out: &StepOutput,
        nonfinite_skipped: i64,
        started: std::time::Instant,
    ) -> Result<Map<String, Value>> {
        let mut line = Map::new();
        line.insert("step".into(), json!(step));
        line.insert("lr".into(), json!(lr));
        for (k, x) in self.hooks.on_log(step) {
            line.insert(k, json!(x));
        }
        line.insert("grad_norm".into(), json!(out.grad_norm.double_value(&[])));
        // Pairs skipped under data.on_error = "skip": dropped at load time,
        // and replaced or skipped by the loader in this invocation (on
        // every rank).
        let (values, skipped) =
            crate::parallel::logged_values(self.par, &out.values, self.loader.skipped())?;
        line.insert("data_skipped".into(), json!(self.load_skipped + skipped));
        if self.tc.on_nonfinite == OnNonFinite::Skip {
            line.insert("nonfinite_skipped".into(), json!(nonfinite_skipped));
        }
        // A non-finite value is logged as null: the guard has already
        // stopped the run, or dropped that step under `skip`.
        for (k, x) in values {
            line.insert(k, json!(x));
        }
        // Wall time since this invocation started (after the values above
        // synchronised the device); excluded from exactness checks.
        line.insert("time_s".into(), json!(started.elapsed().as_secs_f64()));
        if let Some((path, f)) = self.metrics.as_mut() {
            writeln!(f, "{}", Value::Object(line.clone())).map_err(|e| Error::io(&*path, e))?;
            let scalars = crate::tracking::flatten(&Value::Object(line.clone()));
            self.hooks.on_record(Record {
                step,
                group: "train",
                scalars: &scalars,
            })?;
        }
        Ok(line)
    }

    /// A checkpoint of the current step (rank 0 writes; the others wait
    /// for it, and stop with its reason if it fails).
    fn save(&mut self) -> Result<()> {
        let what = format!("write the checkpoint of step {}", self.state.step);
        // A sharded optimizer's parts gathered onto rank 0 (every rank).
        let optim_state = crate::zero::full_state(self.par, &self.optim)?;
        let written = crate::parallel::on_rank0(self.par, &what, || {
            crate::checkpoint::save_with_layout(
                &self.run_dir,
                &self.asm.vs,
                optim_state.unwrap_or_else(Vec::new),
                self.hooks.checkpoint_tensors(),
                self.state,
                Some(self.layout),
                self.tc.keep_checkpoints,
            )
        })?;
        if let Some(path) = written {
            tracing::debug!(path = %path.display(), "checkpoint");
            self.hooks.on_checkpoint(self.state.step, &path)?;
            self.last_good = Some(path);
        }
        Ok(())
    }
}
