//! The bucketed gradient reducer: the shim's `vlm_reducer_*`
//! (csrc/reducer.cpp).

use super::group::RawPg;
use super::*;

#[repr(C)]
pub(crate) struct RawReducer {
    _opaque: [u8; 0],
}

extern "C" {
    fn vlm_reducer_new(
        params: *const *mut C_tensor,
        bucket_of: *const usize,
        n: usize,
        out: *mut *mut RawReducer,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_reducer_free(r: *mut RawReducer);
    fn vlm_reducer_attach(r: *mut RawReducer, pg: *mut RawPg, err: *mut *mut c_char) -> i32;
    fn vlm_reducer_detach(r: *mut RawReducer);
    fn vlm_reducer_set_sync(r: *mut RawReducer, sync: i32);
    fn vlm_reducer_last_overlapped(r: *mut RawReducer) -> usize;
    fn vlm_reducer_finish(
        r: *mut RawReducer,
        pg: *mut RawPg,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> i32;
}

/// An owned C++ `Reducer` (csrc/reducer.cpp): flat buckets and, once
/// attached, gradient hooks on the parameters.
pub(crate) struct ReducerHandle(NonNull<RawReducer>);

// SAFETY: the C++ reducer guards its state with its own mutex; its hooks run
// on autograd's threads by design.
unsafe impl Send for ReducerHandle {}

impl ReducerHandle {
    pub(crate) fn new(params: &[Tensor], bucket_of: &[usize]) -> FfiResult<Self> {
        assert_eq!(params.len(), bucket_of.len());
        let ptrs: Vec<*mut C_tensor> = params.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: `ptrs` and `bucket_of` hold `n` valid entries for the call;
        // the shim copies each `at::Tensor` (a reference) and never writes
        // through the pointers.
        let code = unsafe {
            vlm_reducer_new(
                ptrs.as_ptr(),
                bucket_of.as_ptr(),
                ptrs.len(),
                &mut out,
                &mut err,
            )
        };
        status(code, err)?;
        NonNull::new(out)
            .map(ReducerHandle)
            .ok_or_else(|| Failure::Error("the shim returned a null reducer".into()))
    }

    pub(crate) fn attach(&self, pg: &PgHandle) -> FfiResult<()> {
        let mut err = ptr::null_mut();
        // SAFETY: two live handles; the reducer keeps its own reference to
        // the group's C++ state.
        let code = unsafe { vlm_reducer_attach(self.0.as_ptr(), pg.raw(), &mut err) };
        status(code, err)
    }

    pub(crate) fn detach(&self) {
        // SAFETY: live handle.
        unsafe { vlm_reducer_detach(self.0.as_ptr()) }
    }

    pub(crate) fn set_sync(&self, sync: bool) {
        // SAFETY: live handle.
        unsafe { vlm_reducer_set_sync(self.0.as_ptr(), i32::from(sync)) }
    }

    pub(crate) fn last_overlapped(&self) -> usize {
        // SAFETY: live handle.
        unsafe { vlm_reducer_last_overlapped(self.0.as_ptr()) }
    }

    pub(crate) fn finish(&self, pg: &PgHandle, timeout: Duration) -> FfiResult<()> {
        let mut err = ptr::null_mut();
        // SAFETY: two live handles; valid out-pointer.
        let code =
            unsafe { vlm_reducer_finish(self.0.as_ptr(), pg.raw(), millis(timeout), &mut err) };
        status(code, err)
    }
}

impl Drop for ReducerHandle {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once; the shim removes the
        // hooks first, so no later backward calls into freed memory.
        unsafe { vlm_reducer_free(self.0.as_ptr()) }
    }
}
