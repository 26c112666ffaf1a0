//! Process groups and their collectives: [`ProcessGroup`] over the shim's
//! `vlm_pg_*` (`ffi::group`, csrc/group.cpp) and [`Work`], a collective in
//! flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tch::{Device, Tensor};

use crate::ffi::{ActivityHandle, Failure, PgHandle, RawBackend, WorkHandle};
use crate::{has_nccl, health, Activity, Backend, DistError, Op, Result, Store};

/// Numbers the process groups this process creates, so each one gets its
/// own key prefix in the store. Every rank creates its groups in the same
/// order, so the numbers agree.
static GROUPS_CREATED: AtomicUsize = AtomicUsize::new(0);

/// What a group and its works share: the first collective that failed.
#[derive(Default)]
struct GroupState {
    failed: Mutex<Option<Op>>,
}

impl GroupState {
    fn failed(&self) -> Option<Op> {
        *self.failed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fail(&self, op: Op) {
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        failed.get_or_insert(op);
    }
}

/// The identity of a group, copied into each of its works for messages.
#[derive(Debug, Clone, Copy)]
struct GroupInfo {
    backend: Backend,
    rank: usize,
    size: usize,
    timeout: Duration,
}

/// A c10d process group (Gloo or NCCL) of `size` ranks.
///
/// Collectives are asynchronous: they return a [`Work`] as soon as the
/// operation is queued. Until that work is waited on, the tensors passed in
/// belong to the backend: do not read or write them.
///
/// After a collective fails or times out the group refuses further ones
/// ([`DistError::GroupFailed`]), and dropping it does not wait for the stuck
/// operation (its threads are left to process exit).
pub struct ProcessGroup {
    raw: Option<PgHandle>,
    info: GroupInfo,
    state: Arc<GroupState>,
    device: Device,
    /// The number of this group among the process's groups.
    index: usize,
    /// Its collective counters, also listed for the [`Heartbeat`](crate::Heartbeat).
    activity: Arc<ActivityHandle>,
}

impl ProcessGroup {
    /// Creates a process group of `size` ranks over `store`, which must be
    /// called on every rank (it connects them all). `timeout` bounds the
    /// setup and is the default deadline of every collective.
    pub fn new(
        backend: Backend,
        store: &Store,
        rank: usize,
        size: usize,
        timeout: Duration,
    ) -> Result<ProcessGroup> {
        let info = GroupInfo {
            backend,
            rank,
            size,
            timeout,
        };
        let init_error = |detail: String| DistError::Init {
            backend,
            rank,
            size,
            timeout,
            detail,
        };
        let size_i32 = i32::try_from(size)
            .ok()
            .filter(|s| *s >= 1)
            .ok_or_else(|| init_error(format!("group size {size} is not in 1..=i32::MAX")))?;
        if rank >= size {
            return Err(init_error(format!(
                "rank {rank} is not below the group size {size}"
            )));
        }
        if timeout.is_zero() {
            return Err(init_error("the timeout must be positive".into()));
        }
        if backend == Backend::Nccl && !has_nccl() {
            return Err(init_error(
                "this build of vlmatch has no NCCL backend (nccl.h and the CUDA headers were \
                 not found when it was compiled; `cargo xtask setup` installs them)"
                    .into(),
            ));
        }
        let raw_backend = match backend {
            Backend::Gloo => RawBackend::Gloo,
            Backend::Nccl => RawBackend::Nccl,
        };
        let index = GROUPS_CREATED.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("vlmatch/pg{index}/{backend}");
        let raw = PgHandle::new(
            raw_backend,
            &store.inner,
            &prefix,
            rank as i32,
            size_i32,
            timeout,
        )
        .map_err(|f| init_error(f.message().to_string()))?;
        let activity = Arc::new(raw.activity());
        health::register_group(index, &activity);
        Ok(ProcessGroup {
            raw: Some(raw),
            info,
            state: Arc::default(),
            device: match backend {
                Backend::Gloo => Device::Cpu,
                Backend::Nccl => Device::Cuda(0),
            },
            index,
            activity,
        })
    }

    /// A Gloo (CPU) process group; see [`ProcessGroup::new`].
    pub fn gloo(store: &Store, rank: usize, size: usize, timeout: Duration) -> Result<Self> {
        ProcessGroup::new(Backend::Gloo, store, rank, size, timeout)
    }

