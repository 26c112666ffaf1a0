//! Errors of the distributed layer. Each names the rank (and the group size),
//! the operation, and for timeouts the timeout, so a log line from any rank
//! says what to look at.

use std::fmt;
use std::time::Duration;

/// The c10d backend of a process group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Gloo, the CPU backend (TCP between processes).
    Gloo,
    /// NCCL, the CUDA backend.
    Nccl,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Gloo => "gloo",
            Backend::Nccl => "nccl",
        })
    }
}

/// A collective operation, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    AllReduce,
    AllGather,
    Broadcast,
    Barrier,
    ReduceScatter,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::Barrier => "barrier",
            Op::ReduceScatter => "reduce_scatter",
        })
    }
}

/// What went wrong in the store or a process group.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DistError {
    /// The TCPStore could not be served or reached.
    #[error(
        "rank {rank}: could not {action} the rendezvous store at {host}:{port} within {timeout:?}: \
         {detail}. Check that rank 0 runs, that every rank uses the same MASTER_ADDR and \
         MASTER_PORT, and that the port is free on rank 0's host and reachable from the others"
    )]
    Rendezvous {
        rank: usize,
        /// "serve" on rank 0, "connect to" elsewhere.
        action: &'static str,
        host: String,
        port: u16,
        timeout: Duration,
        detail: String,
    },

    /// A store operation failed (connection lost, server gone).
    #[error("rank {rank}: store {op} of key `{key}` failed: {detail}")]
    Store {
        rank: usize,
        op: &'static str,
        key: String,
        detail: String,
    },

    /// Store keys did not appear in time.
    #[error(
        "rank {rank}: store key(s) {keys:?} were not set within {timeout:?}; the rank(s) \
         that should set them may have died, hung or fallen behind"
    )]
    StoreTimeout {
        rank: usize,
        keys: Vec<String>,
        timeout: Duration,
    },

    /// Creating a process group failed (rendezvous, missing CUDA, ...).
    #[error(
        "rank {rank} of {size}: creating the {backend} process group (timeout {timeout:?}) \
         failed: {detail}"
    )]
    Init {
        backend: Backend,
        rank: usize,
        size: usize,
        timeout: Duration,
        detail: String,
    },

    /// A collective failed, typically because another rank died.
    #[error(
        "rank {rank} of {size}: {op} on the {backend} process group failed: {detail}. \
         Another rank has probably exited or crashed; its own log says why"
    )]
    Collective {
        backend: Backend,
        rank: usize,
        size: usize,
        op: Op,
        detail: String,
    },

    /// A collective did not complete in time.
    #[error(
        "rank {rank} of {size}: {op} on the {backend} process group did not complete within \
         {timeout:?}: another rank is hung, dead, or not calling {op} ({detail})"
    )]
    Timeout {
        backend: Backend,
        rank: usize,
        size: usize,
        op: Op,
        timeout: Duration,
        detail: String,
    },

    /// The group already had a failed or timed-out collective; the ranks
    /// are out of step, so it takes no more.
    #[error(
        "rank {rank} of {size}: {op} refused: an earlier {failed} on this {backend} process \
         group failed, so the ranks are out of step; stop this run (and resume from a checkpoint)"
    )]
    GroupFailed {
        backend: Backend,
        rank: usize,
        size: usize,
        op: Op,
        failed: Op,
    },

    /// Parameters a gradient reducer cannot work with (duplicates, no
    /// gradient hooks possible, ...), caught before any rank communicates.
    #[error("gradient reducer: {detail}")]
    InvalidParameters { detail: String },

    /// A call with arguments that cannot work, caught before any rank
    /// communicates.
    #[error("rank {rank}: {what}: {detail}")]
    InvalidArgument {
        rank: usize,
        what: String,
        detail: String,
    },
}

pub type Result<T, E = DistError> = std::result::Result<T, E>;
