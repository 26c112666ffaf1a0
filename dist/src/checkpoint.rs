//! Activation checkpointing for the layer stacks: [`checkpoint`] is the
//! [`vlmatch_core::checkpoint::Checkpointer`] that the host hands to the
//! plugins (the registry's `ModelEnv`). It is the shim's C++ autograd
//! function (`csrc/checkpoint.cpp`): the layer runs without gradient
//! tracking, only its inputs are saved, and backward runs the closure again
//! with the random generators replayed, then returns the gradients of the
//! inputs and of `params` to the outer backward. It lives here because this
//! crate is the one with a C++ shim compiled against libtorch.

use tch::{TchError, Tensor};
use vlmatch_core::checkpoint::Recompute;
use vlmatch_core::{Error, Result};

/// `run(inputs)`, checkpointed as [`vlmatch_core::checkpoint`] describes.
pub fn checkpoint(inputs: &[Tensor], params: &[Tensor], run: Recompute) -> Result<Tensor> {
    crate::ffi::checkpoint(inputs, params, run)
        .map_err(|f| Error::Torch(TchError::Torch(f.message().to_string())))
}
