//! Activation checkpointing as the layer stacks see it: a layer computed
//! without keeping its activations, and computed again from its inputs when
//! backward reaches it (`train.activation_checkpointing`).
//!
//! The mechanism is the host's: libtorch's C++ API has no
//! `torch.utils.checkpoint`, and the autograd function that does it lives in
//! `vlmatch-dist`'s C++ shim, which plugins may not depend on. The host hands
//! it to the plugins as a [`Checkpointer`] function pointer in the registry's
//! `ModelEnv`, beside its other services; a stack that is asked to
//! checkpoint calls it for each layer.
//!
//! Contract of a [`Checkpointer`] `c(inputs, params, run)`:
//! - it returns `run(inputs)`, computed without gradient tracking, and
//!   keeps only `inputs` (the tensors `params` are alive anyway);
//! - when backward reaches that output, it calls `run` again on detached
//!   copies of `inputs` with gradient tracking on and libtorch's random
//!   generators (CPU, and the inputs' CUDA device) in the state they had
//!   before the first call, so dropout draws the same masks; then it takes
//!   the output's gradient back through that graph to `inputs` and `params`
//!   and hands the gradients to the outer backward, which accumulates them
//!   into `.grad` as if the layer had been computed plainly (so gradient
//!   hooks, such as a data-parallel reducer's, fire as they would);
//! - where gradients are off (`tch::no_grad`: evaluation, the momentum
//!   encoders of momentum distillation) or nothing among `inputs` and
//!   `params` needs a gradient, it is `run(inputs)` and nothing more.
//!
//! `params` must hold every tensor `run` reads that needs a gradient and is
//! not among `inputs` (a layer's weights): a parameter left out gets no
//! gradient from the layer.

use crate::Result;
use std::sync::atomic::{AtomicU64, Ordering};
use tch::Tensor;

/// A layer's computation from its inputs. Owned, since it runs again in
/// backward, after the forward that made it has returned; `Send`, since a
/// CUDA backward runs it on libtorch's device thread (while the thread that
/// called backward waits).
pub type Recompute = Box<dyn Fn(&[Tensor]) -> Tensor + Send>;

/// The host's checkpointing mechanism (see the module documentation).
pub type Checkpointer = fn(inputs: &[Tensor], params: &[Tensor], run: Recompute) -> Result<Tensor>;

static RECOMPUTED: AtomicU64 = AtomicU64::new(0);

/// Counts one recomputation in backward; a [`Checkpointer`] calls it.
pub fn note_recomputed() {
    RECOMPUTED.fetch_add(1, Ordering::Relaxed);
}

/// Layers recomputed in backward by this process so far (tests check that
/// checkpointing was in effect).
pub fn recomputed() -> u64 {
    RECOMPUTED.load(Ordering::Relaxed)
}
