//! The host side of generators and discriminators in a library: the
//! factories the registry's entries point to, and the [`Generator`] and
//! [`Discriminator`] that call into the library on lent states.

use super::super::abi::{lend, take, FillCall, TensorHandle};
use super::super::load::{DiscriminatorSpec, GeneratorSpec};
use super::create::{create_in, destroy, failed, library_error, loaded, Loaded};
use crate::{BuildContext, Kind};
use std::ffi::{c_char, c_void};
use std::rc::Rc;
use tch::Tensor;
use vlmatch_core::{Discriminator, Encoded, FillOptions, Generator, Result};

/// The one handle a library call wrote, or the call's error naming the
/// plugin, the call and the library.
fn one_out(
    name: &str,
    library: &str,
    call: &str,
    free: super::super::abi::FreeStringFn,
    run: impl FnOnce(*mut TensorHandle) -> *mut c_char,
) -> Result<Tensor> {
    let mut out: TensorHandle = std::ptr::null_mut();
    let error = run(&mut out);
    // SAFETY: an error string of this library.
    if let Some(message) = unsafe { library_error(error, free) } {
        return Err(failed(name, library, call, &message));
    }
    if out.is_null() {
        return Err(failed(name, library, call, "it returned no tensor"));
    }
    // SAFETY: on success the library gave one handle.
    Ok(unsafe { take(out) })
}

/// The factory of every generator from a library.
pub fn build_generator(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let Loaded::Generator(spec) = loaded(Kind::Generator, ctx.plugin)? else {
        unreachable!("a generator entry")
    };
    let (state, _) = create_in(ctx, spec)?;
    Ok(Rc::new(HostGenerator { spec, state }))
}

/// A generator of a library, as the host uses it.
struct HostGenerator {
    spec: &'static GeneratorSpec,
    state: *mut c_void,
}

impl Drop for HostGenerator {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

impl Generator for HostGenerator {
    fn logits(&self, states: &Encoded, train: bool) -> Result<Tensor> {
        let s = self.spec;
        one_out(&s.name, &s.library, "logits", s.free_string, |out| {
            // SAFETY: our state; the states are lent through the call.
            unsafe {
                (s.logits)(
                    self.state,
                    lend(&states.hidden),
                    lend(&states.mask),
                    u8::from(train),
                    out,
                )
            }
        })
    }

    /// The library's own `fill` (its trait default unless it overrides it).
    fn fill(
        &self,
        logits: &Tensor,
        original: &Tensor,
        positions: &Tensor,
        opts: FillOptions,
        keys: &Tensor,
    ) -> Result<Tensor> {
        let s = self.spec;
        let call = FillCall {
            logits: lend(logits),
            original: lend(original),
            positions: lend(positions),
            keys: lend(keys),
            temperature: opts.temperature,
            forbid_original: u8::from(opts.forbid_original),
        };
        one_out(&s.name, &s.library, "fill", s.free_string, |out| {
            // SAFETY: our state; the call's tensors live through it.
            unsafe { (s.fill)(self.state, &call, out) }
        })
    }
}

/// The factory of every discriminator from a library.
pub fn build_discriminator(ctx: &BuildContext<'_>) -> Result<Rc<dyn Discriminator>> {
    let Loaded::Discriminator(spec) = loaded(Kind::Discriminator, ctx.plugin)? else {
        unreachable!("a discriminator entry")
    };
    let (state, _) = create_in(ctx, spec)?;
    Ok(Rc::new(HostDiscriminator { spec, state }))
}

/// A discriminator of a library, as the host uses it.
struct HostDiscriminator {
    spec: &'static DiscriminatorSpec,
    state: *mut c_void,
}

impl Drop for HostDiscriminator {
    fn drop(&mut self) {
        let s = self.spec;
        destroy(self.state, s.destroy, s.free_string, &s.name, &s.library);
    }
}

impl HostDiscriminator {
    fn call(&self, which: u32, fused: &Encoded, what: &str) -> Result<Tensor> {
        let s = self.spec;
        one_out(&s.name, &s.library, what, s.free_string, |out| {
            // SAFETY: our state; the states are lent through the call.
            unsafe {
                (s.logits)(
                    self.state,
                    which,
                    lend(&fused.hidden),
                    lend(&fused.mask),
                    out,
                )
            }
        })
    }
}

impl Discriminator for HostDiscriminator {
    fn token_logits(&self, fused: &Encoded) -> Result<Tensor> {
        self.call(1, fused, "token_logits")
    }
    fn pair_logits(&self, fused: &Encoded) -> Result<Tensor> {
        self.call(0, fused, "pair_logits")
    }
}
