//! The C side of the plugin boundary (ABI 5): the versions both sides
//! compare, the `#[repr(C)]` tables a library exports and the host's
//! callback tables, and the helpers both sides use to keep panics and
//! tensor handles on their own side of it.
//!
//! Conventions: a function returns `*mut c_char`, null for success or an
//! error message allocated by the side that returns it and freed by the
//! same side's `free_string`; tensors cross as libtorch handles (`at::Tensor*`
//! as torch-sys makes them): a handle passed as an argument is lent (the
//! receiver takes its own reference with [`borrow`] and never frees it), a
//! handle written to an out-pointer is given (the receiver owns it:
//! [`take`]); configs and run facts cross as JSON.

use std::ffi::{c_char, c_void, CStr, CString};
use tch::Tensor;

/// Bumped whenever a table or callback signature of this module changes.
/// 5: hooks; 4: generators and discriminators, the text encoder's word embeddings
/// offered at build, checkpoint layouts of encoders and generators; 3:
/// encoders and objectives beside samplers, the libtorch version in the
/// handshake, tensors crossing as handles; 2: fallible callbacks, nullable
/// pointers; 1: samplers only.
pub const ABI_VERSION: u32 = 5;
pub const RUSTC_VERSION: &str = env!("BUILD_RUSTC_VERSION");
pub const VLMATCH_VERSION: &str = env!("CARGO_PKG_VERSION");
pub const TCH_VERSION: &str = "0.24.0";
/// The libtorch torch-sys 0.24 compiles its C++ wrapper against (its build
/// refuses another one unless told to bypass the check).
pub const LIBTORCH_VERSION: &str = "2.11.0";
/// The symbol every dynamic plugin exports.
pub const ENTRY_SYMBOL: &[u8] = b"vlmatch_plugin_table";

/// A libtorch tensor handle (`torch_sys::C_tensor`).
pub type TensorHandle = *mut c_void;

/// What [`ENTRY_SYMBOL`] returns. `abi_version` comes first so that it can
/// be read whatever the rest of the layout is.
#[repr(C)]
pub struct PluginTable {
    pub abi_version: u32,
    pub rustc_version: *const c_char,
    pub vlmatch_version: *const c_char,
    pub tch_version: *const c_char,
    pub libtorch_version: *const c_char,
    /// Frees the error strings of encoders and objectives.
    pub free_string: Option<FreeStringFn>,
    pub n_samplers: usize,
    pub samplers: *const SamplerVTable,
    pub n_encoders: usize,
    pub encoders: *const EncoderVTable,
    pub n_objectives: usize,
    pub objectives: *const ObjectiveVTable,
    pub n_negative_samplers: usize,
    pub negative_samplers: *const NegativeSamplerVTable,
    pub n_generators: usize,
    pub generators: *const GeneratorVTable,
    pub n_discriminators: usize,
    pub discriminators: *const DiscriminatorVTable,
    pub n_hooks: usize,
    pub hooks: *const HookVTable,
}

/// `free_string`: free a string the library handed out; 0, or non-zero
/// when it failed (panicked).
pub type FreeStringFn = unsafe extern "C" fn(*mut c_char) -> u32;

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
/// `destroy`: free a state from `create`; null, or an error message.
pub type DestroyFn = unsafe extern "C" fn(*mut c_void) -> *mut c_char;

/// One text-level negative sampler, as C functions.
#[repr(C)]
pub struct SamplerVTable {
    pub name: *const c_char,
    pub create: Option<CreateFn>,
    pub sample: Option<SampleFn>,
    pub free_string: Option<FreeStringFn>,
    pub destroy: Option<DestroyFn>,
}

