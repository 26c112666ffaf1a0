//! The plugin side of encoders, objectives and negative samplers in a library, compiled into
//! the library (its copy of this crate): the table of every encoder and
//! objective the library registers with [`crate::register!`], each behind
//! C functions that catch panics, and what those functions hand the
//! plugin's own factory and trait methods: a [`BuildContext`] over its
//! section, a `VarStore` whose variables then join the host's, and, for
//! objectives, a [`Forward`] over the host's batch whose model calls back
//! into the host. Reading the request and building: [`request`];
//! generators and discriminators: [`heads`]; hooks: [`hooks`].

mod heads;
mod hooks;
mod request;

use super::abi::{
    catch_panics, destroy_boxed, free_own_string, give, lend, static_c, status, BuildHost,
    EncoderCall, EncoderVTable, ForwardHost, NegativeSamplerVTable, NegativesOut, ObjectiveVTable,
    PluginInfo, PluginTable, SamplerVTable, TensorHandle, LIBTORCH_VERSION, RUSTC_VERSION,
    TCH_VERSION,
};
use super::calls::{give_encoded, modality_code, OwnedInput};
use super::view::{host_result, proxy_model, with_forward};
use crate::{BuildContext, Factory, Kind, Registry};
use request::{build, Request};
use std::cell::Cell;
use std::ffi::{c_char, c_void, CString};
use std::rc::Rc;
use std::sync::OnceLock;
use tch::{nn, Device};
use vlmatch_core::{Encoder, NegativeSampler, Negatives, Objective, SamplerInput, VlModel};

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
    _hooks: Vec<super::abi::HookVTable>,
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
        let (mut generators, mut discriminators, mut hooks) = (Vec::new(), Vec::new(), Vec::new());
        for e in registry.entries() {
            match e.factory {
                Factory::Encoder(f) => encoders.push(EncoderVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const EncoderFactory as *const c_void,
                    create: Some(create_encoder),
                    forward: Some(encoder_forward),
                    word_embeddings: Some(encoder_word_embeddings),
                    destroy: Some(destroy_boxed::<EncoderState>),
                    layout: layout_of(&registry, Kind::Encoder, &e.name),
                }),
                Factory::Objective(f) => objectives.push(ObjectiveVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const ObjectiveFactory as *const c_void,
                    create: Some(create_objective),
                    forward: Some(objective_forward),
                    destroy: Some(destroy_boxed::<ObjectiveState>),
                }),
                Factory::NegativeSampler(f) => negative.push(NegativeSamplerVTable {
                    name: static_c(&e.name),
                    data: Box::leak(Box::new(f)) as *const NegativeSamplerFactory as *const c_void,
                    create: Some(create_negative_sampler),
                    sample: Some(negative_sample),
                    destroy: Some(destroy_boxed::<NegativeSamplerState>),
                }),
                Factory::Generator(f) => generators.push(heads::generator_vtable(
                    &e.name,
                    f,
                    layout_of(&registry, Kind::Generator, &e.name),
                )),
                Factory::Discriminator(f) => {
                    discriminators.push(heads::discriminator_vtable(&e.name, f))
                }
                Factory::Hook(f) => hooks.push(hooks::hook_vtable(&e.name, f)),
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
            n_hooks: hooks.len(),
            hooks: hooks.as_ptr(),
        };
        let tables = TABLES.get_or_init(|| Tables {
            table,
            _samplers: samplers,
            _encoders: encoders,
            _objectives: objectives,
            _negative_samplers: negative,
            _generators: generators,
            _discriminators: discriminators,
            _hooks: hooks,
        });
        Ok(&tables.table as *const PluginTable)
    });
    built.unwrap_or(std::ptr::null())
}

/// The vtable of the layout `name` registered, leaked; null for none.
fn layout_of(registry: &Registry, kind: Kind, name: &str) -> *const super::abi::LayoutVTable {
    registry.layout(kind, name).map_or(std::ptr::null(), |l| {
        Box::leak(Box::new(super::layout::layout_vtable(l))) as *const _
    })
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
