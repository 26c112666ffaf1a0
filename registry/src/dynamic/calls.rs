//! Encoder calls across the boundary, both ways: an [`EncoderInput`] lent
//! as an [`EncoderCall`] and read back on the other side, and an
//! [`Encoded`] given as two handles.

use super::abi::{borrow, give, lend, take, EncoderCall, TensorHandle};
use tch::Tensor;
use vlmatch_core::{Discriminator, Encoded, EncoderInput, Modality, TextBatch};

/// The lent handles of `input` and its kind (see [`EncoderCall`]).
pub fn lend_input(input: &EncoderInput<'_>) -> (u32, Vec<TensorHandle>) {
    let enc = |e: &Encoded| [lend(&e.hidden), lend(&e.mask)];
    match input {
        EncoderInput::Image(t) => (0, vec![lend(t)]),
        EncoderInput::Text(t) => (1, vec![lend(&t.ids), lend(&t.mask)]),
        EncoderInput::Fused { text, image } => (2, [enc(text), enc(image)].concat()),
        EncoderInput::FusedPair { text, images } => {
            (3, [enc(text), enc(images[0]), enc(images[1])].concat())
        }
    }
}

/// An encoder input received: our own references to the lent tensors.
pub enum OwnedInput {
    Image(Tensor),
    Text(TextBatch),
    Fused(Encoded, Encoded),
    Pair(Encoded, [Encoded; 2]),
}

impl OwnedInput {
    /// Read `call`.
    ///
    /// # Safety
    /// `call` is a valid call whose `n` handles are live.
    pub unsafe fn read(call: &EncoderCall) -> Result<Self, String> {
        let expected = match call.kind {
            0 => 1,
            1 => 2,
            2 => 4,
            3 => 6,
            k => return Err(format!("unknown encoder input kind {k}")),
        };
        if call.n != expected || call.tensors.is_null() {
            return Err(format!(
                "encoder input kind {} takes {expected} tensors, got {}",
                call.kind, call.n
            ));
        }
        // SAFETY: as the caller promises.
        let mut t = (0..call.n).map(|i| unsafe { borrow(*call.tensors.add(i)) });
        let mut next = || t.next().expect("counted");
        Ok(match call.kind {
            0 => OwnedInput::Image(next()),
            1 => OwnedInput::Text(TextBatch::new(next(), next())),
            2 => {
                let text = encoded(next(), next());
                OwnedInput::Fused(text, encoded(next(), next()))
            }
            _ => {
                let text = encoded(next(), next());
                let left = encoded(next(), next());
                OwnedInput::Pair(text, [left, encoded(next(), next())])
            }
        })
    }

    pub fn input(&self) -> EncoderInput<'_> {
        match self {
            OwnedInput::Image(t) => EncoderInput::Image(t),
            OwnedInput::Text(t) => EncoderInput::Text(t),
            OwnedInput::Fused(text, image) => EncoderInput::Fused { text, image },
            OwnedInput::Pair(text, [l, r]) => EncoderInput::FusedPair {
                text,
                images: [l, r],
            },
        }
    }
}

/// Write `e` to `out[0..2]`, given.
///
/// # Safety
/// `out` has room for two handles.
pub unsafe fn give_encoded(e: Encoded, out: *mut TensorHandle) {
    // SAFETY: as the caller promises.
    unsafe {
        *out = give(e.hidden);
        *out.add(1) = give(e.mask);
    }
}

/// Give `tensors` to the out-array `out` (`out[i]`, in order).
///
/// # Safety
/// `out` is null or has room for `tensors.len()` handles.
pub unsafe fn give_all(tensors: Vec<Tensor>, out: *mut TensorHandle) -> Result<(), String> {
    if out.is_null() {
        return Err("no out-pointer".into());
    }
    for (i, t) in tensors.into_iter().enumerate() {
        // SAFETY: as the caller promises.
        unsafe { *out.add(i) = give(t) };
    }
    Ok(())
}

/// Our own references to lent states (`hidden`, `mask`).
///
/// # Safety
/// Each handle is null or live.
pub unsafe fn borrow_encoded(hidden: TensorHandle, mask: TensorHandle) -> Result<Encoded, String> {
    if hidden.is_null() || mask.is_null() {
        return Err("null states".into());
    }
    // SAFETY: as the caller promises.
    Ok(unsafe {
        Encoded {
            hidden: borrow(hidden),
            mask: borrow(mask),
        }
    })
}

/// Own the two handles written to `out`.
///
/// # Safety
/// Both are live handles given to us.
pub unsafe fn take_encoded(out: [TensorHandle; 2]) -> Result<Encoded, String> {
    if out.iter().any(|h| h.is_null()) {
        return Err("it returned no tensor".into());
    }
    // SAFETY: as the caller promises.
    Ok(unsafe {
        Encoded {
            hidden: take(out[0]),
            mask: take(out[1]),
        }
    })
}

/// A discriminator's logits by the ABI's call code (`which` of
/// `DiscriminatorVTable::logits` and of the host's `discriminate`): 0 pair
/// logits, 1 token logits; any other code is refused.
pub fn discriminate(d: &dyn Discriminator, which: u32, fused: &Encoded) -> Result<Tensor, String> {
    match which {
        0 => d.pair_logits(fused),
        1 => d.token_logits(fused),
        w => return Err(format!("unknown discriminator call {w}")),
    }
    .map_err(|e| e.to_string())
}

pub fn modality_code(m: Modality) -> u32 {
    match m {
        Modality::Image => 0,
        Modality::Text => 1,
        Modality::Multimodal => 2,
    }
}

pub fn modality_of(code: u32) -> Option<Modality> {
    match code {
        0 => Some(Modality::Image),
        1 => Some(Modality::Text),
        2 => Some(Modality::Multimodal),
        _ => None,
    }
}

fn encoded(hidden: Tensor, mask: Tensor) -> Encoded {
    Encoded { hidden, mask }
}
