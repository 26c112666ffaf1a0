//! Everything a run holds while it trains ([`Run`]), and how it starts:
//! the model, data, optimizer and hooks built, then either a checkpoint
//! restored (rank 0 reads it; the other ranks receive its counters by name,
//! then its weights, optimizer moments and hook state, by broadcast) or a
//! fresh start (pretrained weights, broadcast from rank 0).

use super::files::truncate_metrics;
use crate::checkpoint::{self, Layout, TrainerState};
use crate::data::loader::{CaptionPreps, Loader, LoaderConfig, Source};
use crate::guard::Guard;
use crate::hooks::{Flags, Hooks, Resources};
use crate::optim::AdamW;
use crate::parallel::Parallel;
use crate::setup;
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tch::{Device, Tensor};
use vlmatch_core::{Error, Result, RunStart};
use vlmatch_registry::config::TrainConfig;
use vlmatch_registry::hooks::HookContext;
use vlmatch_registry::{Assembly, LoadedConfig};

/// A run in progress: what every step reads and writes.
pub struct Run<'a> {
    pub tc: TrainConfig,
    pub run_dir: PathBuf,
    pub main: bool,
    pub device: Device,
    pub asm: Assembly,
    pub loader: Loader,
    pub optim: AdamW,
    pub guard: Guard,
    pub hooks: Hooks,
    pub resources: Resources,
    pub par: Option<&'a Parallel>,
    pub state: TrainerState,
    pub layout: Layout,
    pub start_step: i64,
    /// Pairs dropped while loading (`data.on_error = "skip"`).
    pub load_skipped: usize,
    /// `metrics.jsonl`, rank 0.
    pub metrics: Option<(PathBuf, File)>,
    /// The newest checkpoint known good: the one resumed from, then each
    /// one written (named when a non-finite step stops the run).
    pub last_good: Option<PathBuf>,
    /// Rank 0's lock on the run directory, held while the run lives.
    pub lock: Option<super::owner::RunLock>,
}

/// How a run starts: continuing its checkpoint, or fresh (over another
/// run's checkpoints only when forced).
#[derive(Debug, Clone, Copy)]
pub struct Start {
    pub resume: bool,
    pub force: bool,
}

/// The trainer's counters and each hook's, by name, as rank 0 read them
/// from a checkpoint: `state.<name>` ([`TrainerState`], [`Layout`]),
/// `optim.t`, and `<hook>.<name>`.
type Counters = BTreeMap<String, i64>;

fn counters_of(state: TrainerState, layout: Layout, t: i64, hooks: &Hooks) -> Counters {
    let mut c: Counters = hooks.counters();
    c.insert("state.step".into(), state.step);
    c.insert("state.batches".into(), state.batches);
    c.insert("state.seed".into(), state.seed);
    c.insert("state.world_size".into(), layout.world_size);
    c.insert("state.batch_size".into(), layout.batch_size);
    c.insert("optim.t".into(), t);
    c
}

/// Rank 0's counters on every rank: the values travel in name order, and
/// every rank has the same names (the same hooks).
fn share(par: Option<&Parallel>, device: Device, counters: Counters) -> Result<Counters> {
    let Some(p) = par else {
        return Ok(counters);
    };
    let values: Vec<i64> = counters.values().copied().collect();
    let mut t = Tensor::from_slice(&values).to_device(device);
    p.broadcast(std::slice::from_mut(&mut t))?;
    let values = Vec::<i64>::try_from(t.to_device(Device::Cpu))?;
    Ok(counters.into_keys().zip(values).collect())
}

