use crate::positives::{text_keys, PairKeys, PositiveRule};
use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Tensor};

/// One caption's result of a [`crate::CaptionPrep`].
pub type Prepared = Arc<dyn Any + Send + Sync>;

/// Tokenised text: `ids` `[B, L]` (i64) and `mask` `[B, L]` (i64, 1 on real
/// tokens, 0 on padding). Position 0 is always `[CLS]`.
#[derive(Debug)]
pub struct TextBatch {
    pub ids: Tensor,
    pub mask: Tensor,
}

impl TextBatch {
    pub fn new(ids: Tensor, mask: Tensor) -> Self {
        debug_assert_eq!(ids.size(), mask.size());
        TextBatch { ids, mask }
    }
    pub fn len(&self) -> i64 {
        self.ids.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn to_device(&self, device: Device) -> TextBatch {
        TextBatch::new(self.ids.to_device(device), self.mask.to_device(device))
    }
    /// Rows `index` (`[K]`, i64) of this batch.
    pub fn select(&self, index: &Tensor) -> TextBatch {
        TextBatch::new(
            self.ids.index_select(0, index),
            self.mask.index_select(0, index),
        )
    }
    /// Row-wise concatenation; both sides must share the sequence length.
    pub fn cat(&self, other: &TextBatch) -> TextBatch {
        TextBatch::new(
            Tensor::cat(&[&self.ids, &other.ids], 0),
            Tensor::cat(&[&self.mask, &other.mask], 0),
        )
    }
    pub fn shallow_clone(&self) -> TextBatch {
        TextBatch::new(self.ids.shallow_clone(), self.mask.shallow_clone())
    }
}

/// One training or evaluation batch of image-caption pairs.
#[derive(Debug)]
pub struct Batch {
    /// `[B, 3, H, W]` f32, normalised.
    pub images: Tensor,
    pub text: TextBatch,
    /// `[B]` i64. Pairs with equal ids share an image: each is a positive of
    /// the other's image, never a negative.
    pub image_ids: Tensor,
    /// `[B]` i64: a hash of each pair's decoded image, equal for identical
    /// images under different ids ([`crate::positives`]).
    pub image_keys: Tensor,
    /// Which pairs count as positives of each other ([`Batch::positives`]).
    pub positive_rule: PositiveRule,
    /// `[B]` i64: each row's place in the run's global sample order (global
    /// batch `g`, row `k` of it: `g * global_batch + k`), whatever rank
    /// holds it. Random choices are keyed by it ([`crate::random`]).
    pub sample_keys: Tensor,
    /// [`Batch::sample_keys`] on the host, for draws that a sampler needs
    /// there ([`crate::Forward::random_keys_host`]) without a read-back.
    pub sample_keys_host: Vec<i64>,
    /// The captions as text, for samplers that rewrite them (NegGen).
    pub captions: Vec<String>,
    /// The dataset pair each row holds, by index into the dataset the batch
    /// was made from (a replacement's under `data.on_error = "skip"`), for
    /// targets kept beside the pairs (VQA answers). Empty where unknown.
    pub pairs: Vec<usize>,
    /// Per-caption results of the [`crate::CaptionPrep`]s the loader ran on
    /// its worker threads, by [`crate::CaptionPrep::key`]: one entry per
    /// caption, in batch order. Empty where no loader prepared the batch.
    pub prepared: BTreeMap<String, Vec<Prepared>>,
}

impl Batch {
    pub fn len(&self) -> i64 {
        self.images.size()[0]
    }
    /// Caption `i`'s result of the prep registered under `key`, if the
    /// loader ran it and it has type `T`.
    pub fn prepared<T: Any + Send + Sync>(&self, key: &str, i: usize) -> Option<&T> {
        self.prepared.get(key)?.get(i)?.downcast_ref::<T>()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn to_device(&self, device: Device) -> Batch {
        Batch {
            images: self.images.to_device(device),
            text: self.text.to_device(device),
            image_ids: self.image_ids.to_device(device),
            image_keys: self.image_keys.to_device(device),
            positive_rule: self.positive_rule,
            sample_keys: self.sample_keys.to_device(device),
            sample_keys_host: self.sample_keys_host.clone(),
            captions: self.captions.clone(),
            pairs: self.pairs.clone(),
            prepared: self.prepared.clone(),
        }
    }
    /// This batch with every tensor in page-locked host memory for CUDA
    /// device `device`, so that [`Batch::to_device_async`] copies it
    /// directly; unchanged for another device.
    pub fn pinned(self, device: Device) -> Result<Batch, tch::TchError> {
        if !device.is_cuda() {
            return Ok(self);
        }
        let pin = |t: &Tensor| t.f_pin_memory(device);
        Ok(Batch {
            images: pin(&self.images)?,
            text: TextBatch::new(pin(&self.text.ids)?, pin(&self.text.mask)?),
            image_ids: pin(&self.image_ids)?,
            image_keys: pin(&self.image_keys)?,
            sample_keys: pin(&self.sample_keys)?,
            ..self
        })
    }
    /// [`Batch::to_device`] without waiting for host-to-CUDA copies (from
    /// pinned memory they run asynchronously on the current stream, so the
    /// work queued after them sees the batch); the same as `to_device`
    /// elsewhere.
    pub fn to_device_async(&self, device: Device) -> Batch {
        let to = |t: &Tensor| t.to_device_(device, t.kind(), true, false);
        Batch {
            images: to(&self.images),
            text: TextBatch::new(to(&self.text.ids), to(&self.text.mask)),
            image_ids: to(&self.image_ids),
            image_keys: to(&self.image_keys),
            positive_rule: self.positive_rule,
            sample_keys: to(&self.sample_keys),
            sample_keys_host: self.sample_keys_host.clone(),
            captions: self.captions.clone(),
            pairs: self.pairs.clone(),
            prepared: self.prepared.clone(),
        }
    }
    /// The same tensors (no copy), for reusing a batch.
    pub fn shallow_clone(&self) -> Batch {
        Batch {
            images: self.images.shallow_clone(),
            text: self.text.shallow_clone(),
            image_ids: self.image_ids.shallow_clone(),
            image_keys: self.image_keys.shallow_clone(),
            positive_rule: self.positive_rule,
            sample_keys: self.sample_keys.shallow_clone(),
            sample_keys_host: self.sample_keys_host.clone(),
            captions: self.captions.clone(),
            pairs: self.pairs.clone(),
            prepared: self.prepared.clone(),
        }
    }
    /// The rows of `batches` in order, as one batch (text padded to the
    /// longest with id 0 and mask 0, which changes no key and no encoder
    /// output): the accumulated batch of GradCache. `None` for no batches.
    pub fn cat(batches: &[Batch]) -> Option<Batch> {
        let first = batches.first()?;
        let len = batches.iter().map(|b| b.text.ids.size()[1]).max()?;
        let pad = |t: &Tensor| {
            let n = t.size()[1];
            if n == len {
                t.shallow_clone()
            } else {
                t.constant_pad_nd([0, len - n])
            }
        };
        let cat = |f: &dyn Fn(&Batch) -> Tensor| {
            Tensor::cat(&batches.iter().map(f).collect::<Vec<_>>(), 0)
        };
        let mut prepared: BTreeMap<String, Vec<Prepared>> = BTreeMap::new();
        for b in batches {
            for (k, v) in &b.prepared {
                prepared
                    .entry(k.clone())
                    .or_default()
                    .extend(v.iter().cloned());
            }
        }
        Some(Batch {
            images: cat(&|b| b.images.shallow_clone()),
            text: TextBatch::new(cat(&|b| pad(&b.text.ids)), cat(&|b| pad(&b.text.mask))),
            image_ids: cat(&|b| b.image_ids.shallow_clone()),
            image_keys: cat(&|b| b.image_keys.shallow_clone()),
            positive_rule: first.positive_rule,
            sample_keys: cat(&|b| b.sample_keys.shallow_clone()),
            sample_keys_host: batches
                .iter()
                .flat_map(|b| b.sample_keys_host.clone())
                .collect(),
            captions: batches.iter().flat_map(|b| b.captions.clone()).collect(),
            pairs: batches.iter().flat_map(|b| b.pairs.clone()).collect(),
            prepared,
        })
    }
    /// The identity keys of the batch's pairs (image ids, image hashes,
    /// caption hashes), for relating them to pairs of other batches.
    pub fn keys(&self) -> PairKeys {
        PairKeys {
            image_ids: self.image_ids.shallow_clone(),
            image_keys: self.image_keys.shallow_clone(),
            text_keys: text_keys(&self.text),
        }
    }
    /// `[B, B]` bool: `true` where row and column pairs are positives of each
    /// other under the batch's [`PositiveRule`] (same image id, and by
    /// default also identical caption or identical image;
    /// [`crate::positives`]). The diagonal is always `true`.
    pub fn positives(&self) -> Tensor {
        let keys = self.keys();
        keys.relation(&keys, self.positive_rule)
    }
    /// `[K]` bool: whether `text` row `k` paired with batch image
    /// `image_index[k]` is a true match (the text is identical to a caption
    /// of a positive of that pair), so not a negative.
    pub fn text_is_positive(&self, image_index: &Tensor, text: &TextBatch) -> Tensor {
        self.keys()
            .text_is_positive(image_index, &text_keys(text), self.positive_rule)
    }
}

/// An encoder's output: `hidden` `[B, N, D]` and `mask` `[B, N]` (i64, 1 on
/// real positions). Position 0 is the `[CLS]` token of the sequence.
#[derive(Debug)]
pub struct Encoded {
    pub hidden: Tensor,
    pub mask: Tensor,
}

impl Encoded {
    /// States whose every position is attended to (an image's patches).
    pub fn all_valid(hidden: Tensor) -> Encoded {
        let (b, n) = (hidden.size()[0], hidden.size()[1]);
        let mask = Tensor::ones([b, n], (tch::Kind::Int64, hidden.device()));
        Encoded { hidden, mask }
    }
    pub fn cls(&self) -> Tensor {
        self.hidden.select(1, 0)
    }
    /// Position 0 alone, as states: `hidden` `[B, 1, D]`, `mask` `[B, 1]`.
    pub fn position_zero(&self) -> Encoded {
        Encoded {
            hidden: self.hidden.narrow(1, 0, 1),
            mask: self.mask.narrow(1, 0, 1),
        }
    }
    pub fn select(&self, index: &Tensor) -> Encoded {
        Encoded {
            hidden: self.hidden.index_select(0, index),
            mask: self.mask.index_select(0, index),
        }
    }
    /// The same states padded along the sequence to `len` positions (zero
    /// states, mask 0); unchanged when already that long.
    pub fn pad_to(&self, len: i64) -> Encoded {
        let pad = len - self.hidden.size()[1];
        if pad <= 0 {
            return self.shallow_clone();
        }
        Encoded {
            hidden: self.hidden.constant_pad_nd([0, 0, 0, pad]),
            mask: self.mask.constant_pad_nd([0, pad]),
        }
    }
    pub fn cat(&self, other: &Encoded) -> Encoded {
        Encoded {
            hidden: Tensor::cat(&[&self.hidden, &other.hidden], 0),
            mask: Tensor::cat(&[&self.mask, &other.mask], 0),
        }
    }
    pub fn shallow_clone(&self) -> Encoded {
        Encoded {
            hidden: self.hidden.shallow_clone(),
            mask: self.mask.shallow_clone(),
        }
    }
}
