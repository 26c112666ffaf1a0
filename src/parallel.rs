//! Data-parallel training: the trainer's side of `vlmatch-dist`.
//!
//! When a launcher (`torchrun`, `srun`, `cargo xtask train
//! --nproc-per-node N`) starts several ranks, [`Parallel::connect`] meets
//! the others at the rendezvous store (`MASTER_ADDR:MASTER_PORT`), opens a
//! Gloo (CPU) or NCCL (CUDA) process group and starts this rank's
//! heartbeat. The trainer then:
//!
//! - runs every step's [`vlmatch_core::Forward`] with
//!   [`Parallel::collective`], so objectives see the global batch;
//! - averages gradients over ranks after backward ([`Parallel::reducer`],
//!   bucketed fp32 all-reduces, overlapped with backward where the hooks
//!   attach) before clipping, so every rank's optimizer takes the same step;
//! - broadcasts rank 0's weights at the start and after a resume;
//! - averages logged values over ranks at log time only
//!   ([`Parallel::mean_over_ranks`]);
//! - agrees on stop decisions ([`Parallel::agree_any`]) and waits at
//!   [`Parallel::barrier`] while rank 0 alone writes files;
//! - turns a failed collective into an error naming the rank that died or
//!   hung ([`Parallel::explain`], from the heartbeats).

use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use vlmatch_core::{Collective, Error, Result};
use vlmatch_dist::{
    agree_any, broadcast_parameters, diagnose, to_core_error, Backend, DistCollective, GradReducer,
    Heartbeat, LaunchEnv, ProcessGroup, Store,
};
use vlmatch_registry::config::TrainConfig;

