//! The host side of a library's plugins: loading a library into a
//! [`Registry`] (its plugins become entries whose factories are
//! [`build_encoder`], [`build_objective`], [`build_negative_sampler`],
//! [`build_generator`], [`build_discriminator`] and [`build_hook`]), the
//! [`Encoder`], [`Objective`] and [`NegativeSampler`] that call into the
//! library (the generator and discriminator: `host/heads.rs`; hooks:
//! `host/hooks.rs`), and the callbacks of an objective's or sampler's
//! forward, reading the per-batch [`Forward`] cache. Creating a plugin and
//! its build callbacks: `host/create.rs`.

mod create;
mod heads;
mod hooks;
use create::{create_in, destroy, failed, library_error, loaded, Loaded, LOADED};
pub use heads::{build_discriminator, build_generator};
pub use hooks::build_hook;

use super::abi::{
    borrow, free_host_string, give, status, take, text, EncoderCall, ForwardFacts, ForwardHost,
    NegativesOut, TensorHandle,
};
use super::calls::{lend_input, modality_of, take_encoded, OwnedInput};
use super::load::{load, EncoderSpec, NegativeSamplerSpec, ObjectiveSpec};
use crate::registration::Entry;
use crate::{BuildContext, Factory, Kind, Registry};
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use std::path::Path;
use std::rc::Rc;
use tch::Tensor;
use vlmatch_core::{
    Encoded, Encoder, EncoderInput, Error, Forward, Modality, NegativeSampler, Negatives,
    Objective, ObjectiveOutput, Result, SamplerInput,
};

impl Registry {
    /// Load a dynamic plugin library and register its plugins (origin:
    /// `library <canonical path>`); their names. The library is never
    /// unloaded and is opened and checked before anything else of it is
    /// called ([`super::load`]).
    pub fn load_library(&mut self, path: &Path) -> Result<Vec<String>> {
        let library = load(path)?;
        let origin = format!("library {}", library.path.display());
        let mut entries: Vec<(String, Factory, Option<Loaded>)> = Vec::new();
        for s in &library.samplers {
            entries.push((s.name.clone(), Factory::DynamicSampler(s), None));
        }
        for s in &library.encoders {
            entries.push((
                s.name.clone(),
                Factory::Encoder(build_encoder),
                Some(Loaded::Encoder(s)),
            ));
        }
        for s in &library.objectives {
            let factory = Factory::Objective(build_objective);
            entries.push((s.name.clone(), factory, Some(Loaded::Objective(s))));
        }
        for s in &library.negative_samplers {
            let factory = Factory::NegativeSampler(build_negative_sampler);
            entries.push((s.name.clone(), factory, Some(Loaded::NegativeSampler(s))));
        }
        for s in &library.generators {
            let factory = Factory::Generator(build_generator);
            entries.push((s.name.clone(), factory, Some(Loaded::Generator(s))));
        }
        for s in &library.discriminators {
            let factory = Factory::Discriminator(build_discriminator);
            entries.push((s.name.clone(), factory, Some(Loaded::Discriminator(s))));
        }
        for s in &library.hooks {
            let factory = Factory::Hook(build_hook);
            entries.push((s.name.clone(), factory, Some(Loaded::Hook(s))));
        }
        let refuse = |e: String| super::abi::refuse(&library.path, e);
        let mut names = Vec::new();
        for (name, factory, spec) in entries {
            if let Some(spec) = spec {
                let key = (factory.kind(), name.clone());
                let mut map = LOADED.lock().unwrap_or_else(|e| e.into_inner());
                match map.get(&key) {
                    Some(other) if other.library() != spec.library() => {
                        return Err(refuse(format!(
                            "{} `{name}` is already loaded in this process from library {}; rename one of them",
                            factory.kind(),
                            other.library()
                        )))
                    }
                    _ => map.insert(key, spec),
                };
            }
            self.insert(Entry {
                name: name.clone(),
                origin: origin.clone(),
                factory,
            })
            .map_err(|e| refuse(e.to_string()))?;
            names.push(name);
        }
        // Layouts once every entry is in (a clash above leaves none).
        for s in &library.encoders {
            if let Some(layout) = s.layout {
                self.insert_layout(Kind::Encoder, &s.name, layout);
            }
        }
        for s in &library.generators {
            if let Some(layout) = s.layout {
                self.insert_layout(Kind::Generator, &s.name, layout);
            }
        }
        Ok(names)
    }
}

