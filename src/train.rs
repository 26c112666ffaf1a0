//! The trainer: AdamW with warm-up and cosine decay, gradient clipping and
//! accumulation, atomic checkpoints, exact resume, `metrics.jsonl`, a
//! progress bar, and a held-out evaluation at the end.
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
//! directory and shows progress; logged values are means over ranks.

use crate::checkpoint::{self, Layout, TrainerState};
use crate::data::loader::{CaptionPreps, Loader, LoaderConfig, Source};
use crate::eval::{self, EvalInputs, HeldOut};
use crate::fault::{Fault, WriteFault};
use crate::guard::Guard;
use crate::momentum::MomentumTrainer;
use crate::optim::{lr_at, AdamW};
use crate::parallel::Parallel;
use crate::rng::mix;
use crate::setup;
use crate::tracking::{flatten, progress::Progress, tensorboard::EventWriter};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Batch, Error, Forward, Result};
use vlmatch_dist::LaunchEnv;
use vlmatch_registry::config::base_from_file;
use vlmatch_registry::config::{HardNegatives, OnNonFinite, TrainConfig};
use vlmatch_registry::{Assembly, ConfigLayers};

pub struct TrainOptions {
    pub layers: ConfigLayers,
    /// Where to write; default `runs/<name>-<UTC time>`.
    pub run_dir: Option<PathBuf>,
    /// Continue this run directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop abruptly after this step, without a final checkpoint, as a kill
    /// would (used by the resume tests).
    pub halt_after: Option<i64>,
    pub progress: bool,
}

#[derive(Debug)]
pub struct TrainSummary {
    pub run_dir: PathBuf,
    /// Step at which this invocation started (0 unless resumed).
    pub start_step: i64,
    pub last_step: i64,
    /// The logged metrics of this invocation, one object per logged step.
    pub logged: Vec<Map<String, Value>>,
    /// The held-out evaluation at the end (retrieval and matching).
    pub eval: Option<HeldOut>,
}

