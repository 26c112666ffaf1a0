//! The host's per-batch forward cache as a library's objective, negative
//! sampler or hook reads it: the [`ForwardHost`] table over a [`View`] of
//! one call, and its callbacks (the batch, the embeddings, the model's
//! encoders and discriminator, the collective, the draw count, `emit`).

use super::super::abi::{
    borrow, free_host_string, status, text, EncoderCall, ForwardFacts, ForwardHost, TensorHandle,
};
use super::super::calls::{borrow_encoded, discriminate, give_all, OwnedInput};
use std::cell::RefCell;
use std::ffi::{c_char, c_void};
use tch::Tensor;
use vlmatch_core::{Encoder, Error, Forward, ObjectiveOutput};

/// What the callbacks of one objective call see.
pub(super) struct View<'f, 'a> {
    pub(super) forward: &'f Forward<'a>,
    pub(super) output: RefCell<ObjectiveOutput>,
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
        unsafe { *out = super::super::abi::error_string(&json.to_string()) };
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
        let fused = unsafe { borrow_encoded(hidden, mask) }?;
        let t = discriminate(f.model.discriminator.as_ref(), which, &fused)?;
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
pub(super) fn forward_table(v: &View<'_, '_>, local_negatives: bool) -> ForwardHost {
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
