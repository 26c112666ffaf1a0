//! What a process group has done, for the heartbeats: the shim's
//! `vlm_activity_*` and `vlm_pg_failed_op` (csrc/health.cpp).

use super::group::RawPg;
use super::*;

#[repr(C)]
pub(crate) struct RawActivity {
    _opaque: [u8; 0],
}

extern "C" {
    fn vlm_pg_failed_op(pg: *mut RawPg) -> i32;
    fn vlm_pg_activity(pg: *mut RawPg) -> *mut RawActivity;
    fn vlm_activity_read(a: *mut RawActivity, out: *mut i64);
    fn vlm_activity_free(a: *mut RawActivity);
}

impl PgHandle {
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
}

/// An owned `std::shared_ptr<Activity>` (csrc/shim.h): a group's
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
