//! The plugin side of encoders, objectives and negative samplers in a library, compiled into
//! the library (its copy of this crate): the table of every encoder and
//! objective the library registers with [`crate::register!`], each behind
//! C functions that catch panics, and what those functions hand the
//! plugin's own factory and trait methods: a [`BuildContext`] over its
//! section, a `VarStore` whose variables then join the host's, and, for
//! objectives, a [`Forward`] over the host's batch whose model calls back
//! into the host. Generators and discriminators: [`heads`].

mod heads;

use super::abi::{
    catch_panics, free_own_string, give, lend, static_c, status, take, text, BuildHost,
    EncoderCall, EncoderVTable, ForwardHost, NegativeSamplerVTable, NegativesOut, ObjectiveVTable,
    PluginInfo, PluginTable, SamplerVTable, TensorHandle, LIBTORCH_VERSION, RUSTC_VERSION,
    TCH_VERSION,
};
use super::calls::{give_encoded, modality_code, OwnedInput};
use super::view::{host_result, proxy_model, with_forward, ModelFacts};
use crate::assemble::{ModelEnv, Sections, Widths};
use crate::{BuildContext, Factory, Registry};
use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::rc::Rc;
use std::sync::OnceLock;
use tch::{nn, Device, Tensor};
use vlmatch_core::{
    Encoder, NegativeSampler, Negatives, Objective, SamplerInput, SpecialTokens, TextBatch,
    TextCodec, VlModel,
};

type EncoderFactory = fn(&BuildContext<'_>) -> vlmatch_core::Result<Rc<dyn Encoder>>;
type ObjectiveFactory = fn(&BuildContext<'_>) -> vlmatch_core::Result<Box<dyn Objective>>;
type NegativeSamplerFactory =
    fn(&BuildContext<'_>) -> vlmatch_core::Result<Box<dyn NegativeSampler>>;

struct Tables {
    table: PluginTable,
    _samplers: Vec<SamplerVTable>,
    _encoders: Vec<EncoderVTable>,
    _objectives: Vec<ObjectiveVTable>,
    _negative_samplers: Vec<NegativeSamplerVTable>,
    _generators: Vec<super::abi::GeneratorVTable>,
    _discriminators: Vec<super::abi::DiscriminatorVTable>,
}

// SAFETY: built once, then only read (see the vtables' impls).
unsafe impl Sync for Tables {}
unsafe impl Send for Tables {}

static TABLES: OnceLock<Tables> = OnceLock::new();

/// The library's plugin table (the export macro's entry calls it): the
/// `samplers` given and every encoder and objective registered in the
/// library; null if building it failed or panicked.
pub fn table(
    vlmatch_version: &'static str,
    abi: u32,
    samplers: impl FnOnce() -> Vec<SamplerVTable>,
) -> *const PluginTable {
    let built = catch_panics(|| {
        if let Some(t) = TABLES.get() {
            return Ok(&t.table as *const PluginTable);
        }
        // The library's copy of std has its own panic hook: its panics are
        // caught and returned as errors, so one line each is enough.
        std::panic::set_hook(Box::new(|info| {
            let at = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            eprintln!("a plugin library panicked{at} (caught; the host reports it)");
        }));
        let registry = Registry::from_inventory().map_err(|e| e.to_string())?;
        let (mut encoders, mut objectives, mut negative) = (Vec::new(), Vec::new(), Vec::new());
        let (mut generators, mut discriminators) = (Vec::new(), Vec::new());
        for e in registry.entries() {
            match e.factory {
                Factory::Encoder(f) => encoders.push(EncoderVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const EncoderFactory as *const c_void,
                    create: Some(create_encoder),
                    forward: Some(encoder_forward),
                    word_embeddings: Some(encoder_word_embeddings),
                    destroy: Some(destroy_encoder),
                }),
                Factory::Objective(f) => objectives.push(ObjectiveVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const ObjectiveFactory as *const c_void,
                    create: Some(create_objective),
                    forward: Some(objective_forward),
                    destroy: Some(destroy_objective),
                }),
                Factory::NegativeSampler(f) => negative.push(NegativeSamplerVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const NegativeSamplerFactory as *const c_void,
                    create: Some(create_negative_sampler),
                    sample: Some(negative_sample),
                    destroy: Some(destroy_negative_sampler),
                }),
                Factory::Generator(f) => generators.push(heads::generator_vtable(&e.name, f)),
                Factory::Discriminator(f) => {
                    discriminators.push(heads::discriminator_vtable(&e.name, f))
                }
                _ => {}
            }
        }
        let samplers = samplers();
        let table = PluginTable {
            abi_version: abi,
            rustc_version: static_c(RUSTC_VERSION),
            vlmatch_version: static_c(vlmatch_version),
            tch_version: static_c(TCH_VERSION),
            libtorch_version: static_c(LIBTORCH_VERSION),
            free_string: Some(free_own_string),
            n_samplers: samplers.len(),
            samplers: samplers.as_ptr(),
            n_encoders: encoders.len(),
            encoders: encoders.as_ptr(),
            n_objectives: objectives.len(),
            objectives: objectives.as_ptr(),
            n_negative_samplers: negative.len(),
            negative_samplers: negative.as_ptr(),
            n_generators: generators.len(),
            generators: generators.as_ptr(),
            n_discriminators: discriminators.len(),
            discriminators: discriminators.as_ptr(),
        };
        let tables = TABLES.get_or_init(|| Tables {
            table,
            _samplers: samplers,
            _encoders: encoders,
            _objectives: objectives,
            _negative_samplers: negative,
            _generators: generators,
            _discriminators: discriminators,
        });
        Ok(&tables.table as *const PluginTable)
    });
    built.unwrap_or(std::ptr::null())
}

