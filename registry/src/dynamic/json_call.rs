//! One shape of call for the boundary's many-method interfaces (checkpoint
//! layouts, hooks): a JSON request with tensors lent beside it, answered by
//! JSON and tensors handed to a [`TensorSink`]. [`send`] is the host's
//! side, [`answer`] the library's; each method is one variant of a request
//! enum both sides share, so a new method needs no new C function.

use super::abi::{
    borrow, error_string, free_host_string, lend, status, text, FreeStringFn, TensorHandle,
    TensorSink,
};
use super::view::host_result;
use serde_json::Value;
use std::cell::RefCell;
use std::ffi::{c_char, c_void, CString};
use tch::Tensor;

/// The library's entry for one call: request, `n` lent tensors, the sink,
/// the out-pointer of the answer; null or a library error string.
pub(crate) type RawCall<'a> = dyn FnOnce(
        *const c_char,
        usize,
        *const TensorHandle,
        *const TensorSink,
        *mut *mut c_char,
    ) -> *mut c_char
    + 'a;

unsafe extern "C" fn sink_push(ctx: *mut c_void, tensor: TensorHandle) -> *mut c_char {
    status(|| {
        if tensor.is_null() {
            return Err("a null tensor".into());
        }
        // SAFETY: `ctx` is the list `send` lends; the handle is lent.
        let list = unsafe { &*(ctx as *const RefCell<Vec<Tensor>>) };
        list.borrow_mut().push(unsafe { borrow(tensor) });
        Ok(())
    })
}

/// The host's side: send `request` (JSON) with `tensors` lent through
/// `call`; the library's answer (`Value::Null` when it wrote none) and the
/// tensors it handed over, or its error message.
pub(crate) fn send(
    call: Box<RawCall<'_>>,
    free_string: FreeStringFn,
    request: &impl serde::Serialize,
    tensors: &[&Tensor],
) -> Result<(Value, Vec<Tensor>), String> {
    let json = serde_json::to_string(request).map_err(|e| e.to_string())?;
    let json = CString::new(json).map_err(|e| e.to_string())?;
    let handles: Vec<TensorHandle> = tensors.iter().map(|t| lend(t)).collect();
    let received = RefCell::new(Vec::new());
    let sink = TensorSink {
        ctx: &received as *const RefCell<Vec<Tensor>> as *mut c_void,
        push: Some(sink_push),
        free_string: Some(free_host_string),
    };
    let mut out: *mut c_char = std::ptr::null_mut();
    let error = call(
        json.as_ptr(),
        handles.len(),
        handles.as_ptr(),
        &sink,
        &mut out,
    );
    let free = |p: *mut c_char| {
        // SAFETY: a library string or null, freed once, here.
        let t = unsafe { text(p) };
        if !p.is_null() {
            unsafe { free_string(p) };
        }
        t
    };
    if let Some(message) = free(error) {
        free(out);
        return Err(message);
    }
    let answer = match free(out) {
        None => Value::Null,
        Some(a) => serde_json::from_str(&a).map_err(|e| format!("a bad answer: {e}"))?,
    };
    Ok((answer, received.into_inner()))
}

/// The library's side of one call: read the request as `R`, borrow the
/// `n` lent tensors, run `body`, and hand its tensors to the sink and its
/// answer (unless null) to `out_json`; panics caught.
///
/// # Safety
/// The pointers are the host's, as [`send`] passes them.
pub(crate) unsafe fn answer<R: serde::de::DeserializeOwned>(
    request: *const c_char,
    n: usize,
    tensors: *const TensorHandle,
    sink: *const TensorSink,
    out_json: *mut *mut c_char,
    body: impl FnOnce(R, Vec<Tensor>) -> Result<(Value, Vec<Tensor>), String>,
) -> *mut c_char {
    status(|| {
        // SAFETY: as the caller promises.
        let request = unsafe { text(request) }.ok_or("no request")?;
        let request: R = serde_json::from_str(&request).map_err(|e| format!("bad request: {e}"))?;
        if n > 0 && tensors.is_null() {
            return Err("a null tensor array".into());
        }
        let mut lent = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: `n` handles, as the caller promises.
            let h = unsafe { *tensors.add(i) };
            if h.is_null() {
                return Err(format!("tensor {i} of the call is null"));
            }
            lent.push(unsafe { borrow(h) });
        }
        let sink = unsafe { sink.as_ref() }.ok_or("no sink")?;
        let (answer, out) = body(request, lent)?;
        let push = sink.push.ok_or("the host's `push` is null")?;
        for t in &out {
            // SAFETY: the host's function with its context; `t` lent.
            let error = unsafe { push(sink.ctx, lend(t)) };
            host_result(error, sink.free_string)?;
        }
        if !answer.is_null() {
            if out_json.is_null() {
                return Err("no out-pointer".into());
            }
            // SAFETY: a valid out-pointer.
            unsafe { *out_json = error_string(&answer.to_string()) };
        }
        Ok(())
    })
}
