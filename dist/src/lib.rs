//! vlmatch's distributed engine: libtorch's own c10d from Rust.
//!
//! - [`Store`]: a `c10d::TCPStore` (rank 0 serves, the others connect; or,
//!   under torchrun's agent store, every rank connects to the agent's), for
//!   rendezvous and small agreements (`set`/`get`/`add`/`wait`/`check`).
//! - [`ProcessGroup`]: a `c10d::ProcessGroupGloo` (CPU) or
//!   `c10d::ProcessGroupNCCL` (CUDA) over the store, with asynchronous
//!   collectives: [`ProcessGroup::all_reduce_sum`] and
//!   [`ProcessGroup::broadcast`] return a [`Work`] to wait on later, so a
//!   trainer can start reducing one gradient bucket while computing the next.
//! - [`LaunchEnv`]: rank, world size and rendezvous address from `torchrun`'s
//!   or Slurm's environment.
//! - [`checkpoint::checkpoint`]: activation checkpointing, a layer
//!   recomputed in backward (a C++ autograd function that calls back into
//!   Rust), which the host hands to the layer stacks.
//!
//! The C++ side is `csrc/*.cpp` (one file per concern); all `unsafe` is in
//! the `ffi` module and its submodules, which mirror those files.
//! Collectives must be issued in the same order on every rank.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! use vlmatch_dist::{LaunchEnv, ProcessGroup, Store};
//!
//! let env = LaunchEnv::from_env()?.expect("started by torchrun or srun");
//! let timeout = Duration::from_secs(600);
//! let store = Store::from_launch(&env, timeout)?;
//! let pg = ProcessGroup::gloo(&store, env.rank, env.world_size, timeout)?;
//! let mut grads = vec![tch::Tensor::ones([4], (tch::Kind::Float, tch::Device::Cpu))];
//! let work = pg.all_reduce_sum(&mut grads)?; // runs in the background
//! work.wait()?; // grads[0] now holds world_size everywhere
//! # Ok(()) }
//! ```

pub mod checkpoint;
mod collective;
mod error;
mod ffi;
mod group;
pub mod health;
pub mod launch;
pub mod reducer;
mod store;

pub use collective::{to_core_error, DistCollective};
pub use error::{Backend, DistError, Op, Result};
pub use group::{ProcessGroup, Work};
pub use health::{diagnose, rank_gone, Activity, Entered, Heartbeat};
pub use launch::{LaunchEnv, LaunchError, Launcher};
pub use reducer::{agree_any, broadcast_parameters, set_grad, GradReducer, DEFAULT_BUCKET_MB};
pub use store::{Store, StoreServer};

/// Whether this build has the NCCL backend (nccl.h and the CUDA headers were
/// found when the crate was compiled). Creating an NCCL group still needs a
/// GPU at run time.
pub fn has_nccl() -> bool {
    ffi::has_nccl()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send<T: Send>() {}
    fn sync<T: Sync>() {}

    /// A trainer hands works to a communication thread and shares the store;
    /// a group moves between threads but is used by one at a time.
    #[test]
    fn thread_safety_markers() {
        send::<Store>();
        sync::<Store>();
        send::<ProcessGroup>();
        send::<Work>();
    }
}
