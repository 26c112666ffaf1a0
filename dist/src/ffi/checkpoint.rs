//! Activation checkpointing: the shim's autograd function that runs a Rust
//! closure again in backward (csrc/checkpoint.cpp).

use super::*;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use vlmatch_core::checkpoint::Recompute;

type RecomputeFn = unsafe extern "C" fn(
    ctx: *mut c_void,
    again: i32,
    inputs: *mut *mut C_tensor,
    n: usize,
    out: *mut *mut C_tensor,
    message: *mut c_void,
) -> i32;
type ReleaseFn = unsafe extern "C" fn(ctx: *mut c_void);

extern "C" {
    fn vlm_checkpoint(
        inputs: *const *mut C_tensor,
        n_inputs: usize,
        params: *const *mut C_tensor,
        n_params: usize,
        ctx: *mut c_void,
        run: RecomputeFn,
        release: ReleaseFn,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_message_set(message: *mut c_void, text: *const c_char, len: usize);
}

/// The shim's callback: `ctx` is a `Box<Recompute>`; the inputs are new
/// `at::Tensor`s handed over to us, the output one handed over to the shim.
/// A panic of the layer becomes the failure's message (no unwinding into
/// C++).
unsafe extern "C" fn recompute(
    ctx: *mut c_void,
    again: i32,
    inputs: *mut *mut C_tensor,
    n: usize,
    out: *mut *mut C_tensor,
    message: *mut c_void,
) -> i32 {
    // SAFETY: the shim passes `n` fresh heap tensors whose ownership moves
    // to us: each is wrapped once, and freed when its `Tensor` drops.
    let tensors: Vec<Tensor> = (0..n)
        .map(|i| unsafe { Tensor::from_ptr(*inputs.add(i)) })
        .collect();
    // SAFETY: `ctx` is the `Box<Recompute>` that `checkpoint` leaked; the
    // shim calls `release` (which frees it) only after its last call.
    let run = unsafe { &*(ctx as *const Recompute) };
    if again != 0 {
        vlmatch_core::checkpoint::note_recomputed();
    }
    match catch_unwind(AssertUnwindSafe(|| run(&tensors))) {
        Ok(mut t) => {
            // SAFETY: `out` is a valid slot; the shim takes over the heap
            // tensor, so the Rust wrapper must not free it.
            unsafe { *out = t.as_mut_ptr() };
            std::mem::forget(t);
            OK
        }
        Err(panic) => {
            let text = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("the layer panicked");
            // SAFETY: `message` is the shim's `std::string*`, written once.
            unsafe { vlm_message_set(message, text.as_ptr() as *const c_char, text.len()) };
            2
        }
    }
}

/// Frees the `Box<Recompute>` behind `ctx`.
unsafe extern "C" fn release(ctx: *mut c_void) {
    // SAFETY: `ctx` came from `Box::into_raw` in `checkpoint`, and the shim
    // releases it exactly once.
    drop(unsafe { Box::from_raw(ctx as *mut Recompute) });
}

/// `run(inputs)` checkpointed (`vlmatch_core::checkpoint`'s contract).
pub(crate) fn checkpoint(
    inputs: &[Tensor],
    params: &[Tensor],
    run: Recompute,
) -> FfiResult<Tensor> {
    let handles = |ts: &[Tensor]| -> Vec<*mut C_tensor> {
        ts.iter().map(|t| t.as_ptr() as *mut C_tensor).collect()
    };
    let (ins, ps) = (handles(inputs), handles(params));
    let ctx = Box::into_raw(Box::new(run)) as *mut c_void;
    let mut out = ptr::null_mut();
    let mut err = ptr::null_mut();
    // SAFETY: the handle arrays point at live tensors the shim only copies
    // (reference counts); `ctx` is handed over with its callbacks; `out`
    // and `err` are valid slots. On success `out` is a fresh heap
    // tensor that we own.
    let code = unsafe {
        vlm_checkpoint(
            ins.as_ptr(),
            ins.len(),
            ps.as_ptr(),
            ps.len(),
            ctx,
            recompute,
            release,
            &mut out,
            &mut err,
        )
    };
    status(code, err)?;
    if out.is_null() {
        return Err(Failure::Error("the shim returned a null tensor".into()));
    }
    // SAFETY: `out` is a fresh heap `at::Tensor` handed over to us.
    Ok(unsafe { Tensor::from_ptr(out) })
}