/// How often a rank publishes its heartbeat for a collective timeout of
/// `timeout`: a tenth of it, between 0.2 s and 5 s.
fn heartbeat_interval(timeout: Duration) -> Duration {
    (timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// One rank of a data-parallel run.
pub struct Parallel {
    pub rank: usize,
    pub world: usize,
    store: Store,
    collective: Rc<DistCollective>,
    reducer: Option<GradReducer>,
    heartbeat: Option<Heartbeat>,
    interval: Duration,
    device: Device,
}

/// This process's device and, when a launcher (`launch`) started several
/// ranks, its connection to the others: the device is the rank's
/// (`LOCAL_RANK`), libtorch's threads are shared among the machine's ranks,
/// and `train.dist.timeout` bounds the rendezvous and every collective.
pub fn join(launch: Option<&LaunchEnv>, tc: &TrainConfig) -> Result<(Device, Option<Parallel>)> {
    let multi = launch.filter(|l| l.world_size > 1);
    let device = match launch {
        Some(l) => crate::setup::rank_device(&tc.device, l.local_rank)?,
        None => crate::setup::device(&tc.device)?,
    };
    let threads = match multi {
        Some(_) => crate::setup::rank_threads(tc),
        None => crate::setup::threads(tc),
    };
    tch::set_num_threads(threads as i32);
    let par = match multi {
        Some(l) => Some(Parallel::connect(
            l,
            device,
            Duration::from_secs(tc.dist.timeout.max(1)),
        )?),
        None => None,
    };
    Ok((device, par))
}

/// [`join`] with the launcher's environment (`torchrun`, `srun`).
pub fn join_launched(tc: &TrainConfig) -> Result<(Device, Option<Parallel>)> {
    let launch =
        LaunchEnv::from_env().map_err(|e| Error::Config(format!("launcher environment: {e}")))?;
    join(launch.as_ref(), tc)
}

/// A step's logged `values` on the host, with `count` (pairs skipped):
/// averaged over ranks and summed, in one all-reduce
/// ([`Parallel::mean_over_ranks`]), or read as they are on one process.
pub fn logged_values(
    par: Option<&Parallel>,
    values: &BTreeMap<String, Tensor>,
    count: usize,
) -> Result<(BTreeMap<String, f64>, usize)> {
    match par {
        Some(p) => p.mean_over_ranks(values, count),
        None => Ok((
            values
                .iter()
                .map(|(k, v)| (k.clone(), v.double_value(&[])))
                .collect(),
            count,
        )),
    }
}

/// Whether a stop signal (`requested` on this process) stops the run now:
/// one process acts at once; ranks agree only at `sync_point`s (logging
/// steps, where they synchronise anyway), so that all stop together.
pub fn agreed_stop(par: Option<&Parallel>, requested: bool, sync_point: bool) -> Result<bool> {
    match par {
        None => Ok(requested),
        Some(p) if sync_point => p.agree_any(requested),
        Some(_) => Ok(false),
    }
}

/// A rank's outcome: on success it leaves the group; a failed collective
/// becomes what the heartbeats say about the other ranks (this rank's
/// heartbeat then stops, so the others learn that it left); its own errors
/// (data, config) it reports as they are.
pub fn finish<T>(result: Result<T>, par: Option<Parallel>) -> Result<T> {
    match (result, par) {
        (Ok(v), Some(p)) => {
            p.leave();
            Ok(v)
        }
        (Err(e), Some(p)) if Parallel::is_communication(&e) => Err(p.explain(e)),
        (result, _) => result,
    }
}

impl Parallel {
    /// Meets the other ranks of `env` and opens the process group for
    /// `device` (Gloo for the CPU, NCCL for CUDA). `timeout` bounds the
    /// rendezvous and every later collective.
    pub fn connect(env: &LaunchEnv, device: Device, timeout: Duration) -> Result<Parallel> {
        let store = Store::from_launch(env, timeout).map_err(to_core_error)?;
        let backend = match device {
            Device::Cuda(_) => Backend::Nccl,
            _ => Backend::Gloo,
        };
        let mut group = ProcessGroup::new(backend, &store, env.rank, env.world_size, timeout)
            .map_err(to_core_error)?;
        group.set_device(device);
        let interval = heartbeat_interval(timeout);
        let heartbeat = Heartbeat::start(&store, env.rank, interval).map_err(to_core_error)?;
        tracing::info!(
            rank = env.rank,
            world = env.world_size,
            %backend,
            launcher = %env.launcher,
            master = %format!("{}:{}", env.master_addr, env.master_port),
            "joined the process group"
        );
        Ok(Parallel {
            rank: env.rank,
            world: env.world_size,
            store,
            collective: Rc::new(DistCollective::new(group)),
            reducer: None,
            heartbeat: Some(heartbeat),
            interval,
            device,
        })
    }

    /// Whether this rank writes files (rank 0).
    pub fn is_main(&self) -> bool {
        self.rank == 0
    }

    fn group(&self) -> &ProcessGroup {
        self.collective.group()
    }

    /// What objectives gather the global batch through.
    pub fn collective(&self) -> Rc<dyn Collective> {
        self.collective.clone()
    }

    /// Builds the gradient reducer for `params` (the trainable parameters,
    /// in the same order on every rank) with buckets of `bucket_mb` MiB,
    /// and attaches it to backward where libtorch allows.
    pub fn init_reducer(&mut self, params: &[Tensor], bucket_mb: f64) -> Result<()> {
        let mut reducer = GradReducer::new(params, bucket_mb).map_err(to_core_error)?;
        match reducer.overlap_with_backward(self.group()) {
            Ok(()) => tracing::debug!(
                buckets = reducer.buckets().len(),
                "gradient all-reduce overlaps backward"
            ),
            Err(e) => tracing::warn!("gradients are reduced after backward: {e}"),
        }
        self.reducer = Some(reducer);
        Ok(())
    }

    /// Before each micro-batch's backward: whether its gradients are to be
    /// reduced (the last micro-batch of a step) or only accumulated.
    pub fn sync_gradients(&self, sync: bool) {
        if let Some(r) = &self.reducer {
            r.set_sync(sync);
        }
    }

    /// After the step's last backward: every gradient becomes its mean
    /// over ranks.
    pub fn reduce_gradients(&self) -> Result<()> {
        let r = self
            .reducer
            .as_ref()
            .expect("init_reducer runs before the first step");
        r.reduce(self.group()).map_err(to_core_error)
    }

    /// Gives every rank rank 0's values of `tensors` (in place).
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<()> {
        broadcast_parameters(self.group(), tensors).map_err(to_core_error)
    }

    /// Whether `flag` holds on any rank, agreed by all.
    pub fn agree_any(&self, flag: bool) -> Result<bool> {
        agree_any(self.group(), flag).map_err(to_core_error)
    }

    /// Waits until every rank gets here (while rank 0 writes a checkpoint
    /// or evaluates, the others wait here rather than run ahead).
    pub fn barrier(&self) -> Result<()> {
        self.group().barrier().map_err(to_core_error)
    }

    /// `values` averaged over ranks and `count` summed, in one all-reduce.
    /// Every rank must pass the same keys; checked first (a second, tiny
    /// collective), so a mismatch is an error rather than a hang.
    pub fn mean_over_ranks(
        &self,
        values: &BTreeMap<String, Tensor>,
        count: usize,
    ) -> Result<(BTreeMap<String, f64>, usize)> {
        let names: Vec<&str> = values.keys().map(String::as_str).collect();
        let digest = crate::rng::mix(
            &names
                .iter()
                .map(|n| crate::rng::mix(&n.bytes().map(u64::from).collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
        ) >> 1;
        let mine = Tensor::from_slice(&[names.len() as i64, digest as i64]).to_device(self.device);
        let all = self.collective.all_gather(&mine)?;
        let all = Vec::<i64>::try_from(all.to_device(Device::Cpu))?;
        if let Some(r) = (0..self.world).find(|r| all[2 * r..2 * r + 2] != all[..2]) {
            return Err(Error::Config(format!(
                "ranks 0 and {r} log different values (rank {} logs {}); every rank must run \
                 the same objectives",
                self.rank,
                names.join(", ")
            )));
        }
        let mut parts: Vec<Tensor> = values
            .values()
            .map(|v| v.detach().to_kind(Kind::Double).reshape([1]))
            .collect();
        parts.push(Tensor::from_slice(&[count as f64]).to_device(self.device));
        let stacked = Tensor::cat(&parts, 0).to_device(self.device);
        let sum = self.collective.all_reduce_sum(&stacked)?;
        let sum = Vec::<f64>::try_from(sum.to_device(Device::Cpu))?;
        let means = values
            .keys()
            .zip(&sum)
            .map(|(k, s)| (k.clone(), s / self.world as f64))
            .collect();
        Ok((means, sum[values.len()].round() as usize))
    }

    /// Records a finished step in the heartbeat (what [`Parallel::explain`]
    /// reports of a rank that stopped stepping).
    pub fn beat(&self, step: i64) {
        if let Some(h) = &self.heartbeat {
            h.progress(step.max(0) as u64);
        }
    }

    /// Whether `e` came from communicating with the other ranks: a
    /// collective (also one run by backward) or the store.
    pub fn is_communication(e: &Error) -> bool {
        match e {
            Error::Plugin { plugin, .. } => plugin == "distributed",
            Error::Torch(_) => true,
            _ => false,
        }
    }

    /// `e` (a failed step or collective) with what the heartbeats say about
    /// the other ranks: which one died or stopped progressing. A rank that
    /// just died may still look alive for a few heartbeats, so this waits
    /// up to three heartbeat intervals for the picture to settle.
    pub fn explain(&self, e: Error) -> Error {
        let stale = 3 * self.interval;
        let deadline = Instant::now() + stale + self.interval;
        let mut why = diagnose(&self.store, self.world, stale);
        while why.starts_with("every rank's heartbeat is fresh") && Instant::now() < deadline {
            std::thread::sleep(self.interval / 2);
            why = diagnose(&self.store, self.world, stale);
        }
        let what = match &e {
            Error::Plugin { message, .. } => message.clone(),
            other => other.to_string(),
        };
        Error::plugin(
            "distributed",
            format!(
                "{why}; so rank {} of {} stopped too, in: {what}",
                self.rank, self.world
            ),
        )
    }

    /// Leaves the group cleanly: the heartbeat says so, so that the ranks
    /// still running do not take this one for dead.
    pub fn leave(mut self) {
        self.reducer = None;
        self.heartbeat = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_are_a_tenth_of_the_timeout_within_bounds() {
        assert_eq!(
            heartbeat_interval(Duration::from_secs(600)),
            Duration::from_secs(5)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(5)),
            Duration::from_millis(500)
        );
        assert_eq!(
            heartbeat_interval(Duration::from_secs(1)),
            Duration::from_millis(200)
        );
    }
}