/// The factory of every encoder from a library.
pub fn build_encoder(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let Loaded::Encoder(spec) = loaded(Kind::Encoder, ctx.plugin)? else {
        unreachable!("an encoder entry")
    };
    let (state, info) = create_in(ctx, spec)?;
    // The state is the library's from here: destroyed by `HostEncoder`'s
    // drop, or now, when the summary is bad.
    let encoder = HostEncoder {
        spec,
        state,
        modality: Modality::Image,
        hidden_size: info.hidden_size,
    };
    let modality = modality_of(info.modality).ok_or_else(|| {
        failed(
            &spec.name,
            &spec.library,
            "create",
            &format!("unknown modality {}", info.modality),
        )
    })?;
    let mut encoder = encoder;
    encoder.modality = modality;
    Ok(Rc::new(encoder))
}

/// An encoder of a library, as the host uses it.
struct HostEncoder {
    spec: &'static EncoderSpec,
    state: *mut c_void,
    modality: Modality,
    hidden_size: i64,
}

impl HostEncoder {
    fn call(&self, input: EncoderInput<'_>, train: bool, cls: bool) -> Result<Encoded> {
        let (kind, handles) = lend_input(&input);
        let call = EncoderCall {
            kind,
            cls: u8::from(cls),
            train: u8::from(train),
            n: handles.len(),
            tensors: handles.as_ptr(),
        };
        let mut out: [TensorHandle; 2] = [std::ptr::null_mut(); 2];
        // SAFETY: the state is ours, the call's handles live through it.
        let error = unsafe { (self.spec.forward)(self.state, &call, out.as_mut_ptr()) };
        // SAFETY: an error string of this library.
        if let Some(message) = unsafe { library_error(error, self.spec.free_string) } {
            return Err(failed(
                &self.spec.name,
                &self.spec.library,
                "forward",
                &message,
            ));
        }
        // SAFETY: on success the library gave two handles.
        unsafe { take_encoded(out) }
            .map_err(|m| failed(&self.spec.name, &self.spec.library, "forward", &m))
    }
}

impl Encoder for HostEncoder {
    fn modality(&self) -> Modality {
        self.modality
    }
    fn hidden_size(&self) -> i64 {
        self.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        self.call(input, train, false)
    }
    fn forward_cls(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        self.call(input, train, true)
    }
    fn word_embeddings(&self) -> Option<Tensor> {
        let mut out: TensorHandle = std::ptr::null_mut();
        // SAFETY: the state is ours; `out` is a valid out-pointer.
        let error = unsafe { (self.spec.word_embeddings)(self.state, &mut out) };
        // SAFETY: an error string of this library.
        if let Some(message) = unsafe { library_error(error, self.spec.free_string) } {
            let e = failed(
                &self.spec.name,
                &self.spec.library,
                "word_embeddings",
                &message,
            );
            tracing::error!("{e}");
            return None;
        }
        // SAFETY: a non-null handle is given.
        (!out.is_null()).then(|| unsafe { take(out) })
    }
}

impl Drop for HostEncoder {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

/// The factory of every objective from a library.
pub fn build_objective(ctx: &BuildContext<'_>) -> Result<Box<dyn Objective>> {
    let Loaded::Objective(spec) = loaded(Kind::Objective, ctx.plugin)? else {
        unreachable!("an objective entry")
    };
    let (state, info) = create_in(ctx, spec)?;
    Ok(Box::new(HostObjective {
        spec,
        state,
        contrastive: info.contrastive != 0,
        local_negatives: local_negatives(ctx),
    }))
}

/// Whether the run draws in-batch negatives from each rank's own pairs
/// (`train.dist.hard_negatives = "local"`, `Forward::with_local_negatives`).
fn local_negatives(ctx: &BuildContext<'_>) -> bool {
    use crate::config::HardNegatives;
    ctx.run_config()
        .is_some_and(|c| c.train.dist.hard_negatives == HardNegatives::Local)
}

/// An objective of a library, as the host uses it.
struct HostObjective {
    spec: &'static ObjectiveSpec,
    state: *mut c_void,
    contrastive: bool,
    local_negatives: bool,
}

impl Drop for HostObjective {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

/// What the callbacks of one objective call see.
struct View<'f, 'a> {
    forward: &'f Forward<'a>,
    output: RefCell<ObjectiveOutput>,
}

/// # Safety
/// `ctx` is the [`View`] lent for the current call.
unsafe fn view<'x>(ctx: *mut c_void) -> &'x View<'x, 'x> {
    // SAFETY: as the caller promises.
    unsafe { &*(ctx as *const View<'x, 'x>) }
}

fn str_err(e: Error) -> String {
    e.to_string()
}

/// # Safety
/// `out` has room for `tensors.len()` handles.
unsafe fn give_all(
    tensors: Vec<Tensor>,
    out: *mut TensorHandle,
) -> std::result::Result<(), String> {
    if out.is_null() {
        return Err("no out-array".into());
    }
    for (i, t) in tensors.into_iter().enumerate() {
        // SAFETY: as the caller promises.
        unsafe { *out.add(i) = give(t) };
    }
    Ok(())
}

unsafe extern "C" fn cb_batch(ctx: *mut c_void, out: *mut TensorHandle) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view; `out` holds six handles (the ABI).
        let b = unsafe { view(ctx) }.forward.batch;
        let t = [
            &b.images,
            &b.text.ids,
            &b.text.mask,
            &b.image_ids,
            &b.image_keys,
            &b.sample_keys,
        ];
        unsafe { give_all(t.iter().map(|t| t.shallow_clone()).collect(), out) }
    })
}

