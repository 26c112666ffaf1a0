//! Collectives inside autograd: the shim's differentiable all-gather and
//! `.grad` assignment (csrc/autograd.cpp).

use super::group::RawPg;
use super::*;

extern "C" {
    fn vlm_pg_allgather_with_grad(
        pg: *mut RawPg,
        input: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_tensor_set_grad(param: *mut C_tensor, grad: *mut C_tensor, err: *mut *mut c_char)
        -> i32;
}

impl PgHandle {
    /// Every rank's `input` concatenated along dim 0, differentiable (the
    /// backward all-reduces the gradient); waits for the gather.
    pub(crate) fn allgather_with_grad(&self, input: &Tensor) -> FfiResult<Tensor> {
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle and a live tensor handle, only read (the shim
        // copies the `at::Tensor`). On success `out` is a new `at::Tensor*`
        // that we own.
        let code = unsafe {
            vlm_pg_allgather_with_grad(
                self.raw(),
                input.as_ptr() as *mut C_tensor,
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
}

/// Sets `param`'s `.grad` to `grad` (sharing its storage), defining it where
/// it was undefined.
pub(crate) fn set_grad(param: &Tensor, grad: &Tensor) -> FfiResult<()> {
    let mut err = ptr::null_mut();
    // SAFETY: two live tensor handles; the shim assigns the `at::Tensor`
    // (a reference count) and writes nothing through the pointers.
    let code = unsafe {
        vlm_tensor_set_grad(
            param.as_ptr() as *mut C_tensor,
            grad.as_ptr() as *mut C_tensor,
            &mut err,
        )
    };
    status(code, err)
}
