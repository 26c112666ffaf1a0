//! Checkpoint layouts across the boundary: an encoder or generator in a
//! library registers its [`CheckpointLayout`] as statically
//! (`register!(encoder "x" => build, layout = &LAYOUT)`), and the host uses
//! it through a [`HostLayout`], so `model.<role>.init` starts the plugin
//! from a checkpoint directory and `vlmatch export` writes it, as for a
//! built-in plugin. Each method is one JSON [`Request`] to the library's
//! [`layout_call`], tensors lent alongside and answered through a
//! [`TensorSink`] ([`json_call`]).

use super::abi::{static_c, text, FreeStringFn, LayoutVTable, TensorHandle, TensorSink};
use super::json_call;
use crate::weights::{CheckpointArch, CheckpointLayout, ExportContext, ExportFiles, LoadContext};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::path::Path;
use tch::Tensor;
use vlmatch_core::{Error, Result, SpecialTokens};

/// One method call of a layout; the tensors it names travel beside it in
/// the same order.
#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `map_name`; the tensors: the model's variables, named by `vars`.
    MapName {
        key: String,
        section: Value,
        model_type: Option<String>,
        vars: Vec<String>,
        name: String,
    },
    IsNew {
        param: String,
    },
    /// `resize`; the tensor: the checkpoint's. Answer: whether it resized
    /// (then one tensor).
    Resize {
        param: String,
        target: Vec<i64>,
    },
    /// Answer: null, or `{section, max_text_len, vocab_size}`.
    ReadArch {
        dir: String,
    },
    /// `export`; the tensors: the plugin's, named by `names`. Answer: null,
    /// or `{config, files, names}` with the exported tensors in order.
    Export {
        key: String,
        section: Value,
        names: Vec<String>,
        image_size: i64,
        mean: [f32; 3],
        std: [f32; 3],
        max_len: i64,
        vocab_size: i64,
        special: [i64; 5],
    },
}

/// The JSON array of strings at `p` (a library's static string), leaked
/// for the life of the process as `CheckpointLayout` wants them.
///
/// # Safety
/// `p` is null or a NUL-terminated string.
unsafe fn static_strings(
    p: *const c_char,
    what: &str,
) -> std::result::Result<&'static [&'static str], String> {
    // SAFETY: as the caller promises.
    let t = unsafe { text(p) }.ok_or_else(|| format!("its layout's {what} is null"))?;
    let list: Vec<String> = serde_json::from_str(&t)
        .map_err(|e| format!("its layout's {what} is not a JSON array of strings: {e}"))?;
    let leaked: Vec<&'static str> = list
        .into_iter()
        .map(|s| &*Box::leak(s.into_boxed_str()))
        .collect();
    Ok(Box::leak(leaked.into_boxed_slice()))
}

type CallFn = unsafe extern "C" fn(
    *const c_void,
    *const c_char,
    usize,
    *const TensorHandle,
    *const TensorSink,
    *mut *mut c_char,
) -> *mut c_char;

/// A library plugin's layout as the host uses it.
pub struct HostLayout {
    plugin: String,
    library: String,
    data: *const c_void,
    call: CallFn,
    free_string: FreeStringFn,
    model_types: &'static [&'static str],
    architectures: &'static [&'static str],
}

// SAFETY: the library's static data and functions, loaded for the life of
// the process; the calls themselves run on the caller's thread.
unsafe impl Sync for HostLayout {}
unsafe impl Send for HostLayout {}

/// The layout of `plugin` from its vtable, checked; `None` for a null one.
///
/// # Safety
/// `v` is null or points to a vtable of the loaded library.
pub(crate) unsafe fn host_layout(
    v: *const LayoutVTable,
    plugin: &str,
    library: &str,
    free_string: FreeStringFn,
) -> std::result::Result<Option<&'static HostLayout>, String> {
    // SAFETY: as the caller promises.
    let Some(v) = (unsafe { v.as_ref() }) else {
        return Ok(None);
    };
    let call = v.call.ok_or("its `layout.call` function is null")?;
    Ok(Some(Box::leak(Box::new(HostLayout {
        plugin: plugin.to_string(),
        library: library.to_string(),
        data: v.data,
        call,
        free_string,
        // SAFETY: the vtable's static strings.
        model_types: unsafe { static_strings(v.model_types, "model_types") }?,
        architectures: unsafe { static_strings(v.architectures, "architectures") }?,
    }))))
}