unsafe extern "C" fn cb_batch_json(ctx: *mut c_void, out: *mut *mut c_char) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view and a valid out-pointer.
        let b = unsafe { view(ctx) }.forward.batch;
        let json =
            serde_json::json!({"captions": b.captions, "sample_keys_host": b.sample_keys_host});
        unsafe { *out = super::abi::error_string(&json.to_string()) };
        Ok(())
    })
}

unsafe extern "C" fn cb_embeds(ctx: *mut c_void, out: *mut TensorHandle) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view; `out` holds two handles.
        let (i, t) = unsafe { view(ctx) }.forward.embeds().map_err(str_err)?;
        unsafe { give_all(vec![i.shallow_clone(), t.shallow_clone()], out) }
    })
}

/// Whether `a` is `b` (the same storage, shape and strides).
fn same(a: &Tensor, b: &Tensor) -> bool {
    a.data_ptr() == b.data_ptr() && a.size() == b.size() && a.stride() == b.stride()
}

unsafe extern "C" fn cb_encode(
    ctx: *mut c_void,
    role: u32,
    call: *const EncoderCall,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view and call.
        let f = unsafe { view(ctx) }.forward;
        let call = unsafe { call.as_ref() }.ok_or("no call")?;
        let input = unsafe { OwnedInput::read(call) }?;
        let (cls, train) = (call.cls != 0, call.train != 0);
        let cached = match (&input, role) {
            (OwnedInput::Image(t), 0) if same(t, &f.batch.images) && train == f.train => {
                Some(f.image().map_err(str_err)?)
            }
            (OwnedInput::Text(t), 1) if same(&t.ids, &f.batch.text.ids) && train == f.train => {
                Some(f.text().map_err(str_err)?)
            }
            _ => None,
        };
        let encoded = match cached {
            Some(e) if cls => e.position_zero(),
            Some(e) => e.shallow_clone(),
            None => {
                let encoder = match role {
                    0 => &f.model.image,
                    1 => &f.model.text,
                    2 => &f.model.fusion,
                    r => return Err(format!("unknown model role {r}")),
                };
                let run = if cls {
                    Encoder::forward_cls
                } else {
                    Encoder::forward_t
                };
                run(encoder.as_ref(), input.input(), train).map_err(str_err)?
            }
        };
        unsafe { give_all(vec![encoded.hidden, encoded.mask], out) }
    })
}

unsafe extern "C" fn cb_discriminate(
    ctx: *mut c_void,
    which: u32,
    hidden: TensorHandle,
    mask: TensorHandle,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view and handles.
        let f = unsafe { view(ctx) }.forward;
        let fused = unsafe {
            Encoded {
                hidden: borrow(hidden),
                mask: borrow(mask),
            }
        };
        let d = &f.model.discriminator;
        let t = match which {
            0 => d.pair_logits(&fused),
            _ => d.token_logits(&fused),
        }
        .map_err(str_err)?;
        unsafe { give_all(vec![t], out) }
    })
}

unsafe extern "C" fn cb_collective(
    ctx: *mut c_void,
    op: u32,
    tensor: TensorHandle,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view and handle.
        let f = unsafe { view(ctx) }.forward;
        let t = unsafe { borrow(tensor) };
        let c = f
            .collective()
            .ok_or("no process group: training on one process")?;
        let r = match op {
            0 => c.all_gather_with_grad(&t),
            1 => c.all_gather(&t),
            _ => c.all_reduce_sum(&t),
        }
        .map_err(str_err)?;
        unsafe { give_all(vec![r], out) }
    })
}

unsafe extern "C" fn cb_set_draws(ctx: *mut c_void, draws: i64) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view.
        unsafe { view(ctx) }.forward.set_draws(draws);
        Ok(())
    })
}

