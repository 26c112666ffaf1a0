//! The library side of generators and discriminators: their vtables, and
//! the C functions behind them, which build the plugin with its own
//! factory (a generator sees the host's word embeddings to tie to) and run
//! it on the host's lent states, panics caught.

use super::super::abi::{
    borrow, destroy_boxed, static_c, status, BuildHost, DiscriminatorVTable, FillCall,
    GeneratorVTable, PluginInfo, TensorHandle,
};
use super::super::calls::{borrow_encoded, discriminate, give_all};
use super::request::build;
use crate::BuildContext;
use std::ffi::{c_char, c_void};
use std::rc::Rc;
use tch::nn;
use vlmatch_core::{Discriminator, FillOptions, Generator};

type Factory<T> = fn(&BuildContext<'_>) -> vlmatch_core::Result<Rc<T>>;
type GeneratorFactory = Factory<dyn Generator>;
type DiscriminatorFactory = Factory<dyn Discriminator>;

/// The vtable of generator `name`, built by `factory`.
pub(super) fn generator_vtable(
    name: &str,
    factory: GeneratorFactory,
    layout: *const super::super::abi::LayoutVTable,
) -> GeneratorVTable {
    GeneratorVTable {
        name: static_c(name),
        data: Box::leak(Box::new(factory)) as *const GeneratorFactory as *const c_void,
        create: Some(create_head::<dyn Generator>),
        logits: Some(generator_logits),
        fill: Some(generator_fill),
        destroy: Some(destroy_boxed::<Head<dyn Generator>>),
        layout,
    }
}

/// The vtable of discriminator `name`, built by `factory`.
pub(super) fn discriminator_vtable(
    name: &str,
    factory: DiscriminatorFactory,
) -> DiscriminatorVTable {
    DiscriminatorVTable {
        name: static_c(name),
        data: Box::leak(Box::new(factory)) as *const DiscriminatorFactory as *const c_void,
        create: Some(create_head::<dyn Discriminator>),
        logits: Some(discriminator_logits),
        destroy: Some(destroy_boxed::<Head<dyn Discriminator>>),
    }
}

/// A generator's or discriminator's state: the plugin and its `VarStore`
/// (whose variables the host holds too).
struct Head<T: ?Sized> {
    plugin: Rc<T>,
    _vs: nn::VarStore,
}

/// `create` of a generator (`T = dyn Generator`) or a discriminator:
/// build with the factory the vtable was made with (`data`) into `state`.
unsafe extern "C" fn create_head<T: ?Sized + 'static>(
    data: *const c_void,
    request: *const c_char,
    host: *const BuildHost,
    state: *mut *mut c_void,
    _info: *mut PluginInfo,
) -> *mut c_char {
    status(|| {
        // SAFETY: `data` is the factory this vtable was made with.
        let factory = unsafe { *(data as *const Factory<T>) };
        // SAFETY: the host's request and table.
        let (plugin, vs, _, _) = unsafe { build(request, host, |_, _, _| Ok(None), factory) }?;
        let head = Head { plugin, _vs: vs };
        if state.is_null() {
            return Err("no out-pointer for the state".into());
        }
        // SAFETY: a valid out-pointer from the host.
        unsafe { *state = Box::into_raw(Box::new(head)) as *mut c_void };
        Ok(())
    })
}

unsafe extern "C" fn generator_logits(
    state: *mut c_void,
    hidden: TensorHandle,
    mask: TensorHandle,
    train: u8,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state; the host's lent states and out-pointer.
        let s = unsafe { &*(state as *const Head<dyn Generator>) };
        let states = unsafe { borrow_encoded(hidden, mask) }?;
        let t = s
            .plugin
            .logits(&states, train != 0)
            .map_err(|e| e.to_string())?;
        unsafe { give_all(vec![t], out) }
    })
}

unsafe extern "C" fn generator_fill(
    state: *mut c_void,
    call: *const FillCall,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state; the host's call (lent tensors) and out-pointer.
        let s = unsafe { &*(state as *const Head<dyn Generator>) };
        let c = unsafe { call.as_ref() }.ok_or("no call")?;
        let handles = [c.logits, c.original, c.positions, c.keys];
        if handles.iter().any(|h| h.is_null()) {
            return Err("a null tensor in the call".into());
        }
        let [logits, original, positions, keys] = handles.map(|h| unsafe { borrow(h) });
        let opts = FillOptions {
            temperature: c.temperature,
            forbid_original: c.forbid_original != 0,
        };
        let t = s
            .plugin
            .fill(&logits, &original, &positions, opts, &keys)
            .map_err(|e| e.to_string())?;
        unsafe { give_all(vec![t], out) }
    })
}

unsafe extern "C" fn discriminator_logits(
    state: *mut c_void,
    which: u32,
    hidden: TensorHandle,
    mask: TensorHandle,
    out: *mut TensorHandle,
) -> *mut c_char {
    status(|| {
        // SAFETY: our state; the host's lent states and out-pointer.
        let s = unsafe { &*(state as *const Head<dyn Discriminator>) };
        let fused = unsafe { borrow_encoded(hidden, mask) }?;
        let t = discriminate(s.plugin.as_ref(), which, &fused)?;
        unsafe { give_all(vec![t], out) }
    })
}
