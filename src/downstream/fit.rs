//! The fine-tuning loop every downstream task (VQA, SNLI-VE, NLVR2) shares,
//! built on the one guarded step ([`crate::step::Stepper`]): gradient
//! accumulation, the non-finite guard, clipping and data parallelism as in
//! pretraining; atomic checkpoints every `train.checkpoint_every` steps and
//! at the end, `--resume` from the newest intact one (exact: the generator
//! is reseeded from `(train.seed, step)` before every step and batch `g`
//! is a function of the seed and `g`), `metrics.jsonl`, and a stop signal
//! that writes a checkpoint first. Its own schedule: linear warm-up over a
//! tenth of the steps (at most `train.warmup_steps`), then cosine decay
//! from the task's learning rate to 2% of it.
//!
//! Validation (where the task has it) every `every` steps and at the end
//! keeps the best weights in `OUT/best/`; `validation.jsonl` records each
//! result, and a checkpoint records the best so far (`fit.best_step`,
//! `fit.best_accuracy`), so a resumed run keeps choosing the same way.

use crate::checkpoint::{self, Layout, TrainerState};
use crate::fault::Fault;
use crate::guard::Guard;
use crate::hooks::Hooks;
use crate::optim::{lr_at, AdamW};
use crate::parallel::Parallel;
use crate::step::{Micro, StepAt, Stepper};
use crate::tracking::progress::Progress;
use serde_json::{json, Map, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::TrainConfig;

/// How a fine-tuning run trains.
pub struct FitSpec<'a> {
    /// The task's name, for messages.
    pub task: &'a str,
    /// The fine-tuned run's directory.
    pub out: &'a Path,
    /// The run's `[train]` section: betas, epsilon, weight decay, clipping,
    /// accumulation, the guard, checkpoint and log intervals, the seed.
    pub train: &'a TrainConfig,
    pub steps: i64,
    pub lr: f64,
    /// Items per rank per micro-batch (`--batch-size`).
    pub batch_size: usize,
    /// Continue from the newest checkpoint in `out`.
    pub resume: bool,
    pub progress: bool,
    pub device: Device,
    /// The fault tests' injected failure.
    pub fault: Option<Fault>,
}

/// What a fine-tuning run did.
#[derive(Debug, Clone)]
pub struct Fitted {
    /// The last logged loss (mean over ranks).
    pub last_loss: f64,
    /// `(step, accuracy)` at each validation, this run and any before it.
    pub curve: Vec<(i64, f64)>,
    /// The best validation so far, whose weights are in the model now.
    pub best: Option<(i64, f64)>,
}

/// Validation: every `every` steps and after the last, `run(step)` gives
/// an accuracy (the same on every rank).
pub struct Validation<'a> {
    pub every: i64,
    pub run: &'a mut dyn FnMut(i64) -> Result<f64>,
}

fn step_seed(seed: u64, step: i64) -> i64 {
    (crate::rng::mix(&[seed, step as u64, 0xF17E]) >> 1) as i64
}

/// Seed libtorch's generator for building a fine-tuning model (its new
/// head's initial weights) from the run's `train.seed`.
pub fn seed_initialisation(loaded: &vlmatch_registry::LoadedConfig) {
    tch::manual_seed(step_seed(loaded.config.train.seed, -1));
}

/// The directory of the best weights of a fine-tuned run `out`.
pub fn best_dir(out: &Path) -> PathBuf {
    out.join("best")
}

/// The weights a fine-tuned run keeps: its best on validation, else its
/// newest checkpoint.
pub fn kept_weights(out: &Path) -> Result<PathBuf> {
    let best = best_dir(out);
    if best.join("checkpoints").join("latest").is_file() {
        checkpoint::newest_intact(&best)
    } else {
        checkpoint::newest_intact(out)
    }
}