/// What `create` gets from the host (see `host::request`).
#[derive(serde::Deserialize)]
struct Request {
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
    model: Option<ModelFacts>,
}

fn device(name: &str) -> Result<Device, String> {
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
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 4)")
    }
    fn token(&self, _: i64) -> String {
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 4)")
    }
    fn pieces(&self, _: &str) -> Vec<i64> {
        panic!("the run's tokenizer is not exposed to plugins in a library (ABI 4)")
    }
}

/// What [`build`] made: the plugin, its `VarStore`, the model an objective
/// sees and the slot of the current forward's host table.
type Built<T> = (
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
unsafe fn build<T>(
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

struct EncoderState {
    encoder: Rc<dyn Encoder>,
    _vs: nn::VarStore,
}

unsafe extern "C" fn create_encoder(
    data: *const c_void,
    request: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    info: *mut PluginInfo,
) -> *mut c_char {
    status(|| {
        // SAFETY: `data` is the factory this vtable was made with.
        let factory = unsafe { *(data as *const EncoderFactory) };
        // SAFETY: the host's request and table.
        let (encoder, vs, _, _) = unsafe { build(request, host, |_, _, _| Ok(None), factory) }?;
        let summary = PluginInfo {
            modality: modality_code(encoder.modality()),
            hidden_size: encoder.hidden_size(),
            contrastive: 0,
        };
        // SAFETY: valid out-pointers from the host.
        unsafe {
            *info = summary;
            *state = Box::into_raw(Box::new(EncoderState { encoder, _vs: vs })) as *mut c_void;
        }
        Ok(())
    })
}

unsafe extern "C" fn encoder_forward(
    state: *mut c_void,
    call: *const EncoderCall,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state; the host's call and out-array of two.
        let s = unsafe { &*(state as *const EncoderState) };
        let call = unsafe { call.as_ref() }.ok_or("no call")?;
        let input = unsafe { OwnedInput::read(call) }?;
        let train = call.train != 0;
        let e = if call.cls != 0 {
            s.encoder.forward_cls(input.input(), train)
        } else {
            s.encoder.forward_t(input.input(), train)
        }
        .map_err(|e| e.to_string())?;
        unsafe { give_encoded(e, out) };
        Ok(())
    })
}

unsafe extern "C" fn encoder_word_embeddings(
    state: *mut c_void,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state and the host's out-pointer.
        let s = unsafe { &*(state as *const EncoderState) };
        let h = s
            .encoder
            .word_embeddings()
            .map(give)
            .unwrap_or(std::ptr::null_mut());
        unsafe { *out = h };
        Ok(())
    })
}

unsafe extern "C" fn destroy_encoder(state: *mut c_void) -> *mut c_char {
    status(|| {
        if !state.is_null() {
            // SAFETY: from `create_encoder`, destroyed once.
            drop(unsafe { Box::from_raw(state as *mut EncoderState) });
        }
        Ok(())
    })
}

/// The state of a library's objective or negative sampler: the plugin, and
/// the model proxy through which it reads the host's forward.
struct Modelled<T: ?Sized> {
    plugin: Box<T>,
    model: VlModel,
    view: Rc<Cell<*const ForwardHost>>,
    _vs: nn::VarStore,
    _head: nn::VarStore,
}

type ObjectiveState = Modelled<dyn Objective>;
type NegativeSamplerState = Modelled<dyn NegativeSampler>;