impl HostLayout {
    /// Send `request` with `tensors`; the answer and its tensors.
    fn request(&self, request: &Request, tensors: &[&Tensor]) -> Result<(Value, Vec<Tensor>)> {
        let call = self.call;
        let data = self.data;
        let raw = Box::new(move |req, n, handles, sink, out| {
            // SAFETY: the library's function; everything lent lives through the call.
            unsafe { call(data, req, n, handles, sink, out) }
        });
        json_call::send(raw, self.free_string, request, tensors).map_err(|m| {
            Error::plugin(
                &self.plugin,
                format!(
                    "its checkpoint layout failed in library {}: {m}",
                    self.library
                ),
            )
        })
    }

    /// For the methods that cannot fail: the failure is logged.
    fn logged<T>(&self, r: Result<T>) -> Option<T> {
        r.map_err(|e| tracing::error!("{e}")).ok()
    }
}

impl CheckpointLayout for HostLayout {
    fn model_types(&self) -> &'static [&'static str] {
        self.model_types
    }
    fn architectures(&self) -> &'static [&'static str] {
        self.architectures
    }
    fn map_name(&self, ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let mut vars: Vec<(&String, &Tensor)> = ctx.vars.iter().collect();
        vars.sort_by(|a, b| a.0.cmp(b.0));
        let request = Request::MapName {
            key: ctx.key.to_string(),
            section: ctx.section.clone(),
            model_type: ctx.model_type.map(str::to_string),
            vars: vars.iter().map(|(n, _)| (*n).clone()).collect(),
            name: name.to_string(),
        };
        let tensors: Vec<&Tensor> = vars.iter().map(|(_, t)| *t).collect();
        let (answer, _) = self.logged(self.request(&request, &tensors))?;
        answer.as_str().map(str::to_string)
    }
    fn is_new(&self, param: &str) -> bool {
        let request = Request::IsNew {
            param: param.to_string(),
        };
        self.logged(self.request(&request, &[]))
            .is_some_and(|(a, _)| a.as_bool() == Some(true))
    }
    fn resize(&self, param: &str, tensor: &Tensor, target: &[i64]) -> Option<Tensor> {
        let request = Request::Resize {
            param: param.to_string(),
            target: target.to_vec(),
        };
        let (answer, mut t) = self.logged(self.request(&request, &[tensor]))?;
        (answer.as_bool() == Some(true) && t.len() == 1).then(|| t.remove(0))
    }
    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let request = Request::ReadArch {
            dir: dir.display().to_string(),
        };
        let (answer, _) = self.request(&request, &[])?;
        if answer.is_null() {
            return Ok(None);
        }
        let section = answer["section"].as_object().cloned().unwrap_or_default();
        Ok(Some(CheckpointArch {
            section,
            max_text_len: answer["max_text_len"].as_i64(),
            vocab_size: answer["vocab_size"].as_i64(),
        }))
    }
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let s = ctx.special;
        let request = Request::Export {
            key: ctx.key.to_string(),
            section: ctx.section.clone(),
            names: ctx.tensors.iter().map(|(n, _)| n.clone()).collect(),
            image_size: ctx.image_size,
            mean: ctx.mean,
            std: ctx.std,
            max_len: ctx.max_len,
            vocab_size: ctx.vocab_size,
            special: [s.pad, s.unk, s.cls, s.sep, s.mask],
        };
        let tensors: Vec<&Tensor> = ctx.tensors.iter().map(|(_, t)| t).collect();
        let (answer, tensors) = self.request(&request, &tensors)?;
        if answer.is_null() {
            return Ok(None);
        }
        let bad = || {
            Error::plugin(
                &self.plugin,
                format!(
                    "its checkpoint layout in library {} exported a malformed answer",
                    self.library
                ),
            )
        };
        let names: Vec<String> =
            serde_json::from_value(answer["names"].clone()).map_err(|_| bad())?;
        let files: Vec<(String, Value)> =
            serde_json::from_value(answer["files"].clone()).map_err(|_| bad())?;
        if names.len() != tensors.len() {
            return Err(bad());
        }
        Ok(Some(ExportFiles {
            config: answer["config"].clone(),
            tensors: names.into_iter().zip(tensors).collect(),
            files,
        }))
    }
}