/// Train `vs` for `spec.steps` steps, each over `train.accum_steps`
/// micro-batches from `micro(g)` (`g`: the micro-batch's index over the
/// whole run, which picks its data); validate with `validation`; as one
/// rank of `par` when given. On return the model holds the best validated
/// weights (or the last).
pub fn fit(
    spec: &FitSpec<'_>,
    vs: &nn::VarStore,
    mut par: Option<&mut Parallel>,
    mut micro: impl FnMut(i64) -> Result<Micro>,
    mut validation: Option<Validation<'_>>,
) -> Result<Fitted> {
    let tc = spec.train;
    let (rank, world) = par.as_ref().map_or((0, 1), |p| (p.rank, p.world));
    let main = rank == 0;
    let out = spec.out;
    let mut optim = AdamW::new(vs, tc.betas, tc.eps, tc.weight_decay);
    crate::zero::shard(par.as_deref(), &mut optim, tc)?;
    let layout = Layout {
        world_size: world as i64,
        batch_size: spec.batch_size as i64,
    };
    let mut state = TrainerState {
        step: 0,
        batches: 0,
        seed: tc.seed as i64,
    };
    let mut best: Option<(i64, f64)> = None;
    let metrics_path = out.join("metrics.jsonl");
    let val_path = out.join("validation.jsonl");
    let mut variables: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let variables: Vec<Tensor> = variables.into_iter().map(|(_, t)| t).collect();
    if spec.resume {
        // Every rank reads the checkpoint (fine-tuned models are small);
        // each checks the layout.
        let path = checkpoint::newest_intact(out)?;
        let saved = checkpoint::load_full(&path, vs)?;
        optim.load_state(&saved.optim).map_err(|m| Error::Data {
            path: path.clone(),
            line: None,
            message: m,
        })?;
        if let Some(was) = saved.layout {
            was.check_resume(layout)?;
        }
        state = saved.state;
        let counter = |k: &str| saved.extra.get(k).map(checkpoint::scalar_i64);
        if let Some(step) = counter("fit.best_step")
            .transpose()
            .map_err(|m| Error::Data {
                path: path.clone(),
                line: None,
                message: format!("`fit.best_step`: {m}"),
            })?
        {
            let acc = saved
                .extra
                .get("fit.best_accuracy")
                .map(|t| t.double_value(&[]))
                .unwrap_or(f64::NAN);
            best = Some((step, acc));
        }
        tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
        if main {
            crate::train::truncate_metrics(&metrics_path, state.step)?;
            crate::train::truncate_metrics(&val_path, state.step)?;
        }
    } else {
        if main {
            let _ = std::fs::remove_file(&metrics_path);
            let _ = std::fs::remove_file(&val_path);
            let _ = std::fs::remove_dir_all(best_dir(out));
        }
        if let Some(p) = par.as_deref() {
            p.broadcast(&variables)?;
        }
    }
    if let Some(p) = par.as_deref_mut() {
        p.init_reducer(&vs.trainable_variables(), tc.dist.bucket_mb)?;
    }
    let par = par.as_deref();
    let mut curve = read_curve(&val_path);
    let hooks = Hooks::none();
    let mut guard = Guard::new(tc, spec.device);
    let stop = crate::signals::StopSignal::install()?;
    stop.clear();
    let mut bar = Progress::new(spec.progress && main, state.step, spec.steps);
    let warmup = (spec.steps / 10).min(tc.warmup_steps);
    let mut last_loss = f64::NAN;
    let mut last_good: Option<PathBuf> = None;
    let save = |state: TrainerState,
                optim: &AdamW,
                best: Option<(i64, f64)>,
                last_good: &mut Option<PathBuf>|
     -> Result<()> {
        let what = format!("write the checkpoint of step {}", state.step);
        let optim_state = crate::zero::full_state(par, optim)?;
        let written = crate::parallel::on_rank0(par, &what, || {
            let mut extra = Vec::new();
            if let Some((s, a)) = best {
                extra.push(("fit.best_step".to_string(), Tensor::from(s)));
                extra.push(("fit.best_accuracy".to_string(), Tensor::from(a)));
            }
            checkpoint::save_with_layout(
                out,
                vs,
                optim_state.unwrap_or_default(),
                extra,
                state,
                Some(layout),
                tc.keep_checkpoints,
            )
        })?;
        if let Some(path) = written {
            *last_good = Some(path);
        }
        Ok(())
    };
    let mut metrics = main
        .then(|| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::io(&metrics_path, e))
        })
        .transpose()?;
    for step in state.step..spec.steps {
        crate::panics::set_step(step + 1);
        tch::manual_seed(step_seed(tc.seed, step));
        let lr = lr_at(step, spec.steps, warmup, spec.lr, spec.lr * 0.02);
        let mut stepper = Stepper {
            optim: &mut optim,
            guard: &mut guard,
            par,
            hooks: &hooks,
            accum_steps: tc.accum_steps,
            grad_clip: tc.grad_clip,
        };
        let done_out = stepper.step(StepAt { step, lr }, |_| {
            state.batches += 1;
            micro(state.batches - 1)
        })?;
        state.step = step + 1;
        let done = state.step;
        let last = done == spec.steps;
        let log_now = done % tc.log_every == 0 || last;
        let save_now = (tc.checkpoint_every > 0 && done % tc.checkpoint_every == 0) || last;
        let val_now = validation
            .as_ref()
            .is_some_and(|v| done % v.every.max(1) == 0 || last);
        if log_now || save_now || val_now || (par.is_none() && stop.requested()) {
            let report = guard.read()?;
            crate::guard::act(&report, &guard, done, last_good.as_deref())?;
        }
        if log_now {
            let (values, _) = crate::parallel::logged_values(par, &done_out.values, 0)?;
            last_loss = values.get("loss").copied().unwrap_or(f64::NAN);
            let mut line = Map::new();
            line.insert("step".into(), json!(done));
            line.insert("lr".into(), json!(lr));
            line.insert(
                "grad_norm".into(),
                json!(done_out.grad_norm.double_value(&[])),
            );
            for (k, x) in values {
                line.insert(k, json!(x));
            }
            if let Some(f) = metrics.as_mut() {
                writeln!(f, "{}", Value::Object(line)).map_err(|e| Error::io(&metrics_path, e))?;
            }
            bar.logged(done, last_loss, lr);
        }
        if let (Some(v), true) = (validation.as_mut(), val_now) {
            let acc = (v.run)(done)?;
            tracing::info!(task = spec.task, step = done, accuracy = acc, "validation");
            curve.push((done, acc));
            if main {
                append_line(&val_path, &json!({"step": done, "accuracy": acc}))?;
            }
            if best.is_none_or(|(_, b)| acc > b) {
                best = Some((done, acc));
                if main {
                    checkpoint::save(&best_dir(out), vs, Vec::new(), state, 1)?;
                }
            }
        }
        if save_now {
            save(state, &optim, best, &mut last_good)?;
        }
        bar.set_position(done);
        let stop_now = crate::parallel::agreed_stop(par, stop.requested(), log_now)?;
        if stop_now && !last {
            if !save_now {
                save(state, &optim, best, &mut last_good)?;
            }
            bar.abandon();
            let signal = stop.signal();
            return Err(Error::Stopped {
                signal,
                message: format!(
                    "stopped by {} after step {done} of {}; the checkpoint is written: continue \
                     with `vlmatch finetune --task {} ... --out {} --resume`",
                    crate::signals::name(signal),
                    spec.steps,
                    spec.task,
                    out.display()
                ),
            });
        }
        if let Some(p) = par {
            p.beat(done);
        }
        if let Some(f) = spec.fault {
            f.strike(rank, done);
        }
    }
    bar.finish();
    if let Some((s, _)) = best {
        if s != state.step {
            checkpoint::load(&checkpoint::newest_intact(&best_dir(out))?, vs)?;
        }
    }
    Ok(Fitted {
        last_loss,
        curve,
        best,
    })
}

/// The `(step, accuracy)` lines of `validation.jsonl` (empty when absent).
fn read_curve(path: &Path) -> Vec<(i64, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v.get("step")?.as_i64()?, v.get("accuracy")?.as_f64()?)))
        .collect()
}

fn append_line(path: &Path, v: &Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{v}").map_err(|e| Error::io(path, e))
}