    /// An NCCL (CUDA) process group; see [`ProcessGroup::new`]. Fails with
    /// [`DistError::Init`] where there is no GPU or no NCCL in this build.
    pub fn nccl(store: &Store, rank: usize, size: usize, timeout: Duration) -> Result<Self> {
        ProcessGroup::new(Backend::Nccl, store, rank, size, timeout)
    }

    pub fn backend(&self) -> Backend {
        self.info.backend
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn size(&self) -> usize {
        self.info.size
    }

    /// The setup timeout and default deadline of [`Work::wait`].
    pub fn timeout(&self) -> Duration {
        self.info.timeout
    }

    /// Where the group's own small tensors live (the flag of
    /// [`agree_any`](crate::agree_any)): the CPU for Gloo; for NCCL `cuda:0` unless set with
    /// [`ProcessGroup::set_device`] (right when each rank sees one GPU, as
    /// with `CUDA_VISIBLE_DEVICES` per rank; else set `cuda:LOCAL_RANK`).
    pub fn device(&self) -> Device {
        self.device
    }

    /// Sets [`ProcessGroup::device`].
    pub fn set_device(&mut self, device: Device) {
        self.device = device;
    }

    /// How many collectives this rank has entered on the group, the latest,
    /// and the one it is waiting for: what its [`Heartbeat`](crate::Heartbeat) publishes, so
    /// that [`diagnose`](crate::diagnose) can name a rank that has fallen behind the others.
    /// Counts every collective, also those run by backward and by the
    /// gradient reducer.
    pub fn activity(&self) -> Activity {
        health::activity_of(self.index, &self.activity)
    }

    pub(crate) fn handle(&self, op: Op) -> Result<&PgHandle> {
        let raw = self.raw.as_ref().expect("the handle lives until drop");
        if let Some(failed) = raw.failed_in_cpp() {
            // A collective inside backward (all_gather_with_grad) or the
            // gradient reducer failed.
            self.state.fail(failed);
        }
        if let Some(failed) = self.state.failed() {
            return Err(DistError::GroupFailed {
                backend: self.info.backend,
                rank: self.info.rank,
                size: self.info.size,
                op,
                failed,
            });
        }
        Ok(raw)
    }

    pub(crate) fn start_error(&self, op: Op, f: Failure) -> DistError {
        self.state.fail(op);
        work_error(self.info, op, self.info.timeout, f)
    }

    fn work(&self, op: Op, raw: WorkHandle) -> Work {
        Work {
            raw,
            op,
            info: self.info,
            state: Arc::clone(&self.state),
        }
    }

    fn invalid(&self, op: Op, detail: String) -> DistError {
        DistError::InvalidArgument {
            rank: self.info.rank,
            what: op.to_string(),
            detail,
        }
    }

    /// Starts an in-place SUM all-reduce of each of `tensors`: afterwards
    /// every tensor holds its element-wise sum over ranks. Several tensors
    /// (a gradient bucket) may differ in shape but must share dtype and
    /// device, and go as one coalesced operation. On Gloo, CPU tensors.
    /// Returns at once; every rank must pass the same shapes in the same
    /// order.
    pub fn all_reduce_sum(&self, tensors: &mut [Tensor]) -> Result<Work> {
        let op = Op::AllReduce;
        if tensors.is_empty() {
            return Err(self.invalid(op, "no tensors given".into()));
        }
        let raw = self
            .handle(op)?
            .allreduce_sum(tensors)
            .map_err(|f| self.start_error(op, f))?;
        Ok(self.work(op, raw))
    }

    /// Concatenates every rank's `tensor` along dim 0, in rank order, and
    /// waits for the result (up to the group's timeout). All ranks must
    /// pass tensors of the same shape and dtype; a 0-dim tensor counts as
    /// shape `[1]`.
    pub fn all_gather(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = Op::AllGather;
        let input = gather_input(tensor, Tensor::contiguous);
        let mut shape = input.size();
        shape[0] *= self.info.size as i64;
        let mut output = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        let raw = self
            .handle(op)?
            .allgather_base(&mut output, &input)
            .map_err(|f| self.start_error(op, f))?;
        self.work(op, raw).wait()?;
        Ok(output)
    }

    /// Every rank's `tensor` concatenated along dim 0, in rank order, *with
    /// gradient*: what `torch.distributed.nn.functional.all_gather` computes.
    /// Its backward all-reduces (sums) the gradient of the whole gathered
    /// tensor over ranks and gives this rank's rows of the sum to `tensor`,
    /// so every rank's loss on the gathered rows reaches the rank that owns
    /// them. The backward pass therefore runs a collective and waits for it
    /// (up to the group's timeout): every rank must run backward through the
    /// same gathers in the same order. A failure there makes `backward`
    /// fail (use tch's `f_backward` to get the error rather than a panic)
    /// and this group refuse further work. Waits for the forward gather.
    /// Shapes as in [`ProcessGroup::all_gather`].
    pub fn all_gather_with_grad(&self, tensor: &Tensor) -> Result<Tensor> {
        let op = Op::AllGather;
        let input = gather_input(tensor, Tensor::shallow_clone);
        self.handle(op)?
            .allgather_with_grad(&input)
            .map_err(|f| self.start_error(op, f))
    }

    /// Starts a SUM reduce-scatter: `input` is `size` equal parts along dim
    /// 0, part `r` meant for rank `r`; afterwards `output` (the shape of
    /// one part, same dtype and device, contiguous) holds this rank's part
    /// summed over every rank's input. On NCCL each rank receives only its
    /// part (`ncclReduceScatter`: `(size - 1) / size` of the input's bytes
    /// travel per rank, half an all-reduce's). libtorch 2.11's Gloo has no
    /// reduce-scatter: it all-reduces a copy of the whole input and hands
    /// out the part on [`Work::wait`], so on CPUs it costs an all-reduce of
    /// `input` and completes only through `wait` ([`Work::is_completed`]
    /// stays false). Until the work is waited on, both tensors belong to
    /// the backend. Every rank must pass the same shapes.
    pub fn reduce_scatter_sum(&self, output: &mut Tensor, input: &Tensor) -> Result<Work> {
        let op = Op::ReduceScatter;
        let n = self.info.size as i64;
        let (out_shape, in_shape) = (output.size(), input.size());
        let fits = !in_shape.is_empty()
            && out_shape.len() == in_shape.len()
            && out_shape[0] * n == in_shape[0]
            && out_shape[1..] == in_shape[1..];
        if !fits {
            return Err(self.invalid(
                op,
                format!(
                    "the input must be {n} (the group size) times the output along dim 0: \
                     input {in_shape:?}, output {out_shape:?}"
                ),
            ));
        }
        if output.kind() != input.kind() || output.device() != input.device() {
            return Err(self.invalid(
                op,
                format!(
                    "input is {:?} on {:?}, output {:?} on {:?}",
                    input.kind(),
                    input.device(),
                    output.kind(),
                    output.device()
                ),
            ));
        }
        if !output.is_contiguous() || !input.is_contiguous() {
            return Err(self.invalid(op, "input and output must be contiguous".into()));
        }
        let raw = self
            .handle(op)?
            .reduce_scatter_sum(output, input)
            .map_err(|f| self.start_error(op, f))?;
        Ok(self.work(op, raw))
    }

    /// Starts an in-place broadcast of `tensor` from rank `root`: afterwards
    /// every rank's tensor holds root's values. Returns at once.
    pub fn broadcast(&self, tensor: &mut Tensor, root: usize) -> Result<Work> {
        let op = Op::Broadcast;
        if root >= self.info.size {
            return Err(self.invalid(
                op,
                format!("root {root} is not below the group size {}", self.info.size),
            ));
        }
        let raw = self
            .handle(op)?
            .broadcast(tensor, root as i64)
            .map_err(|f| self.start_error(op, f))?;
        Ok(self.work(op, raw))
    }

    /// Blocks until every rank has reached this barrier (up to the group's
    /// timeout), after this rank's earlier collectives have completed.
    pub fn barrier(&self) -> Result<()> {
        let op = Op::Barrier;
        let raw = self
            .handle(op)?
            .barrier()
            .map_err(|f| self.start_error(op, f))?;
        self.work(op, raw).wait()
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            if self.state.failed().is_some() || raw.failed_in_cpp().is_some() {
                // Its worker threads may be blocked in the failed collective
                // until the backend's own timeout; do not join them.
                raw.leak();
            }
        }
    }
}

impl std::fmt::Debug for ProcessGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessGroup")
            .field("backend", &self.info.backend)
            .field("rank", &self.info.rank)
            .field("size", &self.info.size)
            .field("timeout", &self.info.timeout)
            .field("failed", &self.state.failed())
            .finish()
    }
}