/// What the host offers a plugin while it builds: its parameters, created
/// on the plugin's side, are added to the run's variables under the
/// plugin's `nn::Path` (`add_parameter`, the tensor lent), so they are
/// checkpointed, optimised, reduced over ranks, exported and moved with
/// the model; a generator gets the text encoder's word-embedding matrix
/// to tie its decoder to (`word_embeddings`: one handle given, or null
/// when the text encoder has none or the plugin is not a generator).
/// Errors are host strings, freed with `free_string`.
#[repr(C)]
pub struct BuildHost {
    pub ctx: *mut c_void,
    pub add_parameter: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            name: *const c_char,
            tensor: TensorHandle,
            trainable: u8,
        ) -> *mut c_char,
    >,
    pub word_embeddings:
        Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut TensorHandle) -> *mut c_char>,
    pub free_string: Option<unsafe extern "C" fn(*mut c_char)>,
}

/// `create` of an encoder or an objective: `data` from its vtable, the
/// request (JSON: plugin name, config key, its section, the run's facts),
/// the host's build services; writes the state and a summary (encoders:
/// modality and width; objectives: whether contrastive).
pub type CreatePluginFn = unsafe extern "C" fn(
    data: *const c_void,
    request_json: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    info: *mut PluginInfo,
) -> *mut c_char;

/// What `create` tells the host.
#[repr(C)]
#[derive(Default)]
pub struct PluginInfo {
    /// Encoders: 0 image, 1 text, 2 multimodal.
    pub modality: u32,
    pub hidden_size: i64,
    /// Objectives: [`vlmatch_core::Objective::contrastive`].
    pub contrastive: u8,
}

/// The input of an encoder call: `kind` 0 image (`[images]`), 1 text
/// (`[ids, mask]`), 2 fused (`[text hidden, text mask, image hidden, image
/// mask]`), 3 fused pair (text, then both images); the tensors lent.
#[repr(C)]
pub struct EncoderCall {
    pub kind: u32,
    /// Only position 0 (`Encoder::forward_cls`).
    pub cls: u8,
    pub train: u8,
    pub n: usize,
    pub tensors: *const TensorHandle,
}

/// An encoder: `forward` writes two given handles (hidden, mask);
/// `word_embeddings` one given handle or null for none.
#[repr(C)]
pub struct EncoderVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<CreatePluginFn>,
    pub forward: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            call: *const EncoderCall,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    pub word_embeddings:
        Option<unsafe extern "C" fn(state: *mut c_void, out: *mut TensorHandle) -> *mut c_char>,
    pub destroy: Option<DestroyFn>,
    /// The encoder's checkpoint layout, or null for none.
    pub layout: *const LayoutVTable,
}

/// Where a library hands the tensors of an answer: `push` takes each one
/// lent (the host takes its own reference); null, or a host error string.
#[repr(C)]
pub struct TensorSink {
    pub ctx: *mut c_void,
    pub push: Option<unsafe extern "C" fn(ctx: *mut c_void, tensor: TensorHandle) -> *mut c_char>,
    pub free_string: Option<unsafe extern "C" fn(*mut c_char)>,
}

/// A plugin's checkpoint layout (`crate::weights::CheckpointLayout`):
/// the `model_type`s and `transformers` classes it names (JSON arrays of
/// strings), and one `call` for its methods: `request` is JSON
/// (`dynamic::layout::Request`), `tensors` the `n` tensors it refers to,
/// lent; the answer is JSON in `out_json` (a library string, freed with
/// its `free_string`) and its tensors go to `sink`, in order.
#[repr(C)]
pub struct LayoutVTable {
    pub data: *const c_void,
    pub model_types: *const c_char,
    pub architectures: *const c_char,
    pub call: Option<
        unsafe extern "C" fn(
            data: *const c_void,
            request: *const c_char,
            n: usize,
            tensors: *const TensorHandle,
            sink: *const TensorSink,
            out_json: *mut *mut c_char,
        ) -> *mut c_char,
    >,
}

