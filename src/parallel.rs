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
//! - agrees on stop decisions ([`Parallel::agree_any`]);
//! - lets rank 0 alone write checkpoints and evaluate while the others
//!   wait for its outcome on a store key ([`on_rank0`]), bounded by
//!   `train.dist.io_timeout` rather than the collective timeout, and stop
//!   at once with rank 0's reason when it fails;
//! - turns a failed collective into an error naming the rank that died or
//!   hung ([`Parallel::explain`], from the heartbeats).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use tch::{Device, Kind, Tensor};
use vlmatch_core::{Collective, Error, Result};
use vlmatch_dist::{
    agree_any, broadcast_parameters, diagnose, rank_gone, to_core_error, Backend, DistCollective,
    GradReducer, Heartbeat, LaunchEnv, ProcessGroup, Store,
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
    /// ZeRO stage 1 reduces the gradients itself, by reduce-scatter
    /// ([`Parallel::shard_gradients`]): no reducer then.
    grads_sharded: Cell<bool>,
    heartbeat: Option<Heartbeat>,
    interval: Duration,
    io_timeout: Duration,
    /// Waits on rank 0 so far (every rank counts the same ones): the
    /// store key of the next.
    io_waits: Cell<u64>,
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
        Some(l) => Some(
            Parallel::connect(l, device, Duration::from_secs(tc.dist.timeout.max(1)))?
                .with_io_timeout(Duration::from_secs(tc.dist.io_timeout.max(1))),
        ),
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

/// Rank 0 alone does `work` (writes a checkpoint, evaluates) and returns
/// its value; the other ranks wait for its outcome ([`Parallel::after_rank0`])
/// and return `None`. One process just does it.
pub fn on_rank0<T>(
    par: Option<&Parallel>,
    what: &str,
    work: impl FnOnce() -> Result<T>,
) -> Result<Option<T>> {
    match par {
        None => work().map(Some),
        Some(p) if p.is_main() => {
            let out = work();
            p.publish_outcome(out.as_ref().err())?;
            out.map(Some)
        }
        Some(p) => p.after_rank0(what).map(|()| None),
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
            grads_sharded: Cell::new(false),
            heartbeat: Some(heartbeat),
            interval,
            io_timeout: timeout,
            io_waits: Cell::new(0),
            device,
        })
    }

    /// How long the other ranks wait for rank 0's files and evaluations
    /// (`train.dist.io_timeout`; the collective timeout until set).
    pub fn with_io_timeout(mut self, io_timeout: Duration) -> Parallel {
        self.io_timeout = io_timeout;
        self
    }

    /// The store key of the next wait on rank 0.
    fn next_io_key(&self) -> String {
        let n = self.io_waits.get() + 1;
        self.io_waits.set(n);
        format!("io/{n}")
    }

    /// Rank 0, after work the others wait for: its outcome on the store.
    fn publish_outcome(&self, failed: Option<&Error>) -> Result<()> {
        let key = self.next_io_key();
        let value = match failed {
            None => "ok".to_string(),
            Some(e) => format!("failed: {e}"),
        };
        let published = self.store.set(&key, value.as_bytes());
        if let (Err(e), None) = (&published, failed) {
            return Err(to_core_error(e.clone()));
        }
        if published.is_ok() {
            // Rank 0 serves the store: it goes on (or exits, after its last
            // checkpoint or a failure) once every rank has read the outcome,
            // or after a bounded while (a rank that died meanwhile is
            // named by the next collective).
            let read = format!("{key}/read");
            let until = Instant::now() + (8 * self.interval).max(Duration::from_secs(5));
            while Instant::now() < until {
                match self.store.add(&read, 0) {
                    Ok(n) if n + 1 >= self.world as i64 => break,
                    Ok(_) => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => break,
                }
            }
        }
        // On failure, rank 0's own error is the one to report.
        Ok(())
    }

    /// Waits until rank 0 finished what it does alone (`what`, for the
    /// messages): polls the store key rank 0 sets, up to
    /// `train.dist.io_timeout`. Stops at once with rank 0's reason if it
    /// failed, or if its heartbeat says it died meanwhile.
    fn after_rank0(&self, what: &str) -> Result<()> {
        let key = self.next_io_key();
        let started = Instant::now();
        let poll = (self.interval / 4).clamp(Duration::from_millis(20), Duration::from_millis(250));
        let stale = 3 * self.interval;
        loop {
            if self.store.check(&[key.as_str()]).map_err(to_core_error)? {
                let value = self.store.get(&key, self.interval).map_err(to_core_error)?;
                let value = String::from_utf8_lossy(&value);
                // Rank 0 waits for every rank to have read it.
                self.store
                    .add(&format!("{key}/read"), 1)
                    .map_err(to_core_error)?;
                return match value.strip_prefix("failed: ") {
                    None => Ok(()),
                    Some(reason) => Err(Error::Peer {
                        rank: 0,
                        message: format!("rank 0 failed to {what}: {reason}"),
                    }),
                };
            }
            if let Some(why) = rank_gone(&self.store, 0, stale) {
                return Err(Error::Peer {
                    rank: 0,
                    message: format!("{why} while this rank waited for it to {what}"),
                });
            }
            if started.elapsed() >= self.io_timeout {
                return Err(Error::Peer {
                    rank: 0,
                    message: format!(
                        "rank 0 did not {what} within {} s (`train.dist.io_timeout`; raise \
                         it for a slow disk or a large held-out set)",
                        self.io_timeout.as_secs()
                    ),
                });
            }
            std::thread::sleep(poll);
        }
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

    /// From now on the gradients are left as backward computed them:
    /// ZeRO stage 1 (`crate::zero`) reduce-scatters them after backward,
    /// each rank receiving the mean of its own range only. No reducer is
    /// built (one built before stays idle), so nothing all-reduces them.
    pub fn shard_gradients(&self) {
        self.grads_sharded.set(true);
    }

    /// [`DistCollective::reduce_scatter_sum`]: this rank's part of the sum
    /// over ranks of `t` (world-size equal parts along dim 0).
    pub fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.collective.reduce_scatter_sum(t)
    }

    /// Builds the gradient reducer for `params` (the trainable parameters,
    /// in the same order on every rank) with buckets of `bucket_mb` MiB,
    /// and attaches it to backward where libtorch allows. Nothing to do
    /// when ZeRO stage 1 reduces the gradients ([`Parallel::shard_gradients`]).
    pub fn init_reducer(&mut self, params: &[Tensor], bucket_mb: f64) -> Result<()> {
        if self.grads_sharded.get() {
            tracing::debug!("gradients are reduce-scattered after backward (ZeRO stage 1)");
            return Ok(());
        }
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
            r.set_sync(sync && !self.grads_sharded.get());
        }
    }

    /// After the step's last backward: every gradient becomes its mean
    /// over ranks. Under ZeRO stage 1 nothing happens here: the gradients
    /// are reduce-scattered by `crate::zero::clip_grad_norm`, which comes
    /// next in the step.
    pub fn reduce_gradients(&self) -> Result<()> {
        if self.grads_sharded.get() {
            return Ok(());
        }
        let r = self
            .reducer
            .as_ref()
            .expect("init_reducer runs before the first step");
        r.reduce(self.group()).map_err(to_core_error)
    }

    /// Gives every rank rank 0's values of `tensors` (in place). A tensor
    /// off the run's device (a hook's CPU state in a CUDA run, which NCCL
    /// cannot send) travels through a copy on the device.
    pub fn broadcast(&self, tensors: &[Tensor]) -> Result<()> {
        let off = |t: &Tensor| t.device() != self.device;
        let sent: Vec<Tensor> = tensors
            .iter()
            .map(|t| {
                if off(t) {
                    t.detach().to_device(self.device)
                } else {
                    t.shallow_clone()
                }
            })
            .collect();
        broadcast_parameters(self.group(), &sent).map_err(to_core_error)?;
        tch::no_grad(|| {
            for (t, s) in tensors.iter().zip(&sent) {
                if off(t) {
                    t.shallow_clone().copy_(s);
                }
            }
        });
        Ok(())
    }

    /// Whether `flag` holds on any rank, agreed by all.
    pub fn agree_any(&self, flag: bool) -> Result<bool> {
        agree_any(self.group(), flag).map_err(to_core_error)
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
