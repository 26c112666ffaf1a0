//! Creating a library's plugin from the host: which loaded library
//! provides a name, the request the library builds from (its section and
//! the run's facts), the build callbacks (`add_parameter` under the
//! plugin's path, the text encoder's word embeddings), and destroying the
//! state again; errors name the plugin, the call and the library.

use super::super::abi::{
    borrow, free_host_string, give, status, text, BuildHost, PluginInfo, TensorHandle,
};
use super::super::calls::modality_code;
use super::super::load::{
    Creatable, Creation, DiscriminatorSpec, EncoderSpec, GeneratorSpec, HookSpec,
    NegativeSamplerSpec, ObjectiveSpec,
};
use crate::{BuildContext, Kind};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CString};
use std::rc::Rc;
use std::sync::Mutex;
use tch::nn;
use vlmatch_core::{Encoder, Error, Result};

/// The plugins of the libraries loaded in this process, by kind and
/// name: what the factories find.
pub(super) static LOADED: Mutex<BTreeMap<(Kind, String), Loaded>> = Mutex::new(BTreeMap::new());

#[derive(Clone, Copy)]
pub(super) enum Loaded {
    Encoder(&'static EncoderSpec),
    Objective(&'static ObjectiveSpec),
    NegativeSampler(&'static NegativeSamplerSpec),
    Generator(&'static GeneratorSpec),
    Discriminator(&'static DiscriminatorSpec),
    Hook(&'static HookSpec),
}

impl Loaded {
    pub(super) fn library(&self) -> &str {
        match self {
            Loaded::Encoder(s) => &s.library,
            Loaded::Objective(s) => &s.library,
            Loaded::NegativeSampler(s) => &s.library,
            Loaded::Generator(s) => &s.library,
            Loaded::Discriminator(s) => &s.library,
            Loaded::Hook(s) => &s.library,
        }
    }
}

pub(super) fn loaded(kind: Kind, name: &str) -> Result<Loaded> {
    let map = LOADED.lock().unwrap_or_else(|e| e.into_inner());
    map.get(&(kind, name.to_string())).copied().ok_or_else(|| {
        Error::plugin(
            name,
            format!("no loaded plugin library provides {kind} `{name}`"),
        )
    })
}

/// An error of call `call` of plugin `name` in `library`.
pub(super) fn failed(name: &str, library: &str, call: &str, message: &str) -> Error {
    Error::plugin(
        name,
        format!("`{call}` failed in library {library}: {message}"),
    )
}

/// A library's error string as text, freed by the library.
///
/// # Safety
/// `p` is null or a string of the library whose `free_string` is given.
pub(super) unsafe fn library_error(
    p: *mut c_char,
    free: super::super::abi::FreeStringFn,
) -> Option<String> {
    // SAFETY: as the caller promises; freed once, here.
    let message = unsafe { text(p) }?;
    unsafe { free(p) };
    Some(message)
}

pub(super) fn device_name(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        tch::Device::Mps => "mps".into(),
        _ => "cpu".into(),
    }
}

fn kind_name(k: tch::Kind) -> &'static str {
    match k {
        tch::Kind::BFloat16 => "bfloat16",
        tch::Kind::Half => "half",
        _ => "float",
    }
}

/// The model's encoders as a library's proxy model is built from them
/// (`dynamic::view::ModelFacts`): modality code and width of each.
pub(super) fn model_facts(m: &vlmatch_core::VlModel) -> serde_json::Value {
    serde_json::json!({
        "image": [modality_code(m.image.modality()), m.image.hidden_size()],
        "text": [modality_code(m.text.modality()), m.text.hidden_size()],
        "fusion": [modality_code(m.fusion.modality()), m.fusion.hidden_size()],
    })
}

/// What `create` gets (read back by the library in `guest/request.rs`).
fn request(ctx: &BuildContext<'_>) -> String {
    let env = ctx.env;
    let s = env.special;
    let model = ctx.model.map(model_facts);
    serde_json::json!({
        "plugin": ctx.plugin,
        "key": ctx.key,
        "section": ctx.section_json(),
        "device": device_name(env.device),
        "compute": kind_name(env.compute),
        "vocab_size": env.vocab_size,
        "special": [s.pad, s.unk, s.cls, s.sep, s.mask],
        "image_size": env.image_size,
        "max_text_len": env.max_text_len,
        "widths": [ctx.widths.image, ctx.widths.text, ctx.widths.fusion],
        "model": model,
    })
    .to_string()
}

/// `add_parameter`: `tensor` joins the run's variables at `name` (dotted,
/// relative to the plugin's path).
unsafe extern "C" fn add_parameter(
    ctx: *mut c_void,
    name: *const c_char,
    tensor: TensorHandle,
    trainable: u8,
) -> *mut c_char {
    status(|| {
        // SAFETY: `ctx` is the `Building` `create_in` lends for the call.
        let path = &unsafe { &*(ctx as *const Building<'static>) }.path;
        // SAFETY: the library passes a NUL-terminated name and a live handle.
        let name = unsafe { text(name) }.ok_or("a parameter without a name")?;
        if tensor.is_null() {
            return Err(format!("parameter `{name}` has no tensor"));
        }
        let parts: Vec<&str> = name.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(format!("parameter name `{name}` has an empty component"));
        }
        let mut p = path.clone();
        for part in &parts[..parts.len() - 1] {
            p = &p / *part;
        }
        // SAFETY: a live handle, lent.
        let t = unsafe { borrow(tensor) };
        let _ = p.add(parts[parts.len() - 1], t, trainable != 0);
        Ok(())
    })
}

/// What the build callbacks see: the plugin's path and the text encoder
/// (generators tie to its word embeddings).
struct Building<'p> {
    path: nn::Path<'p>,
    text: Option<Rc<dyn Encoder>>,
}

/// `word_embeddings`: the text encoder's matrix, or null.
unsafe extern "C" fn build_word_embeddings(
    ctx: *mut c_void,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: `ctx` is the `Building` `create_in` lends for the call.
        let b = unsafe { &*(ctx as *const Building<'static>) };
        let t = b.text.as_ref().and_then(|t| t.word_embeddings());
        if out.is_null() {
            return Err("no out-pointer".into());
        }
        // SAFETY: a valid out-pointer.
        unsafe { *out = t.map(give).unwrap_or(std::ptr::null_mut()) };
        Ok(())
    })
}

/// Call `create` with the host's build services; the state and summary.
pub(super) fn create_in(
    ctx: &BuildContext<'_>,
    spec: &impl Creatable,
) -> Result<(*mut c_void, PluginInfo)> {
    let Creation {
        name,
        library,
        create,
        data,
        free_string: free,
    } = spec.creation();
    let json = CString::new(request(ctx)).map_err(|e| Error::plugin(name, e.to_string()))?;
    let building = Building {
        path: ctx.path.clone(),
        text: ctx.text_encoder.clone(),
    };
    let host = BuildHost {
        ctx: &building as *const Building<'_> as *mut c_void,
        add_parameter: Some(add_parameter),
        word_embeddings: Some(build_word_embeddings),
        free_string: Some(free_host_string),
    };
    let (mut state, mut info) = (std::ptr::null_mut(), PluginInfo::default());
    // SAFETY: valid strings and out-pointers; `host` lives for the call.
    let error = unsafe { create(data, json.as_ptr(), &host, &mut state, &mut info) };
    // SAFETY: an error string of this library.
    if let Some(message) = unsafe { library_error(error, free) } {
        return Err(failed(name, library, "create", &message));
    }
    if state.is_null() {
        return Err(failed(name, library, "create", "it returned no state"));
    }
    Ok((state, info))
}

/// Destroy a library plugin's state, reporting (not returning) a failure.
pub(super) fn destroy(
    state: *mut c_void,
    destroy: super::super::abi::DestroyFn,
    free: super::super::abi::FreeStringFn,
    name: &str,
    library: &str,
) {
    // SAFETY: `state` came from `create` and is destroyed once, here.
    let error = unsafe { destroy(state) };
    // SAFETY: an error string of this library.
    if let Some(message) = unsafe { library_error(error, free) } {
        // Drop cannot fail: the failure is reported, not returned.
        tracing::error!("{}", failed(name, library, "destroy", &message));
    }
}