/// An objective: `forward` reads the host's forward cache through `view`
/// and hands its named losses and metrics to `view.emit`.
#[repr(C)]
pub struct ObjectiveVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<CreatePluginFn>,
    pub forward: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            view: *const ForwardHost,
            step: i64,
        ) -> *mut c_char,
    >,
    pub destroy: Option<DestroyFn>,
}

/// The arguments of `Generator::fill`, the tensors lent.
#[repr(C)]
pub struct FillCall {
    pub logits: TensorHandle,
    pub original: TensorHandle,
    pub positions: TensorHandle,
    pub keys: TensorHandle,
    pub temperature: f64,
    pub forbid_original: u8,
}

/// A generator (`vlmatch_core::Generator`): `logits` on lent states
/// (hidden, mask) writes one given handle; so does `fill`.
#[repr(C)]
pub struct GeneratorVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<CreatePluginFn>,
    pub logits: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            hidden: TensorHandle,
            mask: TensorHandle,
            train: u8,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    pub fill: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            call: *const FillCall,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    pub destroy: Option<DestroyFn>,
    /// The generator's checkpoint layout, or null for none.
    pub layout: *const LayoutVTable,
}

/// A discriminator (`vlmatch_core::Discriminator`) on lent fused states
/// (hidden, mask): `which` 0 pair logits, 1 token logits; one given handle.
#[repr(C)]
pub struct DiscriminatorVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<CreatePluginFn>,
    pub logits: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            which: u32,
            hidden: TensorHandle,
            mask: TensorHandle,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    pub destroy: Option<DestroyFn>,
}

/// A hook (`vlmatch_core::Hook`). `create`: `data` from the vtable, the
/// request (JSON, `dynamic::hook_points::HookRequest`: the hook's name, the
/// run's merged config, rank, world, one epoch in steps, the run directory,
/// the device and the model's encoders); writes the state, or null when
/// the hook is off for this run, and `info_json` (a library string:
/// `{"priority": P}`). `call`: one point of the hook's run (`request` is
/// JSON, `dynamic::hook_points::Point`), the `n` tensors it refers to lent;
/// the answer is JSON in `out_json` (a library string, or null for none)
/// and its tensors go to `sink`, in order. `after_objectives`: the
/// micro-batch's forward cache through `view`, as an objective's.
#[repr(C)]
pub struct HookVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<HookCreateFn>,
    pub call: Option<HookCallFn>,
    pub after_objectives: Option<HookAfterObjectivesFn>,
    pub destroy: Option<DestroyFn>,
}

/// `create` of a [`HookVTable`].
pub type HookCreateFn = unsafe extern "C" fn(
    data: *const c_void,
    request_json: *const c_char,
    state: *mut *mut c_void,
    info_json: *mut *mut c_char,
) -> *mut c_char;

/// `after_objectives` of a [`HookVTable`].
pub type HookAfterObjectivesFn =
    unsafe extern "C" fn(state: *mut c_void, view: *const ForwardHost) -> *mut c_char;

/// `call` of a [`HookVTable`].
pub type HookCallFn = unsafe extern "C" fn(
    state: *mut c_void,
    request: *const c_char,
    n: usize,
    tensors: *const TensorHandle,
    sink: *const TensorSink,
    out_json: *mut *mut c_char,
) -> *mut c_char;

/// Negatives a sampler returns (`vlmatch_core::Negatives`): `kind` 0
/// in-batch (`text_for_image`, `image_for_text`), 1 texts (`image_index`,
/// `ids`, `mask`); the handles given.
#[repr(C)]
pub struct NegativesOut {
    pub kind: u32,
    pub tensors: [TensorHandle; 3],
}

/// A `NegativeSampler` (the core trait): `sample` reads the host's forward
/// cache through `view` (its `emit` unused) and writes its negatives.
#[repr(C)]
pub struct NegativeSamplerVTable {
    pub name: *const c_char,
    pub data: *const c_void,
    pub create: Option<CreatePluginFn>,
    pub sample: Option<
        unsafe extern "C" fn(
            state: *mut c_void,
            view: *const ForwardHost,
            step: i64,
            out: *mut NegativesOut,
        ) -> *mut c_char,
    >,
    pub destroy: Option<DestroyFn>,
}