fn work_error(info: GroupInfo, op: Op, timeout: Duration, f: Failure) -> DistError {
    let GroupInfo {
        backend,
        rank,
        size,
        ..
    } = info;
    let (timed_out, detail) = match f {
        Failure::Timeout(detail) => (true, detail),
        // Gloo's own deadline (the group's timeout) ends the operation with
        // an error of its own rather than leaving it pending.
        Failure::Error(detail) => (detail.to_ascii_lowercase().contains("timed out"), detail),
    };
    if timed_out {
        DistError::Timeout {
            backend,
            rank,
            size,
            op,
            timeout,
            detail,
        }
    } else {
        DistError::Collective {
            backend,
            rank,
            size,
            op,
            detail,
        }
    }
}

/// A collective in flight. Wait on it before touching its tensors.
///
/// Dropping a `Work` without waiting does not cancel the collective; it
/// completes in the background, owned by the backend.
#[must_use = "a collective's tensors are not ready until its Work is waited on"]
pub struct Work {
    raw: WorkHandle,
    op: Op,
    info: GroupInfo,
    state: Arc<GroupState>,
}

impl Work {
    /// Waits for completion, up to the group's timeout.
    ///
    /// On NCCL this returns once the current CUDA stream is ordered after
    /// the collective (reading the tensor from the host synchronises).
    pub fn wait(self) -> Result<()> {
        let timeout = self.info.timeout;
        self.wait_timeout(timeout)
    }

