//! Opening a plugin library and checking its table: the handshake (ABI,
//! rustc, vlmatch, tch and libtorch versions, each mismatch refused naming
//! both sides), then every vtable's name and functions, before anything
//! of the library is called but its entry.

use super::abi::{
    refuse, text, CreatePluginFn, DestroyFn, DiscriminatorVTable, EncoderVTable, FillCall,
    FreeStringFn, GeneratorVTable, HookAfterObjectivesFn, HookCallFn, HookCreateFn, HookVTable,
    ObjectiveVTable, PluginTable, TensorHandle, ABI_VERSION, ENTRY_SYMBOL, LIBTORCH_VERSION,
    RUSTC_VERSION, TCH_VERSION, VLMATCH_VERSION,
};
use super::layout::{host_layout, HostLayout};
use super::sampler::{checked, DynamicSampler};
use std::ffi::{c_char, c_void};
use std::path::{Path, PathBuf};
use vlmatch_core::Result;

/// An encoder found in a loaded library, its functions checked non-null.
pub struct EncoderSpec {
    pub name: String,
    /// The canonical path of the library.
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: CreatePluginFn,
    pub(crate) forward: unsafe extern "C" fn(
        *mut c_void,
        *const super::abi::EncoderCall,
        *mut super::abi::TensorHandle,
    ) -> *mut c_char,
    pub(crate) word_embeddings:
        unsafe extern "C" fn(*mut c_void, *mut super::abi::TensorHandle) -> *mut c_char,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
    pub(crate) layout: Option<&'static HostLayout>,
}

/// An objective found in a loaded library, its functions checked non-null.
pub struct ObjectiveSpec {
    pub name: String,
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: CreatePluginFn,
    pub(crate) forward:
        unsafe extern "C" fn(*mut c_void, *const super::abi::ForwardHost, i64) -> *mut c_char,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
}

/// A negative sampler (the core trait) found in a loaded library.
pub struct NegativeSamplerSpec {
    pub name: String,
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: CreatePluginFn,
    pub(crate) sample: unsafe extern "C" fn(
        *mut c_void,
        *const super::abi::ForwardHost,
        i64,
        *mut super::abi::NegativesOut,
    ) -> *mut c_char,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
}

/// A generator found in a loaded library, its functions checked non-null.
pub struct GeneratorSpec {
    pub name: String,
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: CreatePluginFn,
    pub(crate) logits: unsafe extern "C" fn(
        *mut c_void,
        TensorHandle,
        TensorHandle,
        u8,
        *mut TensorHandle,
    ) -> *mut c_char,
    pub(crate) fill:
        unsafe extern "C" fn(*mut c_void, *const FillCall, *mut TensorHandle) -> *mut c_char,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
    pub(crate) layout: Option<&'static HostLayout>,
}

/// A discriminator found in a loaded library, its functions checked non-null.
pub struct DiscriminatorSpec {
    pub name: String,
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: CreatePluginFn,
    pub(crate) logits: unsafe extern "C" fn(
        *mut c_void,
        u32,
        TensorHandle,
        TensorHandle,
        *mut TensorHandle,
    ) -> *mut c_char,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
}

/// A hook of a library, checked.
pub struct HookSpec {
    pub name: String,
    pub library: String,
    pub(crate) data: *const c_void,
    pub(crate) create: HookCreateFn,
    pub(crate) call: HookCallFn,
    pub(crate) after_objectives: HookAfterObjectivesFn,
    pub(crate) destroy: DestroyFn,
    pub(crate) free_string: FreeStringFn,
}

// SAFETY: the specs hold pointers to the library's static data and
// functions, which stay loaded for the process and are only read.
unsafe impl Sync for EncoderSpec {}
unsafe impl Send for EncoderSpec {}
unsafe impl Sync for ObjectiveSpec {}
unsafe impl Send for ObjectiveSpec {}
unsafe impl Sync for NegativeSamplerSpec {}
unsafe impl Send for NegativeSamplerSpec {}
unsafe impl Sync for GeneratorSpec {}
unsafe impl Send for GeneratorSpec {}
unsafe impl Sync for DiscriminatorSpec {}
unsafe impl Send for DiscriminatorSpec {}
unsafe impl Sync for HookSpec {}
unsafe impl Send for HookSpec {}

/// What creating a library's plugin needs of its spec (every kind but
/// text samplers).
pub(crate) struct Creation<'a> {
    pub name: &'a str,
    pub library: &'a str,
    pub create: CreatePluginFn,
    pub data: *const c_void,
    pub free_string: FreeStringFn,
}

pub(crate) trait Creatable {
    fn creation(&self) -> Creation<'_>;
}

macro_rules! creatable {
    ($($spec:ty),*) => {$(
        impl Creatable for $spec {
            fn creation(&self) -> Creation<'_> {
                Creation {
                    name: &self.name,
                    library: &self.library,
                    create: self.create,
                    data: self.data,
                    free_string: self.free_string,
                }
            }
        }
    )*};
}