/// Facts of one forward the host gives with [`ForwardHost`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForwardFacts {
    pub train: u8,
    /// 0 when training on one process without a process group.
    pub world_size: u64,
    pub rank: u64,
    /// `Forward::draw_state` of the host's forward.
    pub draw_seed: i64,
    pub draws: i64,
    /// 0 `Identical`, 1 `ImageId`.
    pub positive_rule: u32,
    /// In-batch negatives from this rank's pairs only
    /// (`Forward::with_local_negatives`).
    pub local_negatives: u8,
}

/// The host's per-batch forward cache as an objective in a library sees it
/// (the subset PLUGINS.md lists). Every function returns null or a host
/// error string (freed with `free_string`); tensors written are given.
#[repr(C)]
pub struct ForwardHost {
    pub ctx: *mut c_void,
    pub facts: ForwardFacts,
    /// images, ids, mask, image_ids, image_keys, sample_keys.
    pub batch:
        Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut TensorHandle) -> *mut c_char>,
    /// JSON `{"captions": [...], "sample_keys_host": [...]}` (a host string).
    pub batch_json:
        Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut *mut c_char) -> *mut c_char>,
    /// ITC embeddings (image, text), with gradient.
    pub embeds:
        Option<unsafe extern "C" fn(ctx: *mut c_void, out: *mut TensorHandle) -> *mut c_char>,
    /// The model's encoder of `role` (0 image, 1 text, 2 fusion) on `call`
    /// (the batch's own images or text: the cached states); two handles.
    pub encode: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            role: u32,
            call: *const EncoderCall,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    /// The discriminator on fused states (lent hidden, mask): `which` 0
    /// pair logits, 1 token logits; one handle.
    pub discriminate: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            which: u32,
            hidden: TensorHandle,
            mask: TensorHandle,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    /// The process group: `op` 0 all-gather with gradient, 1 all-gather, 2
    /// all-reduce sum; one handle.
    pub collective: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            op: u32,
            tensor: TensorHandle,
            out: *mut TensorHandle,
        ) -> *mut c_char,
    >,
    /// The keyed draws the objective made: the host's forward continues there.
    pub set_draws: Option<unsafe extern "C" fn(ctx: *mut c_void, draws: i64) -> *mut c_char>,
    /// One named loss (`metric` 0) or metric (1), the tensor lent.
    pub emit: Option<
        unsafe extern "C" fn(
            ctx: *mut c_void,
            metric: u8,
            name: *const c_char,
            tensor: TensorHandle,
        ) -> *mut c_char,
    >,
    pub free_string: Option<unsafe extern "C" fn(*mut c_char)>,
}

// SAFETY: the tables are immutable data of the library, written once when
// built and only read afterwards; their pointers are to static strings,
// static data and functions, so sharing or moving them across threads is
// sound.
unsafe impl Sync for PluginTable {}
unsafe impl Send for PluginTable {}
unsafe impl Sync for SamplerVTable {}
unsafe impl Send for SamplerVTable {}
unsafe impl Sync for EncoderVTable {}
unsafe impl Send for EncoderVTable {}
unsafe impl Sync for ObjectiveVTable {}
unsafe impl Send for ObjectiveVTable {}
unsafe impl Sync for NegativeSamplerVTable {}
unsafe impl Send for NegativeSamplerVTable {}
unsafe impl Sync for GeneratorVTable {}
unsafe impl Send for GeneratorVTable {}
unsafe impl Sync for DiscriminatorVTable {}
unsafe impl Send for DiscriminatorVTable {}
unsafe impl Sync for LayoutVTable {}
unsafe impl Send for LayoutVTable {}
unsafe impl Sync for HookVTable {}
unsafe impl Send for HookVTable {}

