//! Dynamic plugins: negative samplers in a shared library (`cdylib`) loaded
//! at run time from `plugins.paths`, without rebuilding vlmatch.
//!
//! Rust has no stable ABI, so nothing Rust-specific crosses the boundary.
//! The library exports one `extern "C"` function, [`ENTRY_SYMBOL`], returning
//! a `#[repr(C)]` [`PluginTable`]: an ABI version, the rustc, vlmatch and tch
//! versions it was built with, and C-ABI vtables of the samplers it provides.
//! The loader checks every field before calling anything else and refuses a
//! mismatch with both sides' versions. Samplers exchange C strings only
//! (captions in, negative captions out), which the host tokenises. The
//! library stays loaded for the life of the process.
//!
//! A plugin crate writes its samplers against [`TextSampler`] and exports
//! them with [`crate::export_dynamic_samplers!`].
//!
//! The boundary's contract (ABI 2): nothing unwinds across it. Every
//! function the library exports catches its panics
//! (`std::panic::catch_unwind`, [`catch_panics`]) and returns them as an
//! error string, which the host reports naming the sampler, the call and
//! the library; throwing a C++ exception across it is forbidden (a library
//! with C++ inside catches its exceptions before returning). Function
//! pointers read from the table are `Option`s, checked when the library is
//! loaded, so a null one is an error naming the sampler and the function;
//! a null table or sampler array likewise. The file opened is the canonical
//! path of the file checked.

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use vlmatch_core::{Error, Result};

/// Bumped whenever [`PluginTable`] or [`SamplerVTable`] change. 2: every
/// callback is fallible (a caught panic or a failure comes back as an
/// error string) and every function pointer may be null and is checked.
pub const ABI_VERSION: u32 = 2;
pub const RUSTC_VERSION: &str = env!("BUILD_RUSTC_VERSION");
pub const VLMATCH_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const TCH_VERSION: &str = "0.24.0";
/// The symbol every dynamic plugin exports.
pub const ENTRY_SYMBOL: &[u8] = b"vlmatch_plugin_table";

/// What [`ENTRY_SYMBOL`] returns. `abi_version` comes first so that it can
/// be read whatever the rest of the layout is.
#[repr(C)]
pub struct PluginTable {
    pub abi_version: u32,
    pub rustc_version: *const c_char,
    pub vlmatch_version: *const c_char,
    pub tch_version: *const c_char,
    pub n_samplers: usize,
    pub samplers: *const SamplerVTable,
}

/// `create`: build from the sampler's config section as JSON; on failure
/// return null and set `*error` to a message (freed with `free_string`).
pub type CreateFn =
    unsafe extern "C" fn(config_json: *const c_char, error: *mut *mut c_char) -> *mut c_void;
/// `sample`: for `n` captions write `out[i]`, a negative caption or null
/// for none; `seed` makes the draw reproducible. Returns null, or an error
/// message (freed with `free_string`) when it failed.
pub type SampleFn = unsafe extern "C" fn(
    state: *mut c_void,
    captions: *const *const c_char,
    n: usize,
    seed: u64,
    out: *mut *mut c_char,
) -> *mut c_char;
/// `free_string`: free a string the library handed out; 0, or non-zero
/// when it failed (panicked).
pub type FreeStringFn = unsafe extern "C" fn(*mut c_char) -> u32;
/// `destroy`: free a state from `create`; null, or an error message.
pub type DestroyFn = unsafe extern "C" fn(*mut c_void) -> *mut c_char;

/// One negative sampler, as C functions. Each function is `Option` (a null
/// pointer is `None`): the loader refuses a library with a null one. No
/// function may unwind or throw across the boundary: a Rust panic or a C++
/// exception is caught in the library and returned as an error
/// ([`export_dynamic_samplers!`](crate::export_dynamic_samplers) does it).
#[repr(C)]
pub struct SamplerVTable {
    pub name: *const c_char,
    pub create: Option<CreateFn>,
    pub sample: Option<SampleFn>,
    pub free_string: Option<FreeStringFn>,
    pub destroy: Option<DestroyFn>,
}

// SAFETY: the tables are immutable data of the library, written once when
// built and only read afterwards; their pointers are to static strings and
// functions, so sharing or moving them across threads is sound.
unsafe impl Sync for PluginTable {}
unsafe impl Send for PluginTable {}
unsafe impl Sync for SamplerVTable {}
unsafe impl Send for SamplerVTable {}