/// The library's vtable for `layout`.
pub(crate) fn layout_vtable(layout: &'static dyn CheckpointLayout) -> LayoutVTable {
    let list = |l: &[&str]| static_c(&serde_json::to_string(l).expect("strings"));
    LayoutVTable {
        data: Box::leak(Box::new(layout)) as *const &'static dyn CheckpointLayout as *const c_void,
        model_types: list(layout.model_types()),
        architectures: list(layout.architectures()),
        call: Some(layout_call),
    }
}

/// Answer one [`Request`] with the library's layout (its `call`).
unsafe extern "C" fn layout_call(
    data: *const c_void,
    request: *const c_char,
    n: usize,
    tensors: *const TensorHandle,
    sink: *const TensorSink,
    out_json: *mut *mut c_char,
) -> *mut c_char {
    // SAFETY: `data` is the layout this vtable was made with; the rest
    // the host's, as `json_call::send` passes them.
    let layout = unsafe { *(data as *const &'static dyn CheckpointLayout) };
    unsafe {
        json_call::answer(request, n, tensors, sink, out_json, |r, t| {
            answer(layout, r, t)
        })
    }
}

fn answer(
    layout: &dyn CheckpointLayout,
    request: Request,
    tensors: Vec<Tensor>,
) -> std::result::Result<(Value, Vec<Tensor>), String> {
    let named = |names: Vec<String>| -> std::result::Result<Vec<(String, Tensor)>, String> {
        if names.len() != tensors.len() {
            return Err(format!(
                "{} names for {} tensors",
                names.len(),
                tensors.len()
            ));
        }
        Ok(names
            .into_iter()
            .zip(tensors.iter().map(Tensor::shallow_clone))
            .collect())
    };
    Ok(match request {
        Request::MapName {
            key,
            section,
            model_type,
            vars,
            name,
        } => {
            let vars: HashMap<String, Tensor> = named(vars)?.into_iter().collect();
            let ctx = LoadContext {
                key: &key,
                section: &section,
                vars: &vars,
                model_type: model_type.as_deref(),
            };
            (json!(layout.map_name(&ctx, &name)), Vec::new())
        }
        Request::IsNew { param } => (json!(layout.is_new(&param)), Vec::new()),
        Request::Resize { param, target } => {
            let t = tensors.first().ok_or("no tensor to resize")?;
            match layout.resize(&param, t, &target) {
                Some(r) => (json!(true), vec![r]),
                None => (json!(false), Vec::new()),
            }
        }
        Request::ReadArch { dir } => match layout.read_arch(Path::new(&dir)) {
            Ok(None) => (Value::Null, Vec::new()),
            Ok(Some(a)) => (
                json!({"section": a.section, "max_text_len": a.max_text_len, "vocab_size": a.vocab_size}),
                Vec::new(),
            ),
            Err(e) => return Err(e.to_string()),
        },
        Request::Export {
            key,
            section,
            names,
            image_size,
            mean,
            std,
            max_len,
            vocab_size,
            special,
        } => {
            let tensors = named(names)?;
            let ctx = ExportContext {
                key: &key,
                section: &section,
                tensors: &tensors,
                image_size,
                mean,
                std,
                max_len,
                vocab_size,
                special: SpecialTokens {
                    pad: special[0],
                    unk: special[1],
                    cls: special[2],
                    sep: special[3],
                    mask: special[4],
                },
            };
            match layout.export(&ctx).map_err(|e| e.to_string())? {
                None => (Value::Null, Vec::new()),
                Some(files) => {
                    let (names, tensors): (Vec<String>, Vec<Tensor>) =
                        files.tensors.into_iter().unzip();
                    let answer =
                        json!({"config": files.config, "files": files.files, "names": names});
                    (answer, tensors)
                }
            }
        }
    })
}