/// Lend `t` for the duration of a call.
pub fn lend(t: &Tensor) -> TensorHandle {
    t.as_ptr() as TensorHandle
}

/// A reference of our own to a lent handle.
///
/// # Safety
/// `h` is a live tensor handle.
pub unsafe fn borrow(h: TensorHandle) -> Tensor {
    // SAFETY: as the caller promises; a shallow clone is a new handle.
    unsafe { Tensor::clone_from_ptr(h as *mut torch_sys::C_tensor) }
}

/// Give `t` away: the receiver owns the handle.
pub fn give(t: Tensor) -> TensorHandle {
    let mut t = std::mem::ManuallyDrop::new(t);
    t.as_mut_ptr() as TensorHandle
}

/// Own a given handle.
///
/// # Safety
/// `h` is a live handle given to us (not lent), taken once.
pub unsafe fn take(h: TensorHandle) -> Tensor {
    // SAFETY: as the caller promises.
    unsafe { Tensor::from_ptr(h as *mut torch_sys::C_tensor) }
}

/// Run a callback's body with its panics caught, so that none unwinds
/// across the boundary; a panic becomes `Err("panicked: <message>")`
/// (a failing tch call panics with libtorch's message).
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

/// A message as a C string, freed by this side's `free_string`.
pub fn error_string(message: &str) -> *mut c_char {
    CString::new(message.replace('\0', " "))
        .expect("NULs replaced")
        .into_raw()
}

/// `catch_panics` as a C return value: null, or an error string.
pub fn status(body: impl FnOnce() -> std::result::Result<(), String>) -> *mut c_char {
    match catch_panics(body) {
        Ok(()) => std::ptr::null_mut(),
        Err(e) => error_string(&e),
    }
}

/// The `destroy` of every vtable whose state is a `Box<S>` given out with
/// `Box::into_raw`: drops it (a null state is nothing to drop).
///
/// # Safety
/// `state` is null or came from `Box::<S>::into_raw` with this `S`, and is
/// destroyed once.
pub unsafe extern "C" fn destroy_boxed<S>(state: *mut c_void) -> *mut c_char {
    status(|| {
        if !state.is_null() {
            // SAFETY: as the caller promises.
            drop(unsafe { Box::from_raw(state as *mut S) });
        }
        Ok(())
    })
}

/// Free a string made by [`error_string`] (this side's `free_string`).
///
/// # Safety
/// `p` is null or from [`error_string`], freed once.
pub unsafe extern "C" fn free_own_string(p: *mut c_char) -> u32 {
    let freed = catch_panics(|| {
        if !p.is_null() {
            // SAFETY: as the caller promises.
            drop(unsafe { CString::from_raw(p) });
        }
        Ok(())
    });
    u32::from(freed.is_err())
}

/// [`free_own_string`] without a status, for the host's tables.
///
/// # Safety
/// As [`free_own_string`].
pub unsafe extern "C" fn free_host_string(p: *mut c_char) {
    // SAFETY: as the caller promises.
    let _ = unsafe { free_own_string(p) };
}

/// The text of a C string (`None` for null).
///
/// # Safety
/// `p` is null or a NUL-terminated string.
pub unsafe fn text(p: *const c_char) -> Option<String> {
    // SAFETY: as the caller promises.
    (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

/// A static C string (leaked once; for the tables).
pub fn static_c(s: &str) -> *const c_char {
    Box::leak(
        CString::new(s.replace('\0', " "))
            .expect("NULs replaced")
            .into_boxed_c_str(),
    )
    .as_ptr()
}

/// A library refused: the error names it.
pub(crate) fn refuse(path: &std::path::Path, why: String) -> vlmatch_core::Error {
    vlmatch_core::Error::Config(format!("plugin library {}: {why}", path.display()))
}