    /// Waits for completion, up to `timeout`. A failure or timeout marks the
    /// group as failed (see [`ProcessGroup`]).
    pub fn wait_timeout(self, timeout: Duration) -> Result<()> {
        self.raw.wait(timeout).map_err(|f| {
            self.state.fail(self.op);
            work_error(self.info, self.op, timeout, f)
        })
    }

    /// Whether the collective has finished (successfully or not), without
    /// blocking.
    pub fn is_completed(&self) -> bool {
        self.raw.is_completed().unwrap_or(true)
    }

    /// The operation this work is for.
    pub fn op(&self) -> Op {
        self.op
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("op", &self.op)
            .field("rank", &self.info.rank)
            .field("completed", &self.is_completed())
            .finish()
    }
}

/// `tensor` as a gather's input: a 0-dim tensor as shape `[1]`, any other
/// as `as_is` gives it.
fn gather_input(tensor: &Tensor, as_is: fn(&Tensor) -> Tensor) -> Tensor {
    if tensor.dim() == 0 {
        tensor.reshape([1])
    } else {
        as_is(tensor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_rank_op_and_timeout() {
        let info = GroupInfo {
            backend: Backend::Gloo,
            rank: 1,
            size: 4,
            timeout: Duration::from_secs(600),
        };
        let error = |op, failure| work_error(info, op, info.timeout, failure);
        let e = error(
            Op::AllReduce,
            Failure::Timeout("Operation timed out!".into()),
        );
        let msg = e.to_string();
        assert!(msg.starts_with("rank 1 of 4: all_reduce"), "{msg}");
        assert!(msg.contains("600s"), "{msg}");
        // Gloo's own deadline reads as a timeout too.
        let gloo_deadline = "Timed out waiting 600000ms for recv operation to complete";
        let e = error(Op::Broadcast, Failure::Error(gloo_deadline.into()));
        assert!(
            matches!(e, DistError::Timeout { op, .. } if op == Op::Broadcast),
            "{e:?}"
        );
        let e = error(
            Op::Barrier,
            Failure::Error("Connection closed by peer".into()),
        );
        assert!(
            matches!(e, DistError::Collective { op, .. } if op == Op::Barrier),
            "{e:?}"
        );
    }
}
