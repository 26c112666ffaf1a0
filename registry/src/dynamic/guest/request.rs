//! Building a plugin inside a library: the host's request read back (its
//! section, the run's facts), a `BuildContext` over it with a tokenizer
//! stand-in, the plugin's own factory run in a fresh `VarStore`, and its
//! variables handed to the host under the plugin's path.

use super::super::abi::{lend, take, text, BuildHost, ForwardHost, TensorHandle};
use super::super::view::{host_result, ModelFacts};
use crate::assemble::{ModelEnv, Sections, Widths};
use crate::{BuildContext, Registry};
use std::cell::Cell;
use std::ffi::{c_char, CString};
use std::rc::Rc;
use tch::{nn, Device, Tensor};
use vlmatch_core::{Encoder, SpecialTokens, TextBatch, TextCodec, VlModel};

/// What `create` gets from the host (written by `request` in `host/create.rs`).
#[derive(serde::Deserialize)]
pub(super) struct Request {
    plugin: String,
    key: String,
    section: serde_json::Value,
    device: String,
    compute: String,
    vocab_size: i64,
    special: [i64; 5],
    image_size: i64,
    max_text_len: i64,
    widths: [Option<i64>; 3],
    pub(super) model: Option<ModelFacts>,
}

pub(super) fn device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "mps" => Ok(Device::Mps),
        _ => name
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device `{name}`")),
    }
}

/// The run's tokenizer is not exposed to libraries: its special ids and
/// vocabulary size are; encoding text is an error (a caught panic).
struct NoCodec {
    special: SpecialTokens,
    vocab_size: i64,
}

impl TextCodec for NoCodec {
    fn special(&self) -> SpecialTokens {
        self.special
    }
    fn vocab_size(&self) -> i64 {
        self.vocab_size
    }
    fn encode(&self, _: &[&str], _: Device) -> TextBatch {
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 5)")
    }
    fn token(&self, _: i64) -> String {
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 5)")
    }
    fn pieces(&self, _: &str) -> Vec<i64> {
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 5)")
    }
}

/// What [`build`] made: the plugin, its `VarStore`, the model an objective
/// sees and the slot of the current forward's host table.
pub(super) type Built<T> = (
    T,
    nn::VarStore,
    Option<VlModel>,
    Rc<Cell<*const ForwardHost>>,
);