creatable!(
    EncoderSpec,
    ObjectiveSpec,
    NegativeSamplerSpec,
    GeneratorSpec,
    DiscriminatorSpec
);

/// What a library provides, checked.
pub struct Library {
    pub path: PathBuf,
    pub samplers: Vec<&'static DynamicSampler>,
    pub encoders: Vec<&'static EncoderSpec>,
    pub objectives: Vec<&'static ObjectiveSpec>,
    pub negative_samplers: Vec<&'static NegativeSamplerSpec>,
    pub generators: Vec<&'static GeneratorSpec>,
    pub discriminators: Vec<&'static DiscriminatorSpec>,
    pub hooks: Vec<&'static HookSpec>,
}

fn c_str(p: *const c_char, what: &str, path: &Path) -> Result<String> {
    // SAFETY: the table's strings are static C strings, or null.
    unsafe { text(p) }.ok_or_else(|| refuse(path, format!("its {what} is missing")))
}

/// The array of `n` entries at `p`, or an error when it is null.
///
/// # Safety
/// A non-null `p` points to `n` entries that live as long as the library.
unsafe fn array<T>(n: usize, p: *const T, what: &str, path: &Path) -> Result<&'static [T]> {
    match (n, p.is_null()) {
        (0, _) => Ok(&[]),
        (n, true) => Err(refuse(
            path,
            format!("its table promises {n} {what} but their array is null"),
        )),
        // SAFETY: as the caller promises.
        (n, false) => Ok(unsafe { std::slice::from_raw_parts(p, n) }),
    }
}

/// Load the library at `path` (never unloaded) and check its table.
///
/// The file opened is `path` made canonical (absolute, links resolved): the
/// file that was checked, never one the dynamic loader would find on its
/// search path under the same name.
pub(crate) fn load(path: &Path) -> Result<Library> {
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
    let entry: libloading::Symbol<'static, unsafe extern "C" fn() -> *const PluginTable> =
        unsafe { library.get(ENTRY_SYMBOL) }.map_err(|_| {
            refuse(
                path,
                format!(
                    "no `{}` symbol: not a vlmatch plugin (export one with vlmatch_plugin_sdk::export!)",
                    String::from_utf8_lossy(ENTRY_SYMBOL)
                ),
            )
        })?;
    // SAFETY: the entry takes nothing and returns a pointer; a library made
    // with the export macro catches its own panics (then: null).
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
            format!(
                "built for plugin ABI {abi}, but this vlmatch speaks plugin ABI {ABI_VERSION}; \
                 rebuild the plugin against this vlmatch (vlmatch-plugin-sdk)"
            ),
        ));
    }
    // SAFETY: same ABI version, so the layout is ours.
    let table: &'static PluginTable = unsafe { &*table };
    for (what, theirs, ours) in [
        ("rustc", table.rustc_version, RUSTC_VERSION),
        ("vlmatch", table.vlmatch_version, VLMATCH_VERSION),
        ("tch", table.tch_version, TCH_VERSION),
        ("libtorch", table.libtorch_version, LIBTORCH_VERSION),
    ] {
        let theirs = c_str(theirs, &format!("{what} version"), path)?;
        if theirs != ours {
            return Err(refuse(
                path,
                format!("built with {what} `{theirs}`, but this vlmatch uses {what} `{ours}`; rebuild the plugin against it"),
            ));
        }
    }
    // SAFETY (each array): the table promises its entries, static data of
    // the library, which stays loaded.
    let samplers = unsafe { array(table.n_samplers, table.samplers, "samplers", path)? };
    let encoders = unsafe { array(table.n_encoders, table.encoders, "encoders", path)? };
    let objectives = unsafe { array(table.n_objectives, table.objectives, "objectives", path)? };
    let negative_samplers = unsafe {
        array(
            table.n_negative_samplers,
            table.negative_samplers,
            "negative samplers",
            path,
        )?
    };
    let generators = unsafe { array(table.n_generators, table.generators, "generators", path)? };
    let discriminators = unsafe {
        array(
            table.n_discriminators,
            table.discriminators,
            "discriminators",
            path,
        )?
    };
    let hooks = unsafe { array(table.n_hooks, table.hooks, "hooks", path)? };
    let with_state = encoders.len()
        + objectives.len()
        + negative_samplers.len()
        + generators.len()
        + discriminators.len()
        + hooks.len();
    let free_string = match (with_state, table.free_string) {
        (_, Some(f)) => Some(f),
        (0, None) => None,
        (_, None) => {
            return Err(refuse(
                path,
                "its table's `free_string` function is null".into(),
            ))
        }
    };
    let mut out = Library {
        path: canonical.clone(),
        samplers: Vec::new(),
        encoders: Vec::new(),
        objectives: Vec::new(),
        negative_samplers: Vec::new(),
        generators: Vec::new(),
        discriminators: Vec::new(),
        hooks: Vec::new(),
    };
    let library_name = path.display().to_string();
    for vtable in samplers {
        let name = c_str(vtable.name, "sampler name", path)?;
        out.samplers
            .push(Box::leak(Box::new(checked(vtable, name, path)?)));
    }
    for v in encoders {
        out.encoders.push(Box::leak(Box::new(encoder(
            v,
            path,
            &library_name,
            free_string,
        )?)));
    }
    for v in objectives {
        out.objectives.push(Box::leak(Box::new(objective(
            v,
            path,
            &library_name,
            free_string,
        )?)));
    }
    for v in negative_samplers {
        let spec = negative_sampler(v, path, &library_name, free_string)?;
        out.negative_samplers.push(Box::leak(Box::new(spec)));
    }
    for v in generators {
        let spec = generator(v, path, &library_name, free_string)?;
        out.generators.push(Box::leak(Box::new(spec)));
    }
    for v in discriminators {
        let spec = discriminator(v, path, &library_name, free_string)?;
        out.discriminators.push(Box::leak(Box::new(spec)));
    }
    for v in hooks {
        let spec = hook(v, path, &library_name, free_string)?;
        out.hooks.push(Box::leak(Box::new(spec)));
    }
    Ok(out)
}

