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
mod forward;
mod heads;
mod hooks;
use create::{create_in, destroy, failed, library_error, loaded, Loaded, LOADED};
use forward::{forward_table, View};
pub use heads::{build_discriminator, build_generator};
pub use hooks::build_hook;

use super::abi::{take, EncoderCall, NegativesOut, TensorHandle};
use super::calls::{lend_input, modality_of, take_encoded};
use super::load::{load, EncoderSpec, NegativeSamplerSpec, ObjectiveSpec};
use crate::registration::Entry;
use crate::{BuildContext, Factory, Kind, Registry};
use std::cell::RefCell;
use std::ffi::c_void;
use std::path::Path;
use std::rc::Rc;
use tch::Tensor;
use vlmatch_core::{
    Encoded, Encoder, EncoderInput, Forward, Modality, NegativeSampler, Negatives, Objective,
    ObjectiveOutput, Result, SamplerInput,
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
