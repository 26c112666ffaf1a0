//! The only module with `unsafe`: the C ABI of `csrc/c10d_shim.cpp` and
//! owning wrappers around its three handle types.
//!
//! Every shim function returns a status (`OK`, `TIMEOUT`, `ERROR`) and, on
//! failure, a malloc'd message that [`take_message`] copies and frees. The
//! shim catches every C++ exception, so none reaches Rust.

use std::ffi::{c_char, CStr, CString};
use std::ptr::{self, NonNull};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

const OK: i32 = 0;
const TIMEOUT: i32 = 1;

#[repr(C)]
pub(crate) struct RawStore {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawPg {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawWork {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawReducer {
    _opaque: [u8; 0],
}

#[repr(C)]
pub(crate) struct RawActivity {
    _opaque: [u8; 0],
}

/// The shim's `VLM_OP_*` codes (`PgState::failed_op`, `Activity`).
const OP_ALLREDUCE: i32 = 1;
const OP_ALLGATHER: i32 = 2;
const OP_BROADCAST: i32 = 3;
const OP_BARRIER: i32 = 4;

fn op_of_code(code: i32) -> Option<crate::Op> {
    match code {
        OP_ALLREDUCE => Some(crate::Op::AllReduce),
        OP_ALLGATHER => Some(crate::Op::AllGather),
        OP_BROADCAST => Some(crate::Op::Broadcast),
        OP_BARRIER => Some(crate::Op::Barrier),
        _ => None,
    }
}

extern "C" {
    fn vlm_string_free(s: *mut c_char);
    fn vlm_bytes_free(b: *mut u8);
    fn vlm_has_nccl() -> i32;

    fn vlm_store_tcp_new(
        host: *const c_char,
        port: u16,
        world_size: i32,
        is_master: i32,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_tcp_client(
        host: *const c_char,
        port: u16,
        timeout_ms: i64,
        out: *mut *mut RawStore,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_prefixed(
        s: *mut RawStore,
        prefix: *const c_char,
        out: *mut *mut RawStore,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_free(s: *mut RawStore);
    fn vlm_store_set(
        s: *mut RawStore,
        key: *const c_char,
        data: *const u8,
        len: usize,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_get(
        s: *mut RawStore,
        key: *const c_char,
        timeout_ms: i64,
        data: *mut *mut u8,
        len: *mut usize,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_add(
        s: *mut RawStore,
        key: *const c_char,
        delta: i64,
        out: *mut i64,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_wait(
        s: *mut RawStore,
        keys: *const *const c_char,
        n: usize,
        timeout_ms: i64,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_check(
        s: *mut RawStore,
        keys: *const *const c_char,
        n: usize,
        out: *mut i32,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_store_delete(
        s: *mut RawStore,
        key: *const c_char,
        out: *mut i32,
        err: *mut *mut c_char,
    ) -> i32;

    fn vlm_pg_gloo_new(
        s: *mut RawStore,
        prefix: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        out: *mut *mut RawPg,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_nccl_new(
        s: *mut RawStore,
        prefix: *const c_char,
        rank: i32,
        size: i32,
        timeout_ms: i64,
        out: *mut *mut RawPg,
        err: *mut *mut c_char,
    ) -> i32;
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
    fn vlm_pg_broadcast(
        pg: *mut RawPg,
        tensor: *mut C_tensor,
        root: i64,
        out: *mut *mut RawWork,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_pg_barrier(pg: *mut RawPg, out: *mut *mut RawWork, err: *mut *mut c_char) -> i32;
    fn vlm_pg_failed_op(pg: *mut RawPg) -> i32;
    fn vlm_pg_activity(pg: *mut RawPg) -> *mut RawActivity;
    fn vlm_activity_read(a: *mut RawActivity, out: *mut i64);
    fn vlm_activity_free(a: *mut RawActivity);
    fn vlm_pg_allgather_with_grad(
        pg: *mut RawPg,
        input: *mut C_tensor,
        out: *mut *mut C_tensor,
        err: *mut *mut c_char,
    ) -> i32;
    fn vlm_tensor_set_grad(param: *mut C_tensor, grad: *mut C_tensor, err: *mut *mut c_char)
        -> i32;

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

    fn vlm_work_wait(w: *mut RawWork, timeout_ms: i64, err: *mut *mut c_char) -> i32;
    fn vlm_work_is_completed(w: *mut RawWork, out: *mut i32, err: *mut *mut c_char) -> i32;
    fn vlm_work_free(w: *mut RawWork);
}

/// Why a shim call failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The deadline passed before the operation completed.
    Timeout(String),
    /// The operation failed (or could not start); the C++ message.
    Error(String),
}

impl Failure {
    pub(crate) fn message(&self) -> &str {
        match self {
            Failure::Timeout(m) | Failure::Error(m) => m,
        }
    }
}

pub(crate) type FfiResult<T> = Result<T, Failure>;

/// Copies and frees a message the shim allocated.
fn take_message(err: *mut c_char) -> String {
    if err.is_null() {
        return "unknown error (the C++ shim gave no message)".into();
    }
    // SAFETY: the shim only ever stores NUL-terminated strings from malloc
    // in `err`; we read it once and free it once, right here.
    let text = unsafe {
        let text = CStr::from_ptr(err).to_string_lossy().into_owned();
        vlm_string_free(err);
        text
    };
    // Our messages add their own punctuation after the C++ one.
    text.trim_end().trim_end_matches('.').to_string()
}

fn status(code: i32, err: *mut c_char) -> FfiResult<()> {
    match code {
        OK => Ok(()),
        TIMEOUT => Err(Failure::Timeout(take_message(err))),
        _ => Err(Failure::Error(take_message(err))),
    }
}

fn c_string(what: &str, s: &str) -> FfiResult<CString> {
    CString::new(s).map_err(|_| Failure::Error(format!("{what} `{s}` contains a NUL byte")))
}

/// Milliseconds for the C++ side, at least 1 (0 would mean "no wait" to
/// some c10d calls and "forever" to others).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

pub(crate) fn has_nccl() -> bool {
    // SAFETY: takes no arguments and only returns a compile-time constant.
    unsafe { vlm_has_nccl() != 0 }
}

mod store;
pub(crate) use store::StoreHandle;

/// Which c10d backend to construct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RawBackend {
    Gloo,
    Nccl,
}

/// An owned `c10::intrusive_ptr<c10d::Backend>`.
pub(crate) struct PgHandle(Option<NonNull<RawPg>>);

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

    fn raw(&self) -> *mut RawPg {
        self.0.map_or(ptr::null_mut(), NonNull::as_ptr)
    }

    /// Starts an in-place SUM all-reduce of `tensors`.
    pub(crate) fn allreduce_sum(&self, tensors: &mut [Tensor]) -> FfiResult<WorkHandle> {
        let ptrs: Vec<*mut C_tensor> = tensors.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle; `ptrs` holds `ptrs.len()` live tensor handles
        // (`at::Tensor*`, tch's `C_tensor`) borrowed mutably for the call.
        // The shim copies each `at::Tensor` (a reference to the same
        // storage), so the storage outlives the operation even if the Rust
        // tensors are dropped before the work completes.
        let code = unsafe {
            vlm_pg_allreduce_sum(self.raw(), ptrs.as_ptr(), ptrs.len(), &mut out, &mut err)
        };
        status(code, err)?;
        WorkHandle::from_raw(out)
    }

    /// Starts gathering every rank's `input` into `output` (dim 0).
    pub(crate) fn allgather_base(
        &self,
        output: &mut Tensor,
        input: &Tensor,
    ) -> FfiResult<WorkHandle> {
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle and two live tensor handles. `input` is only
        // read; the shim takes a `*mut` because c10d's signature does, and
        // copies the `at::Tensor` before use, so the pointer is never
        // written through.
        let code = unsafe {
            vlm_pg_allgather_base(
                self.raw(),
                output.as_mut_ptr(),
                input.as_ptr() as *mut C_tensor,
                &mut out,
                &mut err,
            )
        };
        status(code, err)?;
        WorkHandle::from_raw(out)
    }

    /// Starts an in-place broadcast of `tensor` from `root`.
    pub(crate) fn broadcast(&self, tensor: &mut Tensor, root: i64) -> FfiResult<WorkHandle> {
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle and a live, mutably borrowed tensor handle.
        let code =
            unsafe { vlm_pg_broadcast(self.raw(), tensor.as_mut_ptr(), root, &mut out, &mut err) };
        status(code, err)?;
        WorkHandle::from_raw(out)
    }

    pub(crate) fn barrier(&self) -> FfiResult<WorkHandle> {
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle; valid out-pointers.
        let code = unsafe { vlm_pg_barrier(self.raw(), &mut out, &mut err) };
        status(code, err)?;
        WorkHandle::from_raw(out)
    }

    /// The collective that failed inside C++ (in a backward pass or the
    /// reducer), if one has.
    pub(crate) fn failed_in_cpp(&self) -> Option<crate::Op> {
        // SAFETY: live handle; the shim only loads an atomic.
        op_of_code(unsafe { vlm_pg_failed_op(self.raw()) })
    }

    /// A handle on the group's collective counters.
    pub(crate) fn activity(&self) -> ActivityHandle {
        // SAFETY: live handle; the shim returns a new box that we own.
        let raw = unsafe { vlm_pg_activity(self.raw()) };
        ActivityHandle(NonNull::new(raw).expect("the shim returned a null activity"))
    }

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

/// An owned `std::shared_ptr<Activity>` (csrc/c10d_shim.cpp): a group's
/// collective counters, valid after the group is gone.
pub(crate) struct ActivityHandle(NonNull<RawActivity>);

// SAFETY: the C++ `Activity` holds only atomics, and the handle is only
// freed by `Drop`.
unsafe impl Send for ActivityHandle {}
// SAFETY: see `Send` above.
unsafe impl Sync for ActivityHandle {}

/// One reading of a group's `Activity`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ActivityReading {
    pub(crate) entered: u64,
    pub(crate) last_op: Option<crate::Op>,
    pub(crate) last_ms: u64,
    pub(crate) waiting: u64,
    pub(crate) waiting_op: Option<crate::Op>,
    pub(crate) waiting_ms: u64,
}

impl ActivityHandle {
    pub(crate) fn read(&self) -> ActivityReading {
        let mut out = [0i64; 6];
        // SAFETY: live handle; `out` has the 6 slots the shim writes.
        unsafe { vlm_activity_read(self.0.as_ptr(), out.as_mut_ptr()) };
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        ActivityReading {
            entered: u(out[0]),
            last_op: op_of_code(out[1] as i32),
            last_ms: u(out[2]),
            waiting: u(out[3]),
            waiting_op: op_of_code(out[4] as i32),
            waiting_ms: u(out[5]),
        }
    }
}

impl Drop for ActivityHandle {
    fn drop(&mut self) {
        // SAFETY: we own the box and free it once.
        unsafe { vlm_activity_free(self.0.as_ptr()) }
    }
}

/// An owned `c10::intrusive_ptr<c10d::Work>`: one collective in flight.
pub(crate) struct WorkHandle(NonNull<RawWork>);

// SAFETY: c10d::Work guards its state with its own mutex and condition
// variable; waiting on it from another thread than the one that started it
// is what PyTorch's reducer does.
unsafe impl Send for WorkHandle {}

impl WorkHandle {
    fn from_raw(out: *mut RawWork) -> FfiResult<Self> {
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

/// An owned C++ `Reducer` (csrc/c10d_shim.cpp): flat buckets and, once
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