fn default_run_dir(preset: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    PathBuf::from("runs").join(format!(
        "{preset}-{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    ))
}

/// Keep the lines of `metrics.jsonl` up to `step`, dropping what a killed run
/// logged after its last checkpoint.
fn truncate_metrics(path: &Path, step: i64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(Value::as_i64))
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, kept).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn step_seed(seed: u64, step: i64) -> i64 {
    (mix(&[seed, step as u64, 0x5EED]) >> 1) as i64
}

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

/// One optimiser step: `train.accum_steps` batches from `next_batch`, every
/// objective's weighted losses summed and back-propagated, gradients
/// clipped, AdamW at `lr`, unless the loss or the gradient norm is not
/// finite (`guard`). No host synchronisation: the trainer and the
/// benchmark (`vlmatch bench`) share this function, so what the benchmark
/// times is what training runs.
pub fn train_step(
    asm: &Assembly,
    optim: &mut AdamW,
    tc: &TrainConfig,
    step: i64,
    lr: f64,
    guard: &mut Guard,
    next_batch: impl FnMut() -> Result<Batch>,
) -> Result<StepOutput> {
    train_step_with(
        asm,
        optim,
        tc,
        StepAt { step, lr },
        None,
        None,
        guard,
        next_batch,
    )
}

/// [`train_step`] as one rank of a data-parallel run (`par`): the forward
/// sees the global batch through the process group, and the gradients are
/// averaged over ranks (in fp32) before they are clipped, so every rank
/// takes the step one process holding the global batch would. With
/// `momentum` (ALBEF's momentum distillation) the objectives see the
/// momentum model and queues, each batch's momentum features are queued,
/// and the hook after the optimizer step moves the momentum model.
#[allow(clippy::too_many_arguments)]
pub fn train_step_with(
    asm: &Assembly,
    optim: &mut AdamW,
    tc: &TrainConfig,
    StepAt { step, lr }: StepAt,
    par: Option<&Parallel>,
    momentum: Option<&MomentumTrainer>,
    guard: &mut Guard,
    mut next_batch: impl FnMut() -> Result<Batch>,
) -> Result<StepOutput> {
    let mut values: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut loss_keys: Vec<String> = vec!["loss".into()];
    let mut add = |k: String, v: Tensor| {
        let v = v.detach().to_kind(Kind::Float) / tc.accum_steps as f64;
        match values.remove(&k) {
            Some(old) => values.insert(k, old + v),
            None => values.insert(k, v),
        };
    };
    if let Some(m) = momentum {
        m.before_step(step);
    }
    for micro in 0..tc.accum_steps {
        let batch = next_batch()?;
        let mut fwd = Forward::new(&asm.model, &batch, true);
        if let Some(m) = momentum {
            fwd = fwd.with_momentum(&m.momentum);
        }
        if let Some(p) = par {
            fwd = fwd.with_collective(p.collective());
            if tc.dist.hard_negatives == HardNegatives::Local {
                fwd = fwd.with_local_negatives();
            }
        }
        let mut total: Option<Tensor> = None;
        for o in &asm.objectives {
            let _span = tracing::trace_span!("objective", name = %o.name).entered();
            let out = o.objective.forward(&fwd, step)?;
            for (k, l) in out.losses {
                let weighted = &l * o.weight;
                if !loss_keys.contains(&k) {
                    loss_keys.push(k.clone());
                }
                add(k, l);
                total = Some(match total {
                    Some(t) => t + weighted,
                    None => weighted,
                });
            }
            for (k, m) in out.metrics {
                add(k, m);
            }
        }
        let total = total.ok_or_else(|| Error::Config("no objective produced a loss".into()))?;
        // The queue takes this batch's momentum features after every
        // objective has read it.
        fwd.enqueue_momentum();
        let total = guard.poison(total, step);
        add("loss".into(), total.shallow_clone());
        if let Some(p) = par {
            // Only the last micro-batch's backward reduces (DDP's no_sync).
            p.sync_gradients(micro + 1 == tc.accum_steps);
        }
        // A collective in backward (gathered ITC features) reports its
        // failure as an error here rather than a panic.
        guard.gate(&(total / tc.accum_steps as f64)).f_backward()?;
    }
    if let Some(p) = par {
        p.reduce_gradients()?;
    }
    let grad_norm = optim.clip_grad_norm(tc.grad_clip);
    let losses: BTreeMap<String, Tensor> = values
        .iter()
        .filter(|(k, _)| loss_keys.contains(k))
        .map(|(k, v)| (k.clone(), v.shallow_clone()))
        .collect();
    let applied = guard.decide(step, &grad_norm, &losses);
    optim.step_masked(lr, &applied);
    // The hook after the optimizer step: the momentum model follows the
    // weights just updated (where the step was applied).
    if let Some(m) = momentum {
        m.after_step(&applied);
    }
    optim.zero_grad();
    Ok(StepOutput {
        values,
        grad_norm,
        applied,
    })
}

/// Write `text` to `path` through a temporary file, so that a reader (a
/// rank loading the run's config while rank 0 rewrites it) never sees it
/// half written.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Trains as [`TrainOptions`] say; as one rank of a data-parallel run when
/// a launcher's environment (`torchrun`, `srun`) says so.
pub fn train(opts: TrainOptions) -> Result<TrainSummary> {
    let launch =
        LaunchEnv::from_env().map_err(|e| Error::Config(format!("launcher environment: {e}")))?;
    train_launched(opts, launch, None)
}

/// [`train`] with the launch given: `launch` (several ranks when its world
/// size is above 1), and for the fault tests, a failure to inject.
pub fn train_launched(
    opts: TrainOptions,
    launch: Option<LaunchEnv>,
    fault: Option<Fault>,
) -> Result<TrainSummary> {
    train_inner(opts, launch.as_ref(), fault)
}

fn train_inner(
    mut opts: TrainOptions,
    launch: Option<&LaunchEnv>,
    fault: Option<Fault>,
) -> Result<TrainSummary> {
    let run_dir = if let Some(dir) = &opts.resume {
        opts.layers.base = Some(base_from_file(&dir.join("config.toml"))?);
        dir.clone()
    } else {
        let preset = opts
            .layers
            .base
            .as_ref()
            .map(|b| {
                b.0.rsplit(['/', ' '])
                    .next()
                    .unwrap_or("run")
                    .trim_end_matches(".toml")
                    .to_string()
            })
            .unwrap_or_else(|| "run".into());
        opts.run_dir
            .clone()
            .unwrap_or_else(|| default_run_dir(&preset))
    };
    let loaded = opts.layers.load()?;
    let cfg = loaded.config.clone();
    let tc = &cfg.train;
    if tc.steps <= 0 || tc.batch_size == 0 || tc.accum_steps == 0 || tc.log_every <= 0 {
        return Err(Error::Config(format!(
            "config keys `train.steps` ({}), `train.batch_size` ({}), `train.accum_steps` ({}) and \
             `train.log_every` ({}) must be positive",
            tc.steps, tc.batch_size, tc.accum_steps, tc.log_every
        )));
    }
    // Several ranks: a launcher started this process as one of them.
    let multi = launch.filter(|l| l.world_size > 1);
    let device = match launch {
        Some(l) => setup::rank_device(&tc.device, l.local_rank)?,
        None => setup::device(&tc.device)?,
    };
    let threads = match multi {
        Some(_) => setup::rank_threads(tc),
        None => setup::threads(tc),
    };
    tch::set_num_threads(threads as i32);
    tch::manual_seed(step_seed(tc.seed, -1));

    let mut par = match multi {
        Some(l) => Some(Parallel::connect(
            l,
            device,
            std::time::Duration::from_secs(tc.dist.timeout.max(1)),
        )?),
        None => None,
    };
    let result = train_ranked(&opts, &run_dir, &loaded, device, par.as_mut(), fault);
    match (result, par) {
        (Ok(summary), Some(p)) => {
            p.leave();
            Ok(summary)
        }
        // A failed collective: what the heartbeats say about the other
        // ranks. (This rank's heartbeat then stops, so the others learn
        // that it left.) Its own errors (data, config) it reports as they are.
        (Err(e), Some(p)) if Parallel::is_communication(&e) => Err(p.explain(e)),
        (result, _) => result,
    }
}

/// The training run proper, on one process or as rank `par.rank`.
fn train_ranked(
    opts: &TrainOptions,
    run_dir: &Path,
    loaded: &vlmatch_registry::LoadedConfig,
    device: Device,
    mut par: Option<&mut Parallel>,
    fault: Option<Fault>,
) -> Result<TrainSummary> {
    let cfg = &loaded.config;
    let tc = &cfg.train;
    let (rank, world) = par.as_ref().map_or((0, 1), |p| (p.rank, p.world));
    let main = rank == 0;
    let tok = Arc::new(setup::tokenizer(loaded)?);
    let (mut asm, env) = setup::model_on(loaded, &tok, device)?;
    let (train_source, heldout) = setup::train_source(loaded)?;
    // Entries dropped while loading (data.on_error = "skip").
    let load_skipped = match &train_source {
        Source::Pairs(ds) => ds.skipped,
        Source::Shards(_) => 0,
    };
    // One epoch in optimizer steps (unknown for a shard stream): the
    // default ramp of momentum distillation's alpha.
    let epoch_steps = match &train_source {
        Source::Pairs(ds) => {
            let per_step = (world * tc.batch_size * tc.accum_steps).max(1);
            Some(ds.len().div_ceil(per_step) as i64)
        }
        Source::Shards(_) => None,
    };
    let momentum = MomentumTrainer::build(loaded, &env, &asm, world, epoch_steps)?;

    let metrics_path = run_dir.join("metrics.jsonl");
    let eval_path = run_dir.join("eval.jsonl");
    if main {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        write_atomic(&run_dir.join("config.toml"), &loaded.to_toml())?;
    }

    let mut optim = AdamW::new(&asm.vs, tc.betas, tc.eps, tc.weight_decay);
    let layout = Layout {
        world_size: world as i64,
        batch_size: tc.batch_size as i64,
    };
    let mut state = TrainerState {
        step: 0,
        batches: 0,
        seed: tc.seed as i64,
    };
    // Every variable in name order: the order ranks broadcast them in.
    let mut variables: Vec<(String, Tensor)> = asm.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    let variables: Vec<Tensor> = variables.into_iter().map(|(_, t)| t).collect();
    let mut resumed_from: Option<PathBuf> = None;
    if opts.resume.is_some() {
        // Rank 0 reads the checkpoint; the others get its counters, then
        // its weights and optimizer moments, by broadcast.
        let mut header = [0i64; 7];
        if main {
            let path = checkpoint::newest_intact(run_dir)?;
            resumed_from = Some(path.clone());
            let checkpoint::Loaded {
                optim: optim_state,
                state: st,
                layout: saved,
                extra,
            } = checkpoint::load_full(&path, &mut asm.vs)?;
            if let Some(m) = &momentum {
                m.load(&extra, &path)?;
            }
            optim.load_state(&optim_state).map_err(|m| Error::Data {
                path: path.clone(),
                line: None,
                message: m,
            })?;
            // Checkpoints from before data parallelism: one process.
            let saved = saved.unwrap_or(Layout {
                world_size: 1,
                batch_size: tc.batch_size as i64,
            });
            header = [
                st.step,
                st.batches,
                st.seed,
                optim.t,
                saved.world_size,
                saved.batch_size,
                momentum.as_ref().map_or(0, MomentumTrainer::queue_ptr),
            ];
            tracing::info!(checkpoint = %path.display(), step = st.step, "resuming");
        }
        if let Some(p) = par.as_deref() {
            let mut h = Tensor::from_slice(&header).to_device(device);
            p.broadcast(std::slice::from_mut(&mut h))?;
            header = Vec::<i64>::try_from(h.to_device(Device::Cpu))?
                .try_into()
                .expect("seven counters");
        }
        let [step, batches, seed, t, saved_world, saved_batch, queue_ptr] = header;
        Layout {
            world_size: saved_world,
            batch_size: saved_batch,
        }
        .check_resume(layout)?;
        state = TrainerState {
            step,
            batches,
            seed,
        };
        if let Some(p) = par.as_deref() {
            let moments: Vec<Tensor> = optim.state().into_iter().map(|(_, t)| t).collect();
            p.broadcast(&variables)?;
            p.broadcast(&moments[..moments.len() - 1])?;
            optim.t = t;
            if let Some(m) = &momentum {
                p.broadcast(&m.broadcast_tensors())?;
                m.set_queue_ptr(queue_ptr);
            }
        }
        if main {
            truncate_metrics(&metrics_path, state.step)?;
            truncate_metrics(&eval_path, state.step)?;
        }
    } else {
        if main {
            for report in crate::pretrained::apply_inits(loaded, &asm.vs.variables())? {
                tracing::info!("loaded {report}");
            }
            let _ = std::fs::remove_file(&metrics_path);
            let _ = std::fs::remove_file(&eval_path);
        }
        if let Some(p) = par.as_deref() {
            p.broadcast(&variables)?;
        }
        if let Some(m) = &momentum {
            // The momentum model starts as the (initialised, broadcast)
            // weights; every rank drew the same initial queue, but take
            // rank 0's to be sure.
            m.copy_params();
            if let Some(p) = par.as_deref() {
                p.broadcast(&m.broadcast_tensors())?;
            }
        }
    }
    if let Some(p) = par.as_deref_mut() {
        p.init_reducer(&asm.vs.trainable_variables(), tc.dist.bucket_mb)?;
    }
    let par = par.as_deref();
    let start_step = state.step;
    let n_params = asm.trainable_parameters();
    tracing::info!(
        run_dir = %run_dir.display(),
        device = ?env.device,
        compute = ?env.compute,
        parameters = n_params,
        data = %train_source,
        ranks = world,
        global_batch = world * tc.batch_size,
        "training"
    );

    let mut loader_cfg =
        LoaderConfig::new(&cfg.data, tc.batch_size, Some(tc.seed)).shard(rank, world);
    loader_cfg.preps = CaptionPreps::new(asm.caption_preps());
    let mut loader =
        Loader::from_source(train_source, tok.clone(), loader_cfg, state.batches as u64)?;
    let mut metrics_file = if main {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::io(&metrics_path, e))?,
        )
    } else {
        None
    };

    let mut bar = Progress::new(opts.progress && main, start_step, tc.steps);
    let resumed_at = opts.resume.is_some().then_some(start_step);
    let mut tb = (main && tc.tensorboard)
        .then(|| EventWriter::create(&run_dir.join("tb"), resumed_at))
        .transpose()?;

    let eval_inputs = EvalInputs::new(cfg, &tok);
    let started = std::time::Instant::now();
    let stop = crate::signals::StopSignal::install()?;
    stop.clear();
    let mut guard = Guard::new(tc, device).poison_at(fault.and_then(|f| f.nan_step(rank)));
    // The newest checkpoint known good: the one resumed from, then each one
    // written (named when a non-finite step stops the run).
    let mut last_good: Option<PathBuf> = resumed_from.clone();
    let mut logged = Vec::new();
    let mut last_saved = -1;
    let mut nonfinite_skipped = 0i64;
    let write_fault = WriteFault::from_env();
    let save =
        |state: TrainerState, optim: &AdamW, last_good: &mut Option<PathBuf>| -> Result<()> {
            if main {
                let path = checkpoint::save_with_layout(
                    run_dir,
                    &asm.vs,
                    optim.state(),
                    momentum
                        .as_ref()
                        .map(MomentumTrainer::checkpoint_tensors)
                        .unwrap_or_default(),
                    state,
                    Some(layout),
                    tc.keep_checkpoints,
                    write_fault.filter(|f| f.step == state.step),
                )?;
                tracing::debug!(path = %path.display(), "checkpoint");
                *last_good = Some(path);
            }
            // The others wait while rank 0 writes, so that nobody runs ahead.
            par.map_or(Ok(()), Parallel::barrier)
        };
    for step in start_step..tc.steps {
        // Named by a panic's one-line report (counted from 1, as logged).
        crate::panics::set_step(step + 1);
        tch::manual_seed(step_seed(tc.seed, step));
        let lr = lr_at(step, tc.steps, tc.warmup_steps, tc.lr, tc.min_lr);
        let out = train_step_with(
            &asm,
            &mut optim,
            tc,
            StepAt { step, lr },
            par,
            momentum.as_ref(),
            &mut guard,
            || {
                state.batches += 1;
                Ok(loader.next_batch()?.to_device(device))
            },
        )?;
        let (values, grad_norm) = (out.values, out.grad_norm);
        state.step = step + 1;

        let log_now = state.step % tc.log_every == 0 || state.step == tc.steps;
        let save_now = tc.checkpoint_every > 0 && state.step % tc.checkpoint_every == 0;
        let eval_now = heldout.is_some() && cfg.eval.every > 0 && state.step % cfg.eval.every == 0;
        let mut skipped_now = 0;
        // The guard's counters are read where the step synchronises anyway,
        // and before anything is saved or evaluated: a checkpoint never
        // holds the state after a non-finite step under a later step's name.
        // (Every rank reads at the same steps: a stop signal is acted on
        // at once by one process only; ranks agree on it at log steps.)
        if log_now || save_now || eval_now || (par.is_none() && stop.requested()) {
            let report = guard.read()?;
            skipped_now = report.count;
            crate::guard::act(&report, &guard, state.step, last_good.as_deref())?;
        }

        if log_now {
            let mut line = Map::new();
            line.insert("step".into(), json!(state.step));
            line.insert("lr".into(), json!(lr));
            if let Some(m) = &momentum {
                line.insert("mod_alpha".into(), json!(m.momentum.alpha()));
            }
            line.insert("grad_norm".into(), json!(grad_norm.double_value(&[])));
            // Pairs skipped under data.on_error = "skip": dropped at load
            // time, and replaced or skipped by the loader in this invocation
            // (on every rank).
            let (values, skipped) = match par {
                Some(p) => {
                    let (means, skipped) = p.mean_over_ranks(&values, loader.skipped())?;
                    (means, load_skipped + skipped)
                }
                None => (
                    values
                        .iter()
                        .map(|(k, v)| (k.clone(), v.double_value(&[])))
                        .collect(),
                    load_skipped + loader.skipped(),
                ),
            };
            line.insert("data_skipped".into(), json!(skipped));
            if tc.on_nonfinite == OnNonFinite::Skip {
                nonfinite_skipped += skipped_now;
                line.insert("nonfinite_skipped".into(), json!(nonfinite_skipped));
            }
            // A non-finite value is logged as null: the guard above has
            // already stopped the run, or dropped that step under `skip`.
            for (k, x) in values {
                line.insert(k, json!(x));
            }
            // Wall time since this invocation started (after the values
            // above synchronised the device); excluded from exactness checks.
            line.insert("time_s".into(), json!(started.elapsed().as_secs_f64()));
            if let Some(f) = metrics_file.as_mut() {
                writeln!(f, "{}", Value::Object(line.clone()))
                    .map_err(|e| Error::io(&metrics_path, e))?;
            }
            let loss = line.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN);
            bar.logged(state.step, loss, lr);
            if let Some(tb) = tb.as_mut() {
                tb.scalars(state.step, "train", &flatten(&Value::Object(line.clone())))?;
            }
            logged.push(line);
        }
        bar.set_position(state.step);
        if save_now {
            save(state, &optim, &mut last_good)?;
            last_saved = state.step;
        }
        if let (Some(ds), true) = (&heldout, eval_now) {
            if main {
                let r = eval::held_out(&asm.model, ds, &eval_inputs, state.step)?;
                let line = serde_json::to_string(&r).expect("serialisable");
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&eval_path)
                    .map_err(|e| Error::io(&eval_path, e))?;
                writeln!(f, "{line}").map_err(|e| Error::io(&eval_path, e))?;
                bar.heldout(&r);
                if let Some(tb) = tb.as_mut() {
                    tb.scalars(state.step, "heldout", &flatten(&json!(r)))?;
                }
            }
            par.map_or(Ok(()), Parallel::barrier)?;
        }
        // A stop signal: one process acts at once; ranks agree at logging
        // steps (where they synchronise anyway), so that all stop together.
        let requested = stop.requested();
        let stop_now = match par {
            None => requested,
            Some(p) if state.step % tc.log_every == 0 => p.agree_any(requested)?,
            Some(_) => false,
        };
        if stop_now && state.step < tc.steps {
            if last_saved != state.step {
                save(state, &optim, &mut last_good)?;
            }
            bar.abandon();
            let signal = stop.signal();
            return Err(Error::Stopped {
                signal,
                message: format!(
                    "stopped by {} after step {} of {}; the checkpoint is written: continue \
                     with `vlmatch train --resume {}`",
                    crate::signals::name(signal),
                    state.step,
                    tc.steps,
                    run_dir.display()
                ),
            });
        }
        if let Some(p) = par {
            p.progress(state.step);
        }
        if let Some(f) = fault {
            f.strike(rank, state.step);
        }
        if opts.halt_after == Some(state.step) {
            bar.abandon();
            return Ok(TrainSummary {
                run_dir: run_dir.to_path_buf(),
                start_step,
                last_step: state.step,
                logged,
                eval: None,
            });
        }
    }
    if last_saved != state.step {
        save(state, &optim, &mut last_good)?;
    }
    bar.finish();

    let eval = match (&heldout, cfg.eval.at_end && main) {
        (Some(ds), true) => {
            let r = eval::held_out(&asm.model, ds, &eval_inputs, state.step)?;
            let path = run_dir.join("eval-heldout.json");
            let text = serde_json::to_string_pretty(&r).expect("serialisable");
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            // TensorBoard has it already when `eval.jsonl` has this step.
            let in_jsonl = cfg.eval.every > 0 && state.step % cfg.eval.every == 0;
            if let (Some(tb), false) = (tb.as_mut(), in_jsonl) {
                tb.scalars(state.step, "heldout", &flatten(&json!(r)))?;
            }
            Some(r)
        }
        _ => None,
    };
    Ok(TrainSummary {
        run_dir: run_dir.to_path_buf(),
        start_step,
        last_step: state.step,
        logged,
        eval,
    })
}