fn null(path: &Path, kind: &str, name: &str, what: &str) -> vlmatch_core::Error {
    refuse(
        path,
        format!("{kind} `{name}`: its `{what}` function is null"),
    )
}

fn encoder(
    v: &EncoderVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<EncoderSpec> {
    let name = c_str(v.name, "encoder name", path)?;
    let null = |what| null(path, "encoder", &name, what);
    let free_string = free_string.expect("checked with the table");
    // SAFETY: the vtable's layout pointer, null or the library's static data.
    let layout = unsafe { host_layout(v.layout, &name, library, free_string) }
        .map_err(|e| refuse(path, format!("encoder `{name}`: {e}")))?;
    Ok(EncoderSpec {
        layout,
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        forward: v.forward.ok_or_else(|| null("forward"))?,
        word_embeddings: v.word_embeddings.ok_or_else(|| null("word_embeddings"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string,
        library: library.to_string(),
        name,
    })
}

fn objective(
    v: &ObjectiveVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<ObjectiveSpec> {
    let name = c_str(v.name, "objective name", path)?;
    let null = |what| null(path, "objective", &name, what);
    Ok(ObjectiveSpec {
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        forward: v.forward.ok_or_else(|| null("forward"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string: free_string.expect("checked with the table"),
        library: library.to_string(),
        name,
    })
}

fn negative_sampler(
    v: &super::abi::NegativeSamplerVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<NegativeSamplerSpec> {
    let name = c_str(v.name, "negative sampler name", path)?;
    let null = |what| null(path, "negative sampler", &name, what);
    Ok(NegativeSamplerSpec {
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        sample: v.sample.ok_or_else(|| null("sample"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string: free_string.expect("checked with the table"),
        library: library.to_string(),
        name,
    })
}

fn generator(
    v: &GeneratorVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<GeneratorSpec> {
    let name = c_str(v.name, "generator name", path)?;
    let null = |what| null(path, "generator", &name, what);
    let free_string = free_string.expect("checked with the table");
    // SAFETY: the vtable's layout pointer, null or the library's static data.
    let layout = unsafe { host_layout(v.layout, &name, library, free_string) }
        .map_err(|e| refuse(path, format!("generator `{name}`: {e}")))?;
    Ok(GeneratorSpec {
        layout,
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        logits: v.logits.ok_or_else(|| null("logits"))?,
        fill: v.fill.ok_or_else(|| null("fill"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string,
        library: library.to_string(),
        name,
    })
}

fn discriminator(
    v: &DiscriminatorVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<DiscriminatorSpec> {
    let name = c_str(v.name, "discriminator name", path)?;
    let null = |what| null(path, "discriminator", &name, what);
    Ok(DiscriminatorSpec {
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        logits: v.logits.ok_or_else(|| null("logits"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string: free_string.expect("checked with the table"),
        library: library.to_string(),
        name,
    })
}

fn hook(
    v: &HookVTable,
    path: &Path,
    library: &str,
    free_string: Option<FreeStringFn>,
) -> Result<HookSpec> {
    let name = c_str(v.name, "hook name", path)?;
    let null = |what| null(path, "hook", &name, what);
    Ok(HookSpec {
        data: v.data,
        create: v.create.ok_or_else(|| null("create"))?,
        call: v.call.ok_or_else(|| null("call"))?,
        after_objectives: v.after_objectives.ok_or_else(|| null("after_objectives"))?,
        destroy: v.destroy.ok_or_else(|| null("destroy"))?,
        free_string: free_string.expect("checked with the table"),
        library: library.to_string(),
        name,
    })
}
