//! The owned TCPStore handle: the shim's `vlm_store_*` functions.

use super::*;

#[repr(C)]
pub(crate) struct RawStore {
    _opaque: [u8; 0],
}

extern "C" {
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
    fn vlm_bytes_free(b: *mut u8);
}

/// An owned `c10::intrusive_ptr<c10d::Store>` (a TCPStore).
pub(crate) struct StoreHandle(pub(super) NonNull<RawStore>);

// SAFETY: c10d::TCPStore serialises every client operation behind its own
// mutex (`activeOpLock_`), and the handle is only freed by `Drop`, so it can
// be used from any thread and shared between threads.
unsafe impl Send for StoreHandle {}
// SAFETY: see `Send` above.
unsafe impl Sync for StoreHandle {}

impl StoreHandle {
    pub(crate) fn tcp(
        host: &str,
        port: u16,
        world_size: i32,
        is_master: bool,
        timeout: Duration,
    ) -> FfiResult<Self> {
        let host = c_string("host", host)?;
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: `host` is a valid C string for the call; `out` and `err`
        // are valid out-pointers; the shim writes `out` only on success.
        let code = unsafe {
            vlm_store_tcp_new(
                host.as_ptr(),
                port,
                world_size,
                i32::from(is_master),
                millis(timeout),
                &mut out,
                &mut err,
            )
        };
        status(code, err)?;
        NonNull::new(out)
            .map(StoreHandle)
            .ok_or_else(|| Failure::Error("the shim returned a null store".into()))
    }

    /// Another client connection to the store served at `host:port`.
    pub(crate) fn tcp_client(host: &str, port: u16, timeout: Duration) -> FfiResult<Self> {
        let host = c_string("host", host)?;
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: as in `tcp`.
        let code = unsafe {
            vlm_store_tcp_client(host.as_ptr(), port, millis(timeout), &mut out, &mut err)
        };
        status(code, err)?;
        NonNull::new(out)
            .map(StoreHandle)
            .ok_or_else(|| Failure::Error("the shim returned a null store".into()))
    }

    /// The same store (and connection) with every key under `prefix/`.
    pub(crate) fn prefixed(&self, prefix: &str) -> FfiResult<Self> {
        let prefix = c_string("store prefix", prefix)?;
        let mut out = ptr::null_mut();
        let mut err = ptr::null_mut();
        // SAFETY: live handle (the new one takes its own reference to the
        // store); valid C string and out-pointers.
        let code =
            unsafe { vlm_store_prefixed(self.0.as_ptr(), prefix.as_ptr(), &mut out, &mut err) };
        status(code, err)?;
        NonNull::new(out)
            .map(StoreHandle)
            .ok_or_else(|| Failure::Error("the shim returned a null store".into()))
    }

    pub(crate) fn set(&self, key: &str, value: &[u8]) -> FfiResult<()> {
        let key = c_string("key", key)?;
        let mut err = ptr::null_mut();
        // SAFETY: the handle is live (owned by self); `key` and `value` are
        // valid for the call; the shim copies them.
        let code = unsafe {
            vlm_store_set(
                self.0.as_ptr(),
                key.as_ptr(),
                value.as_ptr(),
                value.len(),
                &mut err,
            )
        };
        status(code, err)
    }

    pub(crate) fn get(&self, key: &str, timeout: Duration) -> FfiResult<Vec<u8>> {
        let key = c_string("key", key)?;
        let mut data = ptr::null_mut();
        let mut len = 0usize;
        let mut err = ptr::null_mut();
        // SAFETY: live handle, valid C string and out-pointers. On success
        // the shim stores a malloc'd buffer of `len` bytes in `data`.
        let code = unsafe {
            vlm_store_get(
                self.0.as_ptr(),
                key.as_ptr(),
                millis(timeout),
                &mut data,
                &mut len,
                &mut err,
            )
        };
        status(code, err)?;
        if data.is_null() {
            return Err(Failure::Error("the shim returned no buffer".into()));
        }
        // SAFETY: `data` points to `len` initialised bytes that we own; we
        // copy them out and free the buffer exactly once.
        let bytes = unsafe {
            let bytes = std::slice::from_raw_parts(data, len).to_vec();
            vlm_bytes_free(data);
            bytes
        };
        Ok(bytes)
    }

    pub(crate) fn add(&self, key: &str, delta: i64) -> FfiResult<i64> {
        let key = c_string("key", key)?;
        let mut out = 0i64;
        let mut err = ptr::null_mut();
        // SAFETY: live handle, valid C string and out-pointers.
        let code =
            unsafe { vlm_store_add(self.0.as_ptr(), key.as_ptr(), delta, &mut out, &mut err) };
        status(code, err)?;
        Ok(out)
    }

    pub(crate) fn wait(&self, keys: &[&str], timeout: Duration) -> FfiResult<()> {
        let owned = keys
            .iter()
            .map(|k| c_string("key", k))
            .collect::<FfiResult<Vec<_>>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        let mut err = ptr::null_mut();
        // SAFETY: live handle; `ptrs` holds `ptrs.len()` valid C strings
        // (kept alive by `owned`) for the duration of the call.
        let code = unsafe {
            vlm_store_wait(
                self.0.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
                millis(timeout),
                &mut err,
            )
        };
        status(code, err)
    }

    pub(crate) fn check(&self, keys: &[&str]) -> FfiResult<bool> {
        let owned = keys
            .iter()
            .map(|k| c_string("key", k))
            .collect::<FfiResult<Vec<_>>>()?;
        let ptrs: Vec<*const c_char> = owned.iter().map(|k| k.as_ptr()).collect();
        let mut out = 0i32;
        let mut err = ptr::null_mut();
        // SAFETY: as in `wait`; `out` is a valid out-pointer.
        let code = unsafe {
            vlm_store_check(
                self.0.as_ptr(),
                ptrs.as_ptr(),
                ptrs.len(),
                &mut out,
                &mut err,
            )
        };
        status(code, err)?;
        Ok(out != 0)
    }

    pub(crate) fn delete(&self, key: &str) -> FfiResult<bool> {
        let key = c_string("key", key)?;
        let mut out = 0i32;
        let mut err = ptr::null_mut();
        // SAFETY: live handle, valid C string and out-pointers.
        let code = unsafe { vlm_store_delete(self.0.as_ptr(), key.as_ptr(), &mut out, &mut err) };
        status(code, err)?;
        Ok(out != 0)
    }
}

impl Drop for StoreHandle {
    fn drop(&mut self) {
        // SAFETY: we own the handle and free it once. Process groups built
        // on the store hold their own reference to it on the C++ side.
        unsafe { vlm_store_free(self.0.as_ptr()) }
    }
}