/// Builds a plugin that reads the host's forward through a model proxy
/// (objectives and negative samplers) into `state`, with `info(&plugin)`.
///
/// # Safety
/// The host's request, table and out-pointers, valid for this call.
unsafe fn create_modelled<T: ?Sized + 'static>(
    request: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    info: *mut PluginInfo,
    factory: impl FnOnce(&BuildContext<'_>) -> vlmatch_core::Result<Box<T>>,
    summary: impl FnOnce(&T) -> PluginInfo,
) -> Result<(), String> {
    let head = nn::VarStore::new(Device::Cpu);
    let model = |req: &Request, view: &Rc<Cell<*const ForwardHost>>, dev| {
        proxy_model(req.model.as_ref(), view, dev, &head).map(Some)
    };
    // SAFETY: the host's request and table.
    let (plugin, vs, model, view) = unsafe { build(request, host, model, factory) }?;
    let summary = summary(&plugin);
    let s = Modelled {
        plugin,
        model: model.ok_or("the model proxy was not built")?,
        view,
        _vs: vs,
        _head: head,
    };
    // SAFETY: valid out-pointers from the host.
    unsafe {
        *info = summary;
        *state = Box::into_raw(Box::new(s)) as *mut c_void;
    }
    Ok(())
}

/// Drops a [`Modelled`] state made by [`create_modelled`].
///
/// # Safety
/// `state` is null or came from `create_modelled` with the same `T`, and
/// is destroyed once.
unsafe fn destroy_modelled<T: ?Sized>(state: *mut c_void) -> *mut c_char {
    status(|| {
        if !state.is_null() {
            // SAFETY: as the caller promises.
            drop(unsafe { Box::from_raw(state as *mut Modelled<T>) });
        }
        Ok(())
    })
}

unsafe extern "C" fn create_objective(
    data: *const c_void,
    request: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    info: *mut PluginInfo,
) -> *mut c_char {
    status(|| {
        // SAFETY: `data` is the factory this vtable was made with.
        let factory = unsafe { *(data as *const ObjectiveFactory) };
        // SAFETY: the host's request, table and out-pointers.
        unsafe {
            create_modelled(
                request,
                host,
                state,
                info,
                factory,
                |o: &(dyn Objective + 'static)| PluginInfo {
                    modality: 0,
                    hidden_size: 0,
                    contrastive: u8::from(o.contrastive()),
                },
            )
        }
    })
}

unsafe extern "C" fn objective_forward(
    state: *mut c_void,
    view: *const ForwardHost,
    step: i64,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state and the host's table for this call.
        let s = unsafe { &*(state as *const ObjectiveState) };
        let host = unsafe { view.as_ref() }.ok_or("no forward table")?;
        let output = with_forward(&s.model, &s.view, host, |f| s.plugin.forward(f, step))?;
        let emit = host.emit.ok_or("the host's `emit` is null")?;
        for (metric, list) in [(0u8, &output.losses), (1, &output.metrics)] {
            for (name, t) in list {
                let name = CString::new(name.as_str()).map_err(|e| e.to_string())?;
                // SAFETY: the host's function, a name and a lent tensor.
                host_result(
                    unsafe { emit(host.ctx, metric, name.as_ptr(), lend(t)) },
                    host.free_string,
                )?;
            }
        }
        Ok(())
    })
}

unsafe extern "C" fn destroy_objective(state: *mut c_void) -> *mut c_char {
    // SAFETY: from `create_objective`, destroyed once by the host.
    unsafe { destroy_modelled::<dyn Objective>(state) }
}

unsafe extern "C" fn create_negative_sampler(
    data: *const c_void,
    request: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    info: *mut PluginInfo,
) -> *mut c_char {
    status(|| {
        // SAFETY: `data` is the factory this vtable was made with.
        let factory = unsafe { *(data as *const NegativeSamplerFactory) };
        // SAFETY: the host's request, table and out-pointers.
        unsafe {
            create_modelled(
                request,
                host,
                state,
                info,
                factory,
                |_: &(dyn NegativeSampler + 'static)| PluginInfo::default(),
            )
        }
    })
}

unsafe extern "C" fn negative_sample(
    state: *mut c_void,
    view: *const ForwardHost,
    step: i64,
    out: *mut NegativesOut,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state, the host's table and out-pointer for this call.
        let s = unsafe { &*(state as *const NegativeSamplerState) };
        let host = unsafe { view.as_ref() }.ok_or("no forward table")?;
        let out = unsafe { out.as_mut() }.ok_or("no out-pointer")?;
        let negatives = with_forward(&s.model, &s.view, host, |forward| {
            s.plugin.sample(&SamplerInput { forward, step })
        })?;
        let (kind, tensors) = match negatives {
            Negatives::InBatch {
                text_for_image,
                image_for_text,
            } => (0, vec![text_for_image, image_for_text]),
            Negatives::Texts { image_index, text } => (1, vec![image_index, text.ids, text.mask]),
        };
        out.kind = kind;
        for (slot, t) in out.tensors.iter_mut().zip(tensors) {
            *slot = give(t);
        }
        Ok(())
    })
}

unsafe extern "C" fn destroy_negative_sampler(state: *mut c_void) -> *mut c_char {
    // SAFETY: from `create_negative_sampler`, destroyed once by the host.
    unsafe { destroy_modelled::<dyn NegativeSampler>(state) }
}
