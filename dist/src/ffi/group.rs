//! Process groups and their work: the shim's `vlm_pg_*` collectives and
//! `vlm_work_*` (csrc/group.cpp).

use super::store::RawStore;
use super::*;

#[repr(C)]
pub(crate) struct RawPg {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawWork {
    _opaque: [u8; 0],
}

/// The backends' constructors, one signature (`vlm_pg_gloo_new`,
/// `vlm_pg_nccl_new`).
macro_rules! pg_constructors {
    ($($name:ident),*) => {
        extern "C" {
            $(
                fn $name(
                    s: *mut RawStore,
                    prefix: *const c_char,
                    rank: i32,
                    size: i32,
                    timeout_ms: i64,
                    out: *mut *mut RawPg,
                    err: *mut *mut c_char,
                ) -> i32;
            )*
        }
    };
}

pg_constructors!(vlm_pg_gloo_new, vlm_pg_nccl_new);

extern "C" {
    fn vlm_has_nccl() -> i32;
    fn vlm_pg_free(pg: *mut RawPg);
    fn vlm_pg_leak(pg: *mut RawPg);
    fn vlm_pg_allreduce_sum(
        pg: *mut RawPg,
        tensors: *const *mut C_tensor,
        n: usize,
        out: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_allgather_base(
        pg: *mut RawPg,
        output: *mut C_tensor,
        input: *mut C_tensor,
        out: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_reduce_scatter_sum(
        pg: *mut RawPg,
        output: *mut C_tensor,
        input: *mut C_tensor,
        out: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_broadcast(
        pg: *mut RawPg,
        tensor: *mut C_tensor,
        root: i64,
        out: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_barrier(pg: *mut RawPg, out: *mut *mut RawWork, err: *mut *mut c_char) -> i32;
    fn vlm_work_wait(w: *mut RawWork, timeout_ms: i64, err: *mut *mut c_char) -> i32;
    fn vlm_work_is_completed(w: *mut RawWork, out: *mut i32, err: *mut *mut c_char) -> i32;
    fn vlm_work_free(w: *mut RawWork);
}

pub(crate) fn has_nccl() -> bool {
    // SAFETY: takes no arguments and only returns a compile-time constant.
    unsafe { vlm_has_nccl() != 0 }
}

/// Which c10d backend to construct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawBackend {
    Gloo,
    Nccl,
}

/// An owned `c10::intrusive_ptr<c10d::Backend>`.
pub(crate) struct PgHandle(Option<NonNull<RawPg>>);

/// Starts a collective: `call` (the shim function, given valid
/// out-pointers for the work and the error message), then its status and
/// the work it returned.
fn start_work(
    call: impl FnOnce(*mut *mut RawWork, *mut *mut c_char) -> i32,
) -> FfiResult<WorkHandle> {
    let mut out = ptr::null_mut();
    let mut err = ptr::null_mut();
    let code = call(&mut out, &mut err);
    status(code, err)?;
    WorkHandle::from_raw(out)
}

// SAFETY: a c10d backend may be used from another thread than the one that
// created it (PyTorch's own reducer does). It is not `Sync`: Gloo hands out
// collective tags from an unsynchronised counter, so two threads issuing
// collectives at once would race, and every rank must issue them in the
// same order anyway.
unsafe impl Send for PgHandle {}

impl PgHandle {
    pub(crate) fn new(
        backend: RawBackend,
        store: &StoreHandle,
        prefix: &str,
        rank: i32,
        size: i32,
        timeout: Duration,
    ) -> FfiResult<Self> {
        let prefix = c_string("store prefix", prefix)?;
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        let ctor = match backend {
            RawBackend::Gloo => vlm_pg_gloo_new,
            RawBackend::Nccl => vlm_pg_nccl_new,
        };
        // SAFETY: the store handle is live for the call (the C++ group takes
        // its own reference); `prefix` is a valid C string; `out`/`err` are
        // valid out-pointers.
        let code = unsafe {
            ctor(
                store.0.as_ptr(),
                prefix.as_ptr(),
                rank,
                size,
                millis(timeout),
                &mut out,
                &mut err,
            )
        };
        status(code, err)?;
        NonNull::new(out)
            .map(|p| PgHandle(Some(p)))
            .ok_or_else(|| Failure::Error("the shim returned a null process group".into()))
    }

    pub(super) fn raw(&self) -> *mut RawPg {
        self.0.map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    /// Starts an in-place SUM all-reduce of `tensors`.
    pub(crate) fn allreduce_sum(&self, tensors: &mut [Tensor]) -> FfiResult<WorkHandle> {
        let ptrs: Vec<*mut C_tensor> = tensors.iter_mut().map(|t| t.as_mut_ptr()).collect();
        // SAFETY: live handle; `ptrs` holds `ptrs.len()` live tensor handles
        // (`at::Tensor*`, tch's `C_tensor`) borrowed mutably for the call.
        // The shim copies each `at::Tensor` (a reference to the same
        // storage), so the storage outlives the operation even if the Rust
        // tensors are dropped before the work completes.
        start_work(|out, err| unsafe {
            vlm_pg_allreduce_sum(self.raw(), ptrs.as_ptr(), ptrs.len(), out, err)
        })
    }

    /// Starts gathering every rank's `input` into `output` (dim 0).
    pub(crate) fn allgather_base(
        &self,
        output: &mut Tensor,
        input: &Tensor,
    ) -> FfiResult<WorkHandle> {
        // SAFETY: live handle and two live tensor handles. `input` is only
        // read; the shim takes a `*mut` because c10d's signature does, and
        // copies the `at::Tensor` before use, so the pointer is never
        // written through.
        start_work(|out, err| unsafe {
            vlm_pg_allgather_base(
                self.raw(),
                output.as_mut_ptr(),
                input.as_ptr() as *mut C_tensor,
                out,
                err,
            )
        })
    }

    /// Starts a SUM reduce-scatter of `input` (world size parts along dim
    /// 0) into `output` (this rank's part).
    pub(crate) fn reduce_scatter_sum(
        &self,
        output: &mut Tensor,
        input: &Tensor,
    ) -> FfiResult<WorkHandle> {
        // SAFETY: live handle and two live tensor handles. `input` is only
        // read (c10d's signature takes it mutably; the shim copies the
        // `at::Tensor`, a reference to the same storage, before use), so
        // the pointer is never written through.
        start_work(|out, err| unsafe {
            vlm_pg_reduce_scatter_sum(
                self.raw(),
                output.as_mut_ptr(),
                input.as_ptr() as *mut C_tensor,
                out,
                err,
            )
        })
    }

    /// Starts an in-place broadcast of `tensor` from `root`.
    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: i64) -> FfiResult<WorkHandle> {
        // SAFETY: live handle and a live, mutably borrowed tensor handle.
        start_work(|out, err| unsafe {
            vlm_pg_broadcast(self.raw(), tensor.as_mut_ptr(), root, out, err)
        })
    }

    pub(crate) fn barrier(&self) -> FfiResult<WorkHandle> {
        // SAFETY: live handle; valid out-pointers.
        start_work(|out, err| unsafe { vlm_pg_barrier(self.raw(), out, err) })
    }

    /// Gives up the handle without running the backend's destructor, which
    /// joins worker threads that may be stuck in a failed collective. The
    /// backend's memory and threads stay until the process exits.
    pub(crate) fn leak(mut self) {
        if let Some(p) = self.0.take() {
            // SAFETY: we own the handle; the shim frees the box but keeps
            // the backend's reference, so no destructor runs.
            unsafe { vlm_pg_leak(p.as_ptr()) }
        }
    }
}

impl Drop for PgHandle {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // SAFETY: we own the handle and free it once. The destructor
            // drains queued work first (bounded by the group's timeout).
            unsafe { vlm_pg_free(p.as_ptr()) }
        }
    }
}

/// An owned `c10::intrusive_ptr<c10d::Work>`: one collective in flight.
pub(crate) struct WorkHandle(NonNull<RawWork>);

// SAFETY: c10d::Work guards its state with its own mutex and condition
// variable; waiting on it from another thread than the one that started it
// is what PyTorch's reducer does.
unsafe impl Send for WorkHandle {}

impl WorkHandle {
    pub(super) fn from_raw(out: *mut RawWork) -> FfiResult<Self> {
        NonNull::new(out)
            .map(WorkHandle)
            .ok_or_else(|| Failure::Error("the shim returned a null work handle".into()))
    }

    /// Waits up to `timeout`. `Failure::Timeout` leaves the work in flight.
    pub(crate) fn wait(&self, timeout: Duration) -> FfiResult<()> {
        let mut err = ptr::null_mut();
        // SAFETY: live handle; valid out-pointer.
        let code = unsafe { vlm_work_wait(self.0.as_ptr(), millis(timeout), &mut err) };
        status(code, err)
    }

    pub(crate) fn is_completed(&self) -> FfiResult<bool> {
        let mut out = 0i32;
        let mut err = ptr::null_mut();
        // SAFETY: live handle; valid out-pointers.
        let code = unsafe { vlm_work_is_completed(self.0.as_ptr(), &mut out, &mut err) };
        status(code, err)?;
        Ok(out != 0)
    }
}

impl Drop for WorkHandle {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once; an unfinished
        // collective keeps running, owned by its backend.
        unsafe { vlm_work_free(self.0.as_ptr()) }
    }
}
