//! How a training run is asked for ([`TrainOptions`]) and what it returns
//! ([`TrainSummary`]); the entry points that pick the device, connect the
//! ranks and hand over to the loop ([`super::run`]).

use super::start::Run;
use crate::fault::Fault;
use serde_json::{Map, Value};
use std::path::PathBuf;
use vlmatch_core::{Error, Result};
use vlmatch_dist::LaunchEnv;
use vlmatch_registry::ConfigLayers;

/// What a run is asked for. `Default` sets nothing (no config layers, a
/// fresh run, no progress display): set `layers` and what else you need.
#[derive(Default)]
pub struct TrainOptions {
    pub layers: ConfigLayers,
    /// Where to write; default `runs/<name>-<UTC time>`.
    pub run_dir: Option<PathBuf>,
    /// Continue this run directory from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Stop abruptly after this step, without a final checkpoint, as a kill
    /// would (used by the resume tests).
    pub halt_after: Option<i64>,
    /// Show the progress display (the `progress` hook).
    pub progress: bool,
    /// Start a new run in a `run_dir` that holds another run's checkpoints
    /// (they move to `checkpoints.old-TIME`).
    pub force: bool,
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
    pub eval: Option<crate::eval::HeldOut>,
}

pub(super) fn default_run_dir(preset: &str) -> PathBuf {
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

/// Trains as [`TrainOptions`] say; as one rank of a data-parallel run when
/// a launcher's environment (`torchrun`, `srun`) says so.
pub fn train(opts: TrainOptions) -> Result<TrainSummary> {
    let launch =
        LaunchEnv::from_env().map_err(|e| Error::Config(format!("launcher environment: {e}")))?;
    train_launched(opts, launch, None)
}

/// [`train`] with the launch given: `launch` (several ranks when its world
/// size is above 1), and for the fault tests, a failure to inject (the
/// `fault` hook).
pub fn train_launched(
    mut opts: TrainOptions,
    launch: Option<LaunchEnv>,
    fault: Option<Fault>,
) -> Result<TrainSummary> {
    let launch = launch.as_ref();
    let run_dir = if let Some(dir) = &opts.resume {
        opts.layers.base = Some(crate::run::saved_config(dir)?);
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
    let tc = &loaded.config.train;
    if tc.steps <= 0 || tc.batch_size == 0 || tc.accum_steps == 0 || tc.log_every <= 0 {
        return Err(Error::Config(format!(
            "config keys `train.steps` ({}), `train.batch_size` ({}), `train.accum_steps` ({}) and \
             `train.log_every` ({}) must be positive",
            tc.steps, tc.batch_size, tc.accum_steps, tc.log_every
        )));
    }
    let (device, mut par) = crate::parallel::join(launch, tc)?;
    tch::manual_seed(super::step_seed(tc.seed, -1));
    let flags = crate::hooks::Flags {
        progress: opts.progress,
        fault,
    };
    let how = super::start::Start {
        resume: opts.resume.is_some(),
        force: opts.force,
    };
    let result = Run::start(how, &run_dir, &loaded, device, par.as_mut(), flags)
        .and_then(|run| super::run(run, opts.halt_after));
    crate::parallel::finish(result, par)
}