/// A text-level negative sampler, the plugin side's Rust interface.
pub trait TextSampler: Sized {
    /// From the sampler's `[samplers.<name>]` section, as JSON.
    fn from_config(json: &str) -> std::result::Result<Self, String>;
    /// A negative for `caption`, or `None`. Draw randomness from `seed`.
    fn negative(&mut self, caption: &str, seed: u64) -> Option<String>;
}

/// A sampler found in a loaded library, its functions checked non-null.
pub struct DynamicSampler {
    /// The sampler's name, as the library gives it.
    pub name: String,
    /// The canonical path of the library.
    pub library: String,
    create: CreateFn,
    sample: SampleFn,
    free_string: FreeStringFn,
    destroy: DestroyFn,
}

impl DynamicSampler {
    /// An error of call `call` of this sampler: names the sampler, the
    /// call and the library.
    fn failed(&self, call: &str, message: &str) -> Error {
        Error::plugin(
            &self.name,
            format!("`{call}` failed in library {}: {message}", self.library),
        )
    }

    /// Take a string the library handed out: its text, freed by the library.
    ///
    /// # Safety
    /// `p` is non-null and a NUL-terminated string from this library's
    /// `create`, `sample` or `destroy`, not yet freed.
    unsafe fn take_string(&self, p: *mut c_char) -> Result<String> {
        // SAFETY: as the caller promises.
        let text = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
        // SAFETY: `p` came from this library and is freed once, here.
        if unsafe { (self.free_string)(p) } != 0 {
            return Err(self.failed("free_string", "it panicked"));
        }
        Ok(text)
    }
}

/// A live sampler instance behind the C ABI.
pub struct DynamicSamplerInstance {
    spec: &'static DynamicSampler,
    state: *mut c_void,
}

impl DynamicSamplerInstance {
    pub fn new(spec: &'static DynamicSampler, config_json: &str, name: &str) -> Result<Self> {
        let json = CString::new(config_json).map_err(|e| Error::plugin(name, e.to_string()))?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: a NUL-terminated string and a valid out-pointer, as the
        // ABI asks; the library catches its panics.
        let state = unsafe { (spec.create)(json.as_ptr(), &mut error) };
        if state.is_null() {
            let message = if error.is_null() {
                "the library could not create the sampler".to_string()
            } else {
                // SAFETY: the plugin wrote a NUL-terminated string it owns.
                unsafe { spec.take_string(error)? }
            };
            return Err(spec.failed("create", &message));
        }
        Ok(DynamicSamplerInstance { spec, state })
    }

    /// One optional negative per caption.
    pub fn negatives(&self, captions: &[String], seed: u64) -> Result<Vec<Option<String>>> {
        let owned: Vec<CString> = captions
            .iter()
            .map(|c| CString::new(c.replace('\0', " ")).expect("NULs replaced"))
            .collect();
        let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let mut out: Vec<*mut c_char> = vec![std::ptr::null_mut(); captions.len()];
        // SAFETY: `state` came from this library's `create`; both arrays hold
        // `captions.len()` entries; the library catches its panics.
        let error = unsafe {
            (self.spec.sample)(
                self.state,
                ptrs.as_ptr(),
                ptrs.len(),
                seed,
                out.as_mut_ptr(),
            )
        };
        // Take every string written, also on failure, so none leaks.
        let taken: Vec<Result<Option<String>>> = out
            .into_iter()
            .map(|p| {
                // SAFETY: a non-null entry is a string from the plugin.
                (!p.is_null())
                    .then(|| unsafe { self.spec.take_string(p) })
                    .transpose()
            })
            .collect();
        if !error.is_null() {
            // SAFETY: a non-null return is an error string from the plugin.
            let message = unsafe { self.spec.take_string(error)? };
            return Err(self.spec.failed("sample", &message));
        }
        taken.into_iter().collect()
    }
}

/// A dynamic sampler as a [`vlmatch_core::NegativeSampler`]: the batch's
/// captions go to the library, its negatives come back as text and are
/// tokenised here. Each caption goes with its own seed, keyed by its sample
/// (`Forward::random_keys`), so runs stay reproducible and a caption's
/// negative does not depend on how the batch is split over ranks.
pub struct HostSampler {
    instance: DynamicSamplerInstance,
    codec: std::rc::Rc<dyn vlmatch_core::TextCodec>,
}

