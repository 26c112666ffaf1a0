//! What an objective or a negative sampler in a library sees of the host
//! (compiled into the library): the model's encoders, discriminator and
//! process group as proxies that call back into the host, and
//! [`with_forward`], a `Forward` over the host's batch for one call.

use super::abi::{lend, take, text, EncoderCall, ForwardHost, TensorHandle};
use super::calls::{lend_input, modality_of, take_encoded};
use std::cell::Cell;
use std::ffi::c_char;
use std::rc::Rc;
use tch::{nn, Device, Tensor};
use vlmatch_core::positives::PositiveRule;
use vlmatch_core::{
    Batch, Collective, ContrastiveHead, Discriminator, Encoded, Encoder, EncoderInput, Forward,
    Modality, TextBatch, VlModel,
};

/// Call a host function's result: its error string as text, freed by the host.
pub(crate) fn host_result(
    p: *mut c_char,
    free: Option<unsafe extern "C" fn(*mut c_char)>,
) -> Result<(), String> {
    // SAFETY: a host string or null.
    match unsafe { text(p) } {
        None => Ok(()),
        Some(message) => {
            if let Some(free) = free {
                // SAFETY: the host's string, freed once.
                unsafe { free(p) };
            }
            Err(message)
        }
    }
}

/// Modality and width of the model's encoders.
#[derive(serde::Deserialize)]
pub(crate) struct ModelFacts {
    image: (u32, i64),
    text: (u32, i64),
    fusion: (u32, i64),
}

/// The current forward's host table, or an error outside one.
fn current<'x>(view: &Cell<*const ForwardHost>) -> vlmatch_core::Result<&'x ForwardHost> {
    // SAFETY: set only for the duration of `objective_forward`, whose table
    // outlives every call made meanwhile.
    unsafe { view.get().as_ref() }.ok_or_else(|| {
        vlmatch_core::Error::Config(
            "the model is available to an objective in a library only during its forward".into(),
        )
    })
}

fn plugin_err(m: String) -> vlmatch_core::Error {
    vlmatch_core::Error::Config(m)
}

/// The host's encoder of a model role.
struct ProxyEncoder {
    role: u32,
    modality: Modality,
    hidden_size: i64,
    view: Rc<Cell<*const ForwardHost>>,
}

impl ProxyEncoder {
    fn call(
        &self,
        input: EncoderInput<'_>,
        train: bool,
        cls: bool,
    ) -> vlmatch_core::Result<Encoded> {
        let host = current(&self.view)?;
        let (kind, handles) = lend_input(&input);
        let call = EncoderCall {
            kind,
            cls: u8::from(cls),
            train: u8::from(train),
            n: handles.len(),
            tensors: handles.as_ptr(),
        };
        let mut out: [TensorHandle; 2] = [std::ptr::null_mut(); 2];
        let encode = host
            .encode
            .ok_or_else(|| plugin_err("the host's `encode` is null".into()))?;
        // SAFETY: the host's function with its context; handles live through it.
        let error = unsafe { encode(host.ctx, self.role, &call, out.as_mut_ptr()) };
        host_result(error, host.free_string).map_err(plugin_err)?;
        // SAFETY: the host gave two handles.
        unsafe { take_encoded(out) }.map_err(plugin_err)
    }
}

impl Encoder for ProxyEncoder {
    fn modality(&self) -> Modality {
        self.modality
    }
    fn hidden_size(&self) -> i64 {
        self.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> vlmatch_core::Result<Encoded> {
        self.call(input, train, false)
    }
    fn forward_cls(&self, input: EncoderInput<'_>, train: bool) -> vlmatch_core::Result<Encoded> {
        self.call(input, train, true)
    }
}

/// One tensor from a host function that writes one.
fn one(
    host: &ForwardHost,
    call: impl FnOnce(*mut TensorHandle) -> *mut c_char,
) -> vlmatch_core::Result<Tensor> {
    let mut out: TensorHandle = std::ptr::null_mut();
    host_result(call(&mut out), host.free_string).map_err(plugin_err)?;
    if out.is_null() {
        return Err(plugin_err("the host returned no tensor".into()));
    }
    // SAFETY: a handle the host gave.
    Ok(unsafe { take(out) })
}

/// The host's discriminator.
struct ProxyDiscriminator {
    view: Rc<Cell<*const ForwardHost>>,
}

impl ProxyDiscriminator {
    fn call(&self, which: u32, fused: &Encoded) -> vlmatch_core::Result<Tensor> {
        let host = current(&self.view)?;
        let f = host
            .discriminate
            .ok_or_else(|| plugin_err("the host's `discriminate` is null".into()))?;
        // SAFETY: the host's function, lent handles, one out-pointer.
        one(host, |out| unsafe {
            f(host.ctx, which, lend(&fused.hidden), lend(&fused.mask), out)
        })
    }
}

impl Discriminator for ProxyDiscriminator {
    fn pair_logits(&self, fused: &Encoded) -> vlmatch_core::Result<Tensor> {
        self.call(0, fused)
    }
    fn token_logits(&self, fused: &Encoded) -> vlmatch_core::Result<Tensor> {
        self.call(1, fused)
    }
}

/// The host's process group.
struct ProxyCollective {
    view: Rc<Cell<*const ForwardHost>>,
}

impl ProxyCollective {
    fn op(&self, op: u32, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        let host = current(&self.view)?;
        let f = host
            .collective
            .ok_or_else(|| plugin_err("the host's `collective` is null".into()))?;
        // SAFETY: the host's function, a lent handle, one out-pointer.
        one(host, |out| unsafe { f(host.ctx, op, lend(t), out) })
    }
    fn facts(&self) -> (usize, usize) {
        current(&self.view).map_or((0, 1), |h| {
            (h.facts.rank as usize, h.facts.world_size as usize)
        })
    }
}

impl Collective for ProxyCollective {
    fn rank(&self) -> usize {
        self.facts().0
    }
    fn world_size(&self) -> usize {
        self.facts().1
    }
    fn all_gather_with_grad(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        self.op(0, t)
    }
    fn all_gather(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        self.op(1, t)
    }
    fn all_reduce_sum(&self, t: &Tensor) -> vlmatch_core::Result<Tensor> {
        self.op(2, t)
    }
}

/// The model an objective in a library sees: the host's encoders and
/// discriminator behind callbacks; no generator; an ITC head of width 0
/// whose temperature is NaN (ITC logits are not exposed: the ITC
/// embeddings come from the host).
pub(crate) fn proxy_model(
    facts: Option<&ModelFacts>,
    view: &Rc<Cell<*const ForwardHost>>,
    dev: Device,
    head: &nn::VarStore,
) -> Result<VlModel, String> {
    let facts =
        facts.ok_or("an objective is built after the model, which the host did not describe")?;
    let encoder = |role: u32, (m, w): (u32, i64)| -> Result<Rc<dyn Encoder>, String> {
        Ok(Rc::new(ProxyEncoder {
            role,
            modality: modality_of(m).ok_or("unknown modality")?,
            hidden_size: w,
            view: view.clone(),
        }))
    };
    let contrastive = ContrastiveHead::new(&head.root(), 0, 0, 0);
    tch::no_grad(|| {
        for (_, mut t) in head.variables() {
            let _ = t.fill_(f64::NAN);
        }
    });
    Ok(VlModel {
        image: encoder(0, facts.image)?,
        text: encoder(1, facts.text)?,
        fusion: encoder(2, facts.fusion)?,
        contrastive,
        discriminator: Rc::new(ProxyDiscriminator { view: view.clone() }),
        generator: None,
        device: dev,
    })
}

/// Clears the current forward when the call ends, however it ends.
struct Current<'s>(&'s Cell<*const ForwardHost>);

