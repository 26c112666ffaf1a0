//! The trainer: AdamW with warm-up and cosine decay, gradient clipping and
//! accumulation, atomic checkpoints, exact resume, `metrics.jsonl`, a
//! progress bar, and a held-out evaluation at the end.
//!
//! Determinism: libtorch's generator is reseeded from `(train.seed, step)`
//! before every step, and batch `g` of the loader is a function of the seed
//! and `g`; so a run resumed from a checkpoint continues exactly as if it had
//! never stopped (bit-exact on CPU).

use crate::checkpoint::{self, TrainerState};
use crate::data::loader::{CaptionPreps, Loader, LoaderConfig, Source};
use crate::eval::{self, EvalInputs, HeldOut};
use crate::optim::{lr_at, AdamW};
use crate::rng::mix;
use crate::setup;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, Error, Forward, Result};
use vlmatch_registry::config::base_from_file;
use vlmatch_registry::config::TrainConfig;
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
}

/// One optimiser step: `train.accum_steps` batches from `next_batch`, every
/// objective's weighted losses summed and back-propagated, gradients
/// clipped, AdamW at `lr`. No host synchronisation: the trainer and the
/// benchmark (`vlmatch bench`) share this function, so what the benchmark
/// times is what training runs.
pub fn train_step(
    asm: &Assembly,
    optim: &mut AdamW,
    tc: &TrainConfig,
    step: i64,
    lr: f64,
    mut next_batch: impl FnMut() -> Result<Batch>,
) -> Result<StepOutput> {
    let mut values: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut add = |k: String, v: Tensor| {
        let v = v.detach().to_kind(Kind::Float) / tc.accum_steps as f64;
        match values.remove(&k) {
            Some(old) => values.insert(k, old + v),
            None => values.insert(k, v),
        };
    };
    for _ in 0..tc.accum_steps {
        let batch = next_batch()?;
        let fwd = Forward::new(&asm.model, &batch, true);
        let mut total: Option<Tensor> = None;
        for o in &asm.objectives {
            let _span = tracing::trace_span!("objective", name = %o.name).entered();
            let out = o.objective.forward(&fwd, step)?;
            for (k, l) in out.losses {
                let weighted = &l * o.weight;
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
        add("loss".into(), total.shallow_clone());
        (total / tc.accum_steps as f64).backward();
    }
    let grad_norm = optim.clip_grad_norm(tc.grad_clip);
    optim.step(lr);
    optim.zero_grad();
    Ok(StepOutput { values, grad_norm })
}

pub fn train(mut opts: TrainOptions) -> Result<TrainSummary> {
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
    let threads = setup::threads(tc);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(step_seed(tc.seed, -1));

    let tok = Arc::new(setup::tokenizer(&loaded)?);
    let (mut asm, env) = setup::model(&loaded, &tok)?;
    let (train_source, heldout) = setup::train_source(&loaded)?;
    // Entries dropped while loading (data.on_error = "skip").
    let load_skipped = match &train_source {
        Source::Pairs(ds) => ds.skipped,
        Source::Shards(_) => 0,
    };

    std::fs::create_dir_all(&run_dir).map_err(|e| Error::io(&run_dir, e))?;
    let config_path = run_dir.join("config.toml");
    std::fs::write(&config_path, loaded.to_toml()).map_err(|e| Error::io(&config_path, e))?;

    let mut optim = AdamW::new(&asm.vs, tc.betas, tc.eps, tc.weight_decay);
    let mut state = TrainerState {
        step: 0,
        batches: 0,
        seed: tc.seed as i64,
    };
    let metrics_path = run_dir.join("metrics.jsonl");
    if opts.resume.is_some() {
        let path = checkpoint::latest(&run_dir)?;
        let (optim_state, st) = checkpoint::load(&path, &mut asm.vs)?;
        optim.load_state(&optim_state).map_err(|m| Error::Data {
            path: path.clone(),
            line: None,
            message: m,
        })?;
        state = st;
        truncate_metrics(&metrics_path, state.step)?;
        truncate_metrics(&run_dir.join("eval.jsonl"), state.step)?;
        tracing::info!(checkpoint = %path.display(), step = state.step, "resuming");
    } else {
        for report in crate::pretrained::apply_inits(&loaded, &asm.vs.variables())? {
            tracing::info!("loaded {report}");
        }
        let _ = std::fs::remove_file(&metrics_path);
        let _ = std::fs::remove_file(run_dir.join("eval.jsonl"));
    }
    let start_step = state.step;
    let n_params = asm.trainable_parameters();
    tracing::info!(
        run_dir = %run_dir.display(),
        device = ?env.device,
        compute = ?env.compute,
        parameters = n_params,
        data = %train_source,
        "training"
    );

    let mut loader_cfg = LoaderConfig::new(&cfg.data, tc.batch_size, Some(tc.seed));
    loader_cfg.preps = CaptionPreps::new(asm.caption_preps());
    let mut loader =
        Loader::from_source(train_source, tok.clone(), loader_cfg, state.batches as u64)?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| Error::io(&metrics_path, e))?;

    let bar = if opts.progress {
        ProgressBar::new(tc.steps as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg} ({per_sec})",
        )
        .expect("valid template"),
    );
    bar.set_position(start_step as u64);

    let eval_inputs = EvalInputs::new(&cfg, &tok);
    let eval_path = run_dir.join("eval.jsonl");
    let device = env.device;
    let started = std::time::Instant::now();
    let mut logged = Vec::new();
    let mut last_saved = -1;
    for step in start_step..tc.steps {
        tch::manual_seed(step_seed(tc.seed, step));
        let lr = lr_at(step, tc.steps, tc.warmup_steps, tc.lr, tc.min_lr);
        let out = train_step(&asm, &mut optim, tc, step, lr, || {
            state.batches += 1;
            Ok(loader.next_batch()?.to_device(device))
        })?;
        let (values, grad_norm) = (out.values, out.grad_norm);
        state.step = step + 1;

        if state.step % tc.log_every == 0 || state.step == tc.steps {
            let mut line = Map::new();
            line.insert("step".into(), json!(state.step));
            line.insert("lr".into(), json!(lr));
            line.insert("grad_norm".into(), json!(grad_norm.double_value(&[])));
            // Pairs skipped under data.on_error = "skip": dropped at load
            // time, and replaced or skipped by the loader in this invocation.
            line.insert(
                "data_skipped".into(),
                json!(load_skipped + loader.skipped()),
            );
            for (k, v) in &values {
                let x = v.double_value(&[]);
                if !x.is_finite() {
                    return Err(Error::Config(format!(
                        "`{k}` became {x} at step {}; lower train.lr or raise train.warmup_steps",
                        state.step
                    )));
                }
                line.insert(k.clone(), json!(x));
            }
            // Wall time since this invocation started (after the values
            // above synchronised the device); excluded from exactness checks.
            line.insert("time_s".into(), json!(started.elapsed().as_secs_f64()));
            writeln!(metrics_file, "{}", Value::Object(line.clone()))
                .map_err(|e| Error::io(&metrics_path, e))?;
            let loss = line.get("loss").and_then(Value::as_f64).unwrap_or(f64::NAN);
            bar.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
            logged.push(line);
        }
        bar.set_position(state.step as u64);
        if tc.checkpoint_every > 0 && state.step % tc.checkpoint_every == 0 {
            let path =
                checkpoint::save(&run_dir, &asm.vs, optim.state(), state, tc.keep_checkpoints)?;
            tracing::debug!(path = %path.display(), "checkpoint");
            last_saved = state.step;
        }
        if let (Some(ds), true) = (
            &heldout,
            cfg.eval.every > 0 && state.step % cfg.eval.every == 0,
        ) {
            let r = eval::held_out(&asm.model, ds, &eval_inputs, state.step)?;
            let line = serde_json::to_string(&r).expect("serialisable");
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&eval_path)
                .map_err(|e| Error::io(&eval_path, e))?;
            writeln!(f, "{line}").map_err(|e| Error::io(&eval_path, e))?;
        }
        if opts.halt_after == Some(state.step) {
            bar.abandon();
            return Ok(TrainSummary {
                run_dir,
                start_step,
                last_step: state.step,
                logged,
                eval: None,
            });
        }
    }
    if last_saved != state.step {
        checkpoint::save(&run_dir, &asm.vs, optim.state(), state, tc.keep_checkpoints)?;
    }
    bar.finish();

    let eval = match (&heldout, cfg.eval.at_end) {
        (Some(ds), true) => {
            let r = eval::held_out(&asm.model, ds, &eval_inputs, state.step)?;
            let path = run_dir.join("eval-heldout.json");
            let text = serde_json::to_string_pretty(&r).expect("serialisable");
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
            Some(r)
        }
        _ => None,
    };
    Ok(TrainSummary {
        run_dir,
        start_step,
        last_step: state.step,
        logged,
        eval,
    })
}