impl HostSampler {
    pub fn new(
        instance: DynamicSamplerInstance,
        codec: std::rc::Rc<dyn vlmatch_core::TextCodec>,
    ) -> Self {
        HostSampler { instance, codec }
    }
}

impl vlmatch_core::NegativeSampler for HostSampler {
    fn sample(
        &self,
        input: &vlmatch_core::SamplerInput<'_, '_>,
    ) -> Result<vlmatch_core::Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        let seeds = Vec::<i64>::try_from(input.forward.random_keys().to_device(tch::Device::Cpu))?;
        let (mut index, mut texts) = (Vec::new(), Vec::new());
        for (i, (caption, seed)) in batch.captions.iter().zip(seeds).enumerate() {
            let negative = self
                .instance
                .negatives(std::slice::from_ref(caption), seed as u64)?
                .pop()
                .flatten();
            if let Some(negative) = negative {
                index.push(i as i64);
                texts.push(negative);
            }
        }
        Ok(vlmatch_core::Negatives::from_texts(
            self.codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

impl Drop for DynamicSamplerInstance {
    fn drop(&mut self) {
        // SAFETY: `state` came from `create` and is destroyed once, here.
        let error = unsafe { (self.spec.destroy)(self.state) };
        if !error.is_null() {
            // Drop cannot fail: the failure is reported, not returned.
            // SAFETY: a non-null return is an error string from the plugin.
            let message = unsafe { self.spec.take_string(error) }.unwrap_or_else(|e| e.to_string());
            tracing::error!("{}", self.spec.failed("destroy", &message));
        }
    }
}

fn c_str(p: *const c_char, what: &str, path: &Path) -> Result<String> {
    if p.is_null() {
        return Err(refuse(path, format!("its {what} is missing")));
    }
    // SAFETY: checked non-null; the table's strings are static C strings.
    Ok(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn refuse(path: &Path, why: String) -> Error {
    Error::Config(format!("plugin library {}: {why}", path.display()))
}

/// The functions of `vtable`, each checked non-null: a null one refuses the
/// library, naming the sampler and the function.
fn checked(vtable: &SamplerVTable, name: String, path: &Path) -> Result<DynamicSampler> {
    let null = |what: &str| {
        refuse(
            path,
            format!("sampler `{name}`: its `{what}` function is null"),
        )
    };
    Ok(DynamicSampler {
        create: vtable.create.ok_or_else(|| null("create"))?,
        sample: vtable.sample.ok_or_else(|| null("sample"))?,
        free_string: vtable.free_string.ok_or_else(|| null("free_string"))?,
        destroy: vtable.destroy.ok_or_else(|| null("destroy"))?,
        library: path.display().to_string(),
        name,
    })
}

/// Load the dynamic plugin library at `path` (never unloaded), check its
/// table, and hand each sampler it provides, in order, to `register` (an
/// error from it refuses the library with that message); the samplers'
/// names. `Registry::load_library` registers them.
///
/// The file opened is `path` made canonical (absolute, links resolved): the
/// file that was checked, never one the dynamic loader would find on its
/// search path under the same name.
pub(crate) fn load(
    path: &Path,
    mut register: impl FnMut(String, &'static DynamicSampler) -> std::result::Result<(), String>,
) -> Result<Vec<String>> {
    let canonical = path
        .canonicalize()
        .ok()
        .filter(|p| p.is_file())
        .ok_or_else(|| refuse(path, "no such file (check `plugins.paths`)".into()))?;
    // SAFETY: loading runs the library's initialisers; this is the
    // documented risk of dynamic plugins, which the handshake below then
    // narrows to libraries built for this vlmatch.
    let library = unsafe { libloading::Library::new(&canonical) }
        .map_err(|e| refuse(path, format!("cannot load it as a shared library: {e}")))?;
    let path = canonical.as_path();
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol's type is fixed by the ABI; absent symbols are an error.
    let entry: libloading::Symbol<'static, unsafe extern "C" fn() -> *const PluginTable> = unsafe {
        library.get(ENTRY_SYMBOL)
    }
    .map_err(|_| {
        refuse(
            path,
            format!(
                "no `{}` symbol: not a vlmatch plugin (export one with vlmatch_registry::export_dynamic_samplers!)",
                String::from_utf8_lossy(ENTRY_SYMBOL)
            ),
        )
    })?;
    // SAFETY: the entry takes nothing and returns a pointer; a library made
    // with export_dynamic_samplers! catches its own panics (then: null).
    let table = unsafe { entry() };
    if table.is_null() {
        return Err(refuse(
            path,
            format!(
                "its plugin table is null (`{}` returned none, or failed)",
                String::from_utf8_lossy(ENTRY_SYMBOL)
            ),
        ));
    }
    // SAFETY: non-null, and the first field is a u32 in every ABI version.
    let abi = unsafe { (*table).abi_version };
    if abi != ABI_VERSION {
        return Err(refuse(
            path,
            format!("built for plugin ABI {abi}, this vlmatch speaks ABI {ABI_VERSION}; rebuild the plugin"),
        ));
    }
    // SAFETY: same ABI version, so the layout is ours.
    let table: &'static PluginTable = unsafe { &*table };
    for (what, theirs, ours) in [
        (
            "rustc",
            c_str(table.rustc_version, "rustc version", path)?,
            RUSTC_VERSION,
        ),
        (
            "vlmatch",
            c_str(table.vlmatch_version, "vlmatch version", path)?,
            VLMATCH_VERSION,
        ),
        (
            "tch",
            c_str(table.tch_version, "tch version", path)?,
            TCH_VERSION,
        ),
    ] {
        if theirs != ours {
            return Err(refuse(
                path,
                format!("built with {what} `{theirs}`, but this vlmatch uses {what} `{ours}`; rebuild the plugin against it"),
            ));
        }
    }
    let samplers: &'static [SamplerVTable] = match (table.n_samplers, table.samplers.is_null()) {
        (0, _) => &[],
        (n, true) => {
            return Err(refuse(
                path,
                format!("its table promises {n} samplers but their array is null"),
            ))
        }
        // SAFETY: the table promises `n_samplers` vtables at `samplers`.
        (n, false) => unsafe { std::slice::from_raw_parts(table.samplers, n) },
    };
    let mut checked_samplers = Vec::new();
    for vtable in samplers {
        let name = c_str(vtable.name, "sampler name", path)?;
        checked_samplers.push(checked(vtable, name, path)?);
    }
    let mut names = Vec::new();
    for sampler in checked_samplers {
        let name = sampler.name.clone();
        let spec: &'static DynamicSampler = Box::leak(Box::new(sampler));
        register(name.clone(), spec).map_err(|e| refuse(path, e))?;
        names.push(name);
    }
    Ok(names)
}

/// The plugin side of the boundary, used by
/// [`export_dynamic_samplers!`](crate::export_dynamic_samplers): run a
/// callback's body with its panics caught, so that none unwinds into the
/// host; a panic becomes `Err("panicked: <message>")`.
pub fn catch_panics<T>(
    body: impl FnOnce() -> std::result::Result<T, String>,
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(result) => result,
        Err(payload) => {
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            Err(format!("panicked: {message}"))
        }
    }
}

/// A message as a C string the host frees with `free_string`.
pub fn error_string(message: &str) -> *mut c_char {
    CString::new(message.replace('\0', " "))
        .expect("NULs replaced")
        .into_raw()
}

/// Export [`TextSampler`] types from a `cdylib` as a vlmatch plugin:
///
/// ```text
/// vlmatch_registry::export_dynamic_samplers!("color_flip" => ColorFlip);
/// ```
///
/// The `@table VERSION, ABI; ...` form sets the reported vlmatch version and
/// ABI by hand; it exists to test that the loader refuses a mismatch.
#[macro_export]
macro_rules! export_dynamic_samplers {
    ($($name:literal => $ty:ty),+ $(,)?) => {
        $crate::export_dynamic_samplers!(@table
            $crate::dynamic::VLMATCH_VERSION, $crate::dynamic::ABI_VERSION; $($name => $ty),+);
    };
    (@table $version:expr, $abi:expr; $($name:literal => $ty:ty),+) => {
        mod __vlmatch_dynamic {
            use super::*;
            use std::ffi::{c_char, c_void, CStr, CString};
            use $crate::dynamic::{catch_panics, error_string, PluginTable, SamplerVTable, TextSampler};

            fn cstr(s: &str) -> *const c_char {
                Box::leak(CString::new(s).expect("no NUL").into_boxed_c_str()).as_ptr()
            }
            unsafe extern "C" fn free_string(p: *mut c_char) -> u32 {
                let freed = catch_panics(|| {
                    if !p.is_null() {
                        // SAFETY: every string we hand out comes from CString::into_raw.
                        drop(unsafe { CString::from_raw(p) });
                    }
                    Ok(())
                });
                u32::from(freed.is_err())
            }

            static TABLE: std::sync::OnceLock<PluginTable> = std::sync::OnceLock::new();
            static VTABLES: std::sync::OnceLock<Vec<SamplerVTable>> = std::sync::OnceLock::new();

            /// The plugin table; null if building it panicked.
            #[no_mangle]
            pub unsafe extern "C" fn vlmatch_plugin_table() -> *const PluginTable {
                catch_panics(|| {
                    let vtables = VTABLES.get_or_init(|| vec![$(vtable_for::<$ty>($name)),+]);
                    Ok(TABLE.get_or_init(|| PluginTable {
                        abi_version: $abi,
                        rustc_version: cstr($crate::dynamic::RUSTC_VERSION),
                        vlmatch_version: cstr($version),
                        tch_version: cstr($crate::dynamic::TCH_VERSION),
                        n_samplers: vtables.len(),
                        samplers: vtables.as_ptr(),
                    }) as *const PluginTable)
                })
                .unwrap_or(std::ptr::null())
            }

            fn vtable_for<T: TextSampler>(name: &str) -> SamplerVTable {
                unsafe extern "C" fn create<T: TextSampler>(json: *const c_char, error: *mut *mut c_char) -> *mut c_void {
                    let made = catch_panics(|| {
                        if json.is_null() {
                            return Err("no config given".to_string());
                        }
                        // SAFETY: the host passes a NUL-terminated string.
                        let json = unsafe { CStr::from_ptr(json) }.to_string_lossy();
                        T::from_config(&json)
                    });
                    match made {
                        Ok(s) => Box::into_raw(Box::new(s)) as *mut c_void,
                        Err(e) => {
                            if !error.is_null() {
                                // SAFETY: the host passes a valid out-pointer.
                                unsafe { *error = error_string(&e) };
                            }
                            std::ptr::null_mut()
                        }
                    }
                }
                unsafe extern "C" fn sample<T: TextSampler>(
                    state: *mut c_void,
                    captions: *const *const c_char,
                    n: usize,
                    seed: u64,
                    out: *mut *mut c_char,
                ) -> *mut c_char {
                    let done = catch_panics(|| {
                        if state.is_null() || (n > 0 && (captions.is_null() || out.is_null())) {
                            return Err("null state or arrays".to_string());
                        }
                        // SAFETY: `state` came from `create::<T>`; the arrays hold `n` entries.
                        let sampler = unsafe { &mut *(state as *mut T) };
                        for i in 0..n {
                            // SAFETY: entry `i < n` of the host's array.
                            let caption = unsafe { CStr::from_ptr(*captions.add(i)) }.to_string_lossy();
                            let neg = sampler.negative(&caption, seed.wrapping_add(i as u64));
                            let p = neg
                                .and_then(|s| CString::new(s).ok())
                                .map(CString::into_raw)
                                .unwrap_or(std::ptr::null_mut());
                            // SAFETY: entry `i < n` of the host's out-array.
                            unsafe { *out.add(i) = p };
                        }
                        Ok(())
                    });
                    match done {
                        Ok(()) => std::ptr::null_mut(),
                        Err(e) => error_string(&e),
                    }
                }
                unsafe extern "C" fn destroy<T: TextSampler>(state: *mut c_void) -> *mut c_char {
                    let done = catch_panics(|| {
                        if !state.is_null() {
                            // SAFETY: `state` came from `create::<T>` and is destroyed once.
                            drop(unsafe { Box::from_raw(state as *mut T) });
                        }
                        Ok(())
                    });
                    match done {
                        Ok(()) => std::ptr::null_mut(),
                        Err(e) => error_string(&e),
                    }
                }
                SamplerVTable {
                    name: cstr(name),
                    create: Some(create::<T>),
                    sample: Some(sample::<T>),
                    free_string: Some(free_string),
                    destroy: Some(destroy::<T>),
                }
            }
        }
    };
}