unsafe extern "C" fn cb_emit(
    ctx: *mut c_void,
    metric: u8,
    name: *const c_char,
    tensor: TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: the lent view, a NUL-terminated name and a live handle.
        let v = unsafe { view(ctx) };
        let name = unsafe { text(name) }.ok_or("an output without a name")?;
        let t = unsafe { borrow(tensor) };
        let mut out = v.output.borrow_mut();
        let list = if metric == 0 {
            &mut out.losses
        } else {
            &mut out.metrics
        };
        list.push((name, t));
        Ok(())
    })
}

/// The callback table over `v` for one call.
fn forward_table(v: &View<'_, '_>, local_negatives: bool) -> ForwardHost {
    let forward = v.forward;
    let (draw_seed, draws) = forward.draw_state();
    let facts = ForwardFacts {
        train: u8::from(forward.train),
        world_size: forward.collective().map_or(0, |c| c.world_size() as u64),
        rank: forward.collective().map_or(0, |c| c.rank() as u64),
        draw_seed,
        draws,
        positive_rule: match forward.batch.positive_rule {
            vlmatch_core::positives::PositiveRule::Identical => 0,
            vlmatch_core::positives::PositiveRule::ImageId => 1,
        },
        local_negatives: u8::from(local_negatives && forward.collective().is_some()),
    };
    ForwardHost {
        ctx: v as *const View<'_, '_> as *mut c_void,
        facts,
        batch: Some(cb_batch),
        batch_json: Some(cb_batch_json),
        embeds: Some(cb_embeds),
        encode: Some(cb_encode),
        discriminate: Some(cb_discriminate),
        collective: Some(cb_collective),
        set_draws: Some(cb_set_draws),
        emit: Some(cb_emit),
        free_string: Some(free_host_string),
    }
}

impl Objective for HostObjective {
    fn forward(&self, forward: &Forward<'_>, step: i64) -> Result<ObjectiveOutput> {
        let v = View {
            forward,
            output: RefCell::new(ObjectiveOutput::default()),
        };
        let host = forward_table(&v, self.local_negatives);
        // SAFETY: our state; `host` and the view live through the call.
        let error = unsafe { (self.spec.forward)(self.state, &host, step) };
        // SAFETY: an error string of this library.
        if let Some(message) = unsafe { library_error(error, self.spec.free_string) } {
            return Err(failed(
                &self.spec.name,
                &self.spec.library,
                "forward",
                &message,
            ));
        }
        Ok(v.output.into_inner())
    }
    fn contrastive(&self) -> bool {
        self.contrastive
    }
}

/// The factory of every negative sampler (the core trait) from a library.
pub fn build_negative_sampler(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let Loaded::NegativeSampler(spec) = loaded(Kind::NegativeSampler, ctx.plugin)? else {
        unreachable!("a negative sampler entry")
    };
    let (state, _) = create_in(ctx, spec)?;
    Ok(Box::new(HostNegativeSampler {
        spec,
        state,
        local_negatives: local_negatives(ctx),
    }))
}

/// A negative sampler of a library, as the host uses it.
struct HostNegativeSampler {
    spec: &'static NegativeSamplerSpec,
    state: *mut c_void,
    local_negatives: bool,
}

impl Drop for HostNegativeSampler {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

impl NegativeSampler for HostNegativeSampler {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let v = View {
            forward: input.forward,
            output: RefCell::new(ObjectiveOutput::default()),
        };
        let host = forward_table(&v, self.local_negatives);
        let mut out = NegativesOut {
            kind: 0,
            tensors: [std::ptr::null_mut(); 3],
        };
        let (name, library) = (&self.spec.name, &self.spec.library);
        // SAFETY: our state; `host`, the view and `out` live through the call.
        let error = unsafe { (self.spec.sample)(self.state, &host, input.step, &mut out) };
        // SAFETY: an error string of this library.
        if let Some(message) = unsafe { library_error(error, self.spec.free_string) } {
            return Err(failed(name, library, "sample", &message));
        }
        let n = if out.kind == 0 { 2 } else { 3 };
        if out.kind > 1 || out.tensors[..n].iter().any(|h| h.is_null()) {
            return Err(failed(name, library, "sample", "it returned no negatives"));
        }
        // SAFETY: on success the library gave `n` handles.
        let [a, b, c] = out
            .tensors
            .map(|h| (!h.is_null()).then(|| unsafe { take(h) }));
        Ok(match (a, b, c) {
            (Some(text_for_image), Some(image_for_text), None) => Negatives::InBatch {
                text_for_image,
                image_for_text,
            },
            (Some(image_index), Some(ids), Some(mask)) => Negatives::Texts {
                image_index,
                text: vlmatch_core::TextBatch::new(ids, mask),
            },
            _ => {
                return Err(failed(
                    name,
                    library,
                    "sample",
                    "its negatives do not match their kind",
                ))
            }
        })
    }
}
