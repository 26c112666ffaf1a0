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

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;
use vlmatch_core::{Error, Result};

/// Bumped whenever [`PluginTable`] or [`SamplerVTable`] change.
pub const ABI_VERSION: u32 = 1;
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

/// One negative sampler, as C functions.
#[repr(C)]
pub struct SamplerVTable {
    pub name: *const c_char,
    /// Build from the sampler's config section as JSON; on failure return
    /// null and set `*error` to a message (freed with `free_string`).
    pub create: extern "C" fn(config_json: *const c_char, error: *mut *mut c_char) -> *mut c_void,
    /// For `n` captions write `out[i]`: a negative caption, or null for none.
    /// `seed` makes the draw reproducible.
    pub sample: extern "C" fn(
        state: *mut c_void,
        captions: *const *const c_char,
        n: usize,
        seed: u64,
        out: *mut *mut c_char,
    ),
    pub free_string: extern "C" fn(*mut c_char),
    pub destroy: extern "C" fn(*mut c_void),
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

/// A sampler found in a loaded library.
pub struct DynamicSampler {
    pub vtable: &'static SamplerVTable,
    pub library: String,
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
        let state = (spec.vtable.create)(json.as_ptr(), &mut error);
        if state.is_null() {
            let message = if error.is_null() {
                "the library could not create the sampler".to_string()
            } else {
                // SAFETY: the plugin wrote a NUL-terminated string it owns.
                let m = unsafe { CStr::from_ptr(error) }
                    .to_string_lossy()
                    .into_owned();
                (spec.vtable.free_string)(error);
                m
            };
            return Err(Error::plugin(
                name,
                format!("{message} (library {})", spec.library),
            ));
        }
        Ok(DynamicSamplerInstance { spec, state })
    }

    /// One optional negative per caption.
    pub fn negatives(&self, captions: &[String], seed: u64) -> Vec<Option<String>> {
        let owned: Vec<CString> = captions
            .iter()
            .map(|c| CString::new(c.replace('\0', " ")).expect("NULs replaced"))
            .collect();
        let ptrs: Vec<*const c_char> = owned.iter().map(|c| c.as_ptr()).collect();
        let mut out: Vec<*mut c_char> = vec![std::ptr::null_mut(); captions.len()];
        (self.spec.vtable.sample)(
            self.state,
            ptrs.as_ptr(),
            ptrs.len(),
            seed,
            out.as_mut_ptr(),
        );
        out.into_iter()
            .map(|p| {
                (!p.is_null()).then(|| {
                    // SAFETY: a non-null entry is a NUL-terminated string from the plugin.
                    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
                    (self.spec.vtable.free_string)(p);
                    s
                })
            })
            .collect()
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
        let (index, texts): (Vec<i64>, Vec<String>) = batch
            .captions
            .iter()
            .zip(seeds)
            .enumerate()
            .filter_map(|(i, (caption, seed))| {
                let negative = self
                    .instance
                    .negatives(std::slice::from_ref(caption), seed as u64)
                    .pop()??;
                Some((i as i64, negative))
            })
            .unzip();
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
        (self.spec.vtable.destroy)(self.state);
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

/// Load the dynamic plugin library at `path` (never unloaded), check its
/// table, and hand each sampler it provides, in order, to `register` (an
/// error from it refuses the library with that message); the samplers'
/// names. `Registry::load_library` registers them.
pub(crate) fn load(
    path: &Path,
    mut register: impl FnMut(String, &'static DynamicSampler) -> std::result::Result<(), String>,
) -> Result<Vec<String>> {
    if !path.is_file() {
        return Err(refuse(path, "no such file (check `plugins.paths`)".into()));
    }
    // SAFETY: loading runs the library's initialisers; this is the
    // documented risk of dynamic plugins, which the handshake below then
    // narrows to libraries built for this vlmatch.
    let library = unsafe { libloading::Library::new(path) }
        .map_err(|e| refuse(path, format!("cannot load it as a shared library: {e}")))?;
    let library: &'static libloading::Library = Box::leak(Box::new(library));
    // SAFETY: the symbol's type is fixed by the ABI; absent symbols are an error.
    let entry: libloading::Symbol<'static, extern "C" fn() -> *const PluginTable> = unsafe {
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
    let table = entry();
    if table.is_null() {
        return Err(refuse(path, "its plugin table is null".into()));
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
    let samplers: &'static [SamplerVTable] = if table.n_samplers == 0 {
        &[]
    } else {
        // SAFETY: the table promises `n_samplers` vtables at `samplers`.
        unsafe { std::slice::from_raw_parts(table.samplers, table.n_samplers) }
    };
    let mut names = Vec::new();
    for vtable in samplers {
        let name = c_str(vtable.name, "sampler name", path)?;
        let spec: &'static DynamicSampler = Box::leak(Box::new(DynamicSampler {
            vtable,
            library: path.display().to_string(),
        }));
        register(name.clone(), spec).map_err(|e| refuse(path, e))?;
        names.push(name);
    }
    Ok(names)
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
            use $crate::dynamic::{PluginTable, SamplerVTable, TextSampler};

