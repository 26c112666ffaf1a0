use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

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
            captions: self.captions.clone(),
            pairs: self.pairs.clone(),
            prepared: self.prepared.clone(),
        }
    }
    /// `[B, B]` bool: `true` where row and column share an image id.
    pub fn positives(&self) -> Tensor {
        self.image_ids
            .unsqueeze(1)
            .eq_tensor(&self.image_ids.unsqueeze(0))
            .to_kind(Kind::Bool)
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
    pub fn cls(&self) -> Tensor {
        self.hidden.select(1, 0)
    }
    pub fn select(&self, index: &Tensor) -> Encoded {
        Encoded {
            hidden: self.hidden.index_select(0, index),
            mask: self.mask.index_select(0, index),
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