/// Read the request, build with `build` in a fresh `VarStore`, and add its
/// variables to the host's under the plugin's path, in the order they were
/// created (trainable first).
///
/// # Safety
/// `request` is a NUL-terminated string; `host` a valid table.
pub(super) unsafe fn build<T>(
    request: *const c_char,
    host: *const BuildHost,
    model: impl FnOnce(
        &Request,
        &Rc<Cell<*const ForwardHost>>,
        Device,
    ) -> Result<Option<VlModel>, String>,
    build: impl FnOnce(&BuildContext<'_>) -> vlmatch_core::Result<T>,
) -> Result<Built<T>, String> {
    // SAFETY: as the caller promises.
    let request = unsafe { text(request) }.ok_or("no request")?;
    let host = unsafe { host.as_ref() }.ok_or("no host table")?;
    let req: Request = serde_json::from_str(&request).map_err(|e| format!("bad request: {e}"))?;
    let dev = device(&req.device)?;
    let s = req.special;
    let special = SpecialTokens {
        pad: s[0],
        unk: s[1],
        cls: s[2],
        sep: s[3],
        mask: s[4],
    };
    let env = ModelEnv {
        vocab_size: req.vocab_size,
        special,
        text: Rc::new(NoCodec {
            special,
            vocab_size: req.vocab_size,
        }),
        image_size: req.image_size,
        max_text_len: req.max_text_len,
        device: dev,
        compute: match req.compute.as_str() {
            "bfloat16" => tch::Kind::BFloat16,
            "half" => tch::Kind::Half,
            _ => tch::Kind::Float,
        },
        masked_lm: None,
        checkpointer: None,
    };
    let mut nested = req.section.clone();
    for part in req.key.rsplit('.') {
        nested = serde_json::json!({ part: nested });
    }
    let figment = figment::Figment::from(figment::providers::Serialized::defaults(nested));
    let registry = Registry::from_inventory().map_err(|e| e.to_string())?;
    let view = Rc::new(Cell::new(std::ptr::null::<ForwardHost>()));
    let proxy = model(&req, &view, dev)?;
    let text_encoder = match &proxy {
        Some(m) => Some(m.text.clone()),
        // SAFETY: the host's table, valid for this call.
        None => unsafe { tied_text(host) }?,
    };
    let vs = nn::VarStore::new(dev);
    let mut ctx = BuildContext::new(
        vs.root(),
        &req.plugin,
        &req.key,
        &env,
        &registry,
        Sections::standalone(&figment),
        text_encoder,
    );
    ctx.widths = Widths {
        image: req.widths[0],
        text: req.widths[1],
        fusion: req.widths[2],
    };
    ctx.model = proxy.as_ref();
    let built = build(&ctx).map_err(|e| e.to_string())?;
    drop(ctx);
    let add = host
        .add_parameter
        .ok_or("the host's `add_parameter` is null")?;
    for (name, t, trainable) in variables(&vs) {
        let c_name = CString::new(name).map_err(|e| e.to_string())?;
        // SAFETY: the host's function with its context, a name and a lent tensor.
        let error = unsafe { add(host.ctx, c_name.as_ptr(), lend(&t), u8::from(trainable)) };
        host_result(error, host.free_string)?;
    }
    Ok((built, vs, proxy, view))
}

/// The host's text encoder as a generator sees it while it builds: its
/// word-embedding matrix (shared with the host, so a tied decoder trains
/// the host's embeddings), or `None` when the host offers none.
///
/// # Safety
/// `host` is the host's valid table.
unsafe fn tied_text(host: &BuildHost) -> Result<Option<Rc<dyn Encoder>>, String> {
    let Some(get) = host.word_embeddings else {
        return Ok(None);
    };
    let mut out: TensorHandle = std::ptr::null_mut();
    // SAFETY: the host's function with its context and an out-pointer.
    host_result(unsafe { get(host.ctx, &mut out) }, host.free_string)?;
    // SAFETY: a non-null handle is given.
    Ok((!out.is_null()).then(|| Rc::new(TiedText(unsafe { take(out) })) as Rc<dyn Encoder>))
}

/// See [`tied_text`]: only `word_embeddings` answers.
struct TiedText(Tensor);

impl Encoder for TiedText {
    fn modality(&self) -> vlmatch_core::Modality {
        vlmatch_core::Modality::Text
    }
    fn hidden_size(&self) -> i64 {
        self.0.size().last().copied().unwrap_or(0)
    }
    fn forward_t(
        &self,
        _: vlmatch_core::EncoderInput<'_>,
        _: bool,
    ) -> vlmatch_core::Result<vlmatch_core::Encoded> {
        Err(vlmatch_core::Error::Config(
            "a plugin in a library sees the text encoder only through its word embeddings".into(),
        ))
    }
    fn word_embeddings(&self) -> Option<Tensor> {
        Some(self.0.shallow_clone())
    }
}

/// `vs`'s variables: trainable ones in creation order, then the others by name.
fn variables(vs: &nn::VarStore) -> Vec<(String, Tensor, bool)> {
    let vars = vs.variables_.lock().unwrap_or_else(|e| e.into_inner());
    let name_of = |t: &Tensor| {
        vars.named_variables
            .iter()
            .find(|(_, v)| v.data_ptr() == t.data_ptr() && v.size() == t.size())
            .map(|(n, _)| n.clone())
    };
    let mut out: Vec<(String, Tensor, bool)> = vars
        .trainable_variables
        .iter()
        .filter_map(|v| Some((name_of(&v.tensor)?, v.tensor.shallow_clone(), true)))
        .collect();
    let mut rest: Vec<(String, Tensor, bool)> = vars
        .named_variables
        .iter()
        .filter(|(n, _)| !out.iter().any(|(m, _, _)| m == *n))
        .map(|(n, t)| (n.clone(), t.shallow_clone(), false))
        .collect();
    rest.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(rest);
    out
}