impl Drop for Current<'_> {
    fn drop(&mut self) {
        self.0.set(std::ptr::null());
    }
}

/// The host's batch, as our own references.
fn batch(host: &ForwardHost) -> Result<Batch, String> {
    let f = host.batch.ok_or("the host's `batch` is null")?;
    let mut out: [TensorHandle; 6] = [std::ptr::null_mut(); 6];
    // SAFETY: the host's function; six out-handles.
    host_result(unsafe { f(host.ctx, out.as_mut_ptr()) }, host.free_string)?;
    if out.iter().any(|h| h.is_null()) {
        return Err("the host's batch has a null tensor".into());
    }
    // SAFETY: handles the host gave.
    let [images, ids, mask, image_ids, image_keys, sample_keys] = out.map(|h| unsafe { take(h) });
    let j = host.batch_json.ok_or("the host's `batch_json` is null")?;
    let mut json: *mut c_char = std::ptr::null_mut();
    // SAFETY: the host's function and an out-pointer.
    host_result(unsafe { j(host.ctx, &mut json) }, host.free_string)?;
    // SAFETY: a host string (our `free_string` convention: the host frees it).
    let text_json = unsafe { text(json) }.ok_or("the host's batch has no captions")?;
    if let Some(free) = host.free_string {
        // SAFETY: the host's string, freed once.
        unsafe { free(json) };
    }
    #[derive(serde::Deserialize)]
    struct Texts {
        captions: Vec<String>,
        sample_keys_host: Vec<i64>,
    }
    let texts: Texts = serde_json::from_str(&text_json).map_err(|e| e.to_string())?;
    Ok(Batch {
        images,
        text: TextBatch::new(ids, mask),
        image_ids,
        image_keys,
        positive_rule: if host.facts.positive_rule == 1 {
            PositiveRule::ImageId
        } else {
            PositiveRule::Identical
        },
        sample_keys,
        sample_keys_host: texts.sample_keys_host,
        captions: texts.captions,
        pairs: Vec::new(),
        prepared: Default::default(),
    })
}

/// Run `body` on a `Forward` over the host's batch of `host` (one call),
/// with `model`, whose proxies reach the host through `view`; then tell the
/// host how many keyed draws it made.
pub(crate) fn with_forward<R>(
    model: &VlModel,
    view: &Rc<Cell<*const ForwardHost>>,
    host: &ForwardHost,
    body: impl FnOnce(&Forward<'_>) -> vlmatch_core::Result<R>,
) -> Result<R, String> {
    view.set(host);
    let _current = Current(view);
    let batch = batch(host)?;
    let e = host.embeds.ok_or("the host's `embeds` is null")?;
    let mut out: [TensorHandle; 2] = [std::ptr::null_mut(); 2];
    // SAFETY: the host's function; two out-handles.
    host_result(unsafe { e(host.ctx, out.as_mut_ptr()) }, host.free_string)?;
    // SAFETY: handles the host gave.
    let embeds = unsafe { take_encoded(out) }?;
    let facts = host.facts;
    let mut forward = Forward::continuing(
        model,
        &batch,
        facts.train != 0,
        (facts.draw_seed, facts.draws),
    )
    .with_embeds(embeds.hidden, embeds.mask);
    if facts.world_size > 0 {
        forward = forward.with_collective(Rc::new(ProxyCollective { view: view.clone() }));
    }
    if facts.local_negatives != 0 {
        forward = forward.with_local_negatives();
    }
    let result = body(&forward).map_err(|e| e.to_string())?;
    let set_draws = host.set_draws.ok_or("the host's `set_draws` is null")?;
    // SAFETY: the host's function.
    host_result(
        unsafe { set_draws(host.ctx, forward.draw_state().1) },
        host.free_string,
    )?;
    Ok(result)
}