            fn cstr(s: &str) -> *const c_char {
                Box::leak(CString::new(s).expect("no NUL").into_boxed_c_str()).as_ptr()
            }
            extern "C" fn free_string(p: *mut c_char) {
                if !p.is_null() {
                    // SAFETY: every string we hand out comes from CString::into_raw.
                    drop(unsafe { CString::from_raw(p) });
                }
            }

            static TABLE: std::sync::OnceLock<PluginTable> = std::sync::OnceLock::new();
            static VTABLES: std::sync::OnceLock<Vec<SamplerVTable>> = std::sync::OnceLock::new();

            #[no_mangle]
            pub extern "C" fn vlmatch_plugin_table() -> *const PluginTable {
                let vtables = VTABLES.get_or_init(|| vec![$(vtable_for::<$ty>($name)),+]);
                TABLE.get_or_init(|| PluginTable {
                    abi_version: $abi,
                    rustc_version: cstr($crate::dynamic::RUSTC_VERSION),
                    vlmatch_version: cstr($version),
                    tch_version: cstr($crate::dynamic::TCH_VERSION),
                    n_samplers: vtables.len(),
                    samplers: vtables.as_ptr(),
                })
            }

            fn vtable_for<T: TextSampler>(name: &str) -> SamplerVTable {
                extern "C" fn create<T: TextSampler>(json: *const c_char, error: *mut *mut c_char) -> *mut c_void {
                    // SAFETY: the host passes a NUL-terminated string.
                    let json = unsafe { CStr::from_ptr(json) }.to_string_lossy();
                    match T::from_config(&json) {
                        Ok(s) => Box::into_raw(Box::new(s)) as *mut c_void,
                        Err(e) => {
                            // SAFETY: the host passes a valid out-pointer.
                            unsafe { *error = CString::new(e.replace('\0', " ")).unwrap().into_raw() };
                            std::ptr::null_mut()
                        }
                    }
                }
                extern "C" fn sample<T: TextSampler>(
                    state: *mut c_void,
                    captions: *const *const c_char,
                    n: usize,
                    seed: u64,
                    out: *mut *mut c_char,
                ) {
                    // SAFETY: `state` came from `create::<T>`; the arrays hold `n` entries.
                    let sampler = unsafe { &mut *(state as *mut T) };
                    for i in 0..n {
                        let caption = unsafe { CStr::from_ptr(*captions.add(i)) }.to_string_lossy();
                        let neg = sampler.negative(&caption, seed.wrapping_add(i as u64));
                        let p = neg
                            .and_then(|s| CString::new(s).ok())
                            .map(CString::into_raw)
                            .unwrap_or(std::ptr::null_mut());
                        unsafe { *out.add(i) = p };
                    }
                }
                extern "C" fn destroy<T: TextSampler>(state: *mut c_void) {
                    // SAFETY: `state` came from `create::<T>` and is destroyed once.
                    drop(unsafe { Box::from_raw(state as *mut T) });
                }
                SamplerVTable {
                    name: cstr(name),
                    create: create::<T>,
                    sample: sample::<T>,
                    free_string,
                    destroy: destroy::<T>,
                }
            }
        }
    };
}
