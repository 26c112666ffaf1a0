//! The only module with `unsafe`: the C ABI of the C++ shim over c10d
//! (`csrc/*.cpp`) and owning wrappers around its handle types. One submodule
//! per file of the shim, each with its own `extern` block: `store`
//! (csrc/store.cpp), `group` (process groups and their work,
//! csrc/group.cpp), `autograd` (csrc/autograd.cpp), `reducer`
//! (csrc/reducer.cpp), `health` (csrc/health.cpp), `checkpoint`
//! (csrc/checkpoint.cpp); this root holds what they
//! share (csrc/shim.h): status and operation codes, and error messages.
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

/// The shim's `VLM_OP_*` codes (`PgState::failed_op`, `Activity`).
const OP_ALLREDUCE: i32 = 1;
const OP_ALLGATHER: i32 = 2;
const OP_BROADCAST: i32 = 3;
const OP_BARRIER: i32 = 4;
const OP_REDUCESCATTER: i32 = 5;

fn op_of_code(code: i32) -> Option<crate::Op> {
    match code {
        OP_ALLREDUCE => Some(crate::Op::AllReduce),
        OP_ALLGATHER => Some(crate::Op::AllGather),
        OP_BROADCAST => Some(crate::Op::Broadcast),
        OP_BARRIER => Some(crate::Op::Barrier),
        OP_REDUCESCATTER => Some(crate::Op::ReduceScatter),
        _ => None,
    }
}

extern "C" {
    fn vlm_string_free(s: *mut c_char);
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

mod autograd;
mod checkpoint;
mod group;
mod health;
mod reducer;
mod store;

pub(crate) use autograd::set_grad;
pub(crate) use checkpoint::checkpoint;
pub(crate) use group::{has_nccl, PgHandle, RawBackend, WorkHandle};
pub(crate) use health::ActivityHandle;
pub(crate) use reducer::ReducerHandle;
pub(crate) use store::StoreHandle;