impl<'a> Run<'a> {
    /// A run in `run_dir`: fresh, or continuing its newest checkpoint when
    /// `how.resume`. Rank 0 holds the directory's lock for the run's life.
    pub fn start(
        how: Start,
        run_dir: &Path,
        loaded: &LoadedConfig,
        device: Device,
        mut par: Option<&'a mut Parallel>,
        flags: Flags,
    ) -> Result<Run<'a>> {
        let tc = loaded.config.train.clone();
        let (rank, world) = par.as_ref().map_or((0, 1), |p| (p.rank, p.world));
        let main = rank == 0;
        let tok = Arc::new(setup::tokenizer(loaded)?);
        let (asm, env) = setup::model_on(loaded, &tok, device)?;
        let (mut train_source, heldout) = setup::train_source(loaded)?;
        // `data.shard_split` resolved: recorded in the saved config, and on
        // resume the one the run began with.
        let split = crate::data::shards::resolve_split(&loaded.config.data, world, !how.resume);
        if let (Source::Shards(shards), Some(split)) = (&mut train_source, split) {
            shards.split = split;
        }
        if let (true, Some(split)) = (how.resume, split) {
            let workers = loaded.config.data.workers;
            crate::data::shards::check_saved_split(run_dir, split, workers)?;
        }
        let (load_skipped, epoch_steps) = match &train_source {
            Source::Pairs(ds) => {
                let per_step = (world * tc.batch_size * tc.accum_steps).max(1);
                (ds.skipped, Some(ds.len().div_ceil(per_step) as i64))
            }
            Source::Shards(_) => (0, None),
        };
        let resources = Resources {
            flags,
            tokenizer: tok.clone(),
            heldout: heldout.map(Arc::new),
            final_heldout: Default::default(),
        };
        let mut hooks = Hooks::build(&HookContext {
            name: "",
            loaded,
            asm: Some(&asm),
            env: Some(&env),
            rank,
            world,
            epoch_steps,
            run_dir,
            host: &resources,
        })?;
        let metrics_path = run_dir.join("metrics.jsonl");
        let resumed = how.resume;
        let lock = if main {
            let lock = super::owner::lock(run_dir)?;
            if !resumed {
                super::owner::claim(run_dir, how.force)?;
            }
            // Written whole or not at all: another rank may read it.
            let saved = crate::data::shards::config_toml(loaded, split);
            crate::durable::write(&run_dir.join("config.toml"), saved)?;
            Some(lock)
        } else {
            None
        };
        let mut optim = AdamW::new(&asm.vs, tc.betas, tc.eps, tc.weight_decay);
        crate::zero::shard(par.as_deref(), &mut optim, &tc)?;
        let layout = Layout {
            world_size: world as i64,
            batch_size: tc.batch_size as i64,
        };
        // Every variable in name order: the order ranks broadcast them in.
        let mut variables: Vec<(String, Tensor)> = asm.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let variables: Vec<Tensor> = variables.into_iter().map(|(_, t)| t).collect();
        let mut state = TrainerState {
            step: 0,
            batches: 0,
            seed: tc.seed as i64,
        };
        let mut last_good = None;
        // Rank 0's whole optimizer state, for the other ranks' parts.
        let mut saved_optim = None;
        if resumed {
            let mut counters = counters_of(state, layout, 0, &hooks);
            if main {
                let path = checkpoint::newest_intact(run_dir)?;
                let saved = checkpoint::load_full(&path, &asm.vs)?;
                let hook_counters = hooks.load(&saved.extra, &path)?;
                optim.load_state(&saved.optim).map_err(|m| Error::Data {
                    path: path.clone(),
                    line: None,
                    message: m,
                })?;
                // Checkpoints from before data parallelism: one process.
                let was = saved.layout.unwrap_or(Layout {
                    world_size: 1,
                    batch_size: tc.batch_size as i64,
                });
                counters = counters_of(saved.state, was, optim.t, &hooks);
                counters.extend(hook_counters);
                tracing::info!(checkpoint = %path.display(), step = saved.state.step, "resuming");
                last_good = Some(path);
                saved_optim = Some(saved.optim);
            }
            let mut c = share(par.as_deref(), device, counters)?;
            let mut take = |k: &str| c.remove(k).unwrap_or_default();
            let was = Layout {
                world_size: take("state.world_size"),
                batch_size: take("state.batch_size"),
            };
            was.check_resume(layout)?;
            crate::data::shards::check_resume_ranks(split, was.world_size as usize, world)?;
            state = TrainerState {
                step: take("state.step"),
                batches: take("state.batches"),
                seed: take("state.seed"),
            };
            let t = take("optim.t");
            if let Some(p) = par.as_deref() {
                p.broadcast(&variables)?;
                if optim.is_sharded() {
                    crate::zero::share_state(p, &mut optim, saved_optim.as_ref(), device)?;
                } else {
                    let moments: Vec<Tensor> = optim.state().into_iter().map(|(_, t)| t).collect();
                    p.broadcast(&moments[..moments.len() - 1])?;
                }
                optim.t = t;
                p.broadcast(&hooks.broadcast_tensors())?;
            }
            // What is left are the hooks' counters.
            hooks.set_counters(&c)?;
            if main {
                truncate_metrics(&metrics_path, state.step)?;
            }
        } else {
            if main {
                for report in crate::pretrained::apply_inits(loaded, &asm.vs.variables())? {
                    tracing::info!("loaded {report}");
                }
                let _ = std::fs::remove_file(&metrics_path);
            }
            if let Some(p) = par.as_deref() {
                p.broadcast(&variables)?;
            }
        }
        let start = RunStart {
            step: state.step,
            total_steps: tc.steps,
            resumed,
        };
        hooks.on_start(start)?;
        if !resumed {
            // A hook's initial state (the momentum model, drawn queues) is
            // rank 0's on every rank.
            if let Some(p) = par.as_deref() {
                p.broadcast(&hooks.broadcast_tensors())?;
            }
        }
        if let Some(p) = par.as_deref_mut() {
            p.init_reducer(&asm.vs.trainable_variables(), tc.dist.bucket_mb)?;
        }
        tracing::info!(
            run_dir = %run_dir.display(),
            device = ?env.device,
            compute = ?env.compute,
            parameters = asm.trainable_parameters(),
            data = %train_source,
            ranks = world,
            global_batch = world * tc.batch_size,
            hooks = ?hooks.names(),
            "training"
        );
        let mut loader_cfg = LoaderConfig::new(&loaded.config.data, tc.batch_size, Some(tc.seed))
            .shard(rank, world)
            .augmented(&loaded.config.data.augment, tc.seed);
        loader_cfg.preps = CaptionPreps::new(asm.caption_preps());
        loader_cfg.pin_memory =
            (loaded.config.data.pin_memory && env.device.is_cuda()).then_some(env.device);
        let loader = Loader::from_source(train_source, tok, loader_cfg, state.batches as u64)?;
        let metrics = if main {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(|e| Error::io(&metrics_path, e))?;
            Some((metrics_path, f))
        } else {
            None
        };
        let guard = Guard::new(&tc, device);
        Ok(Run {
            start_step: state.step,
            tc,
            run_dir: run_dir.to_path_buf(),
            main,
            device,
            asm,
            loader,
            optim,
            guard,
            hooks,
            resources,
            par: par.map(|p| &*p),
            state,
            layout,
            load_skipped,
            metrics,
            last_good,
            lock,
        })
    }
}
