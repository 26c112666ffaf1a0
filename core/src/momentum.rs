//! ALBEF's momentum distillation (MoD) as objectives see it: the momentum
//! model (an exponential moving average of the encoders, the MLM head and
//! the ITC projections; no gradient, not in the optimizer), the ITC feature
//! queues, and the distillation weight `alpha` of the current step.
//!
//! ALBEF (Li et al., NeurIPS 2021, `models/model_pretrain.py`): ITC
//! similarities are taken against `[momentum batch features; queue]`, and
//! the targets are `alpha * softmax(momentum similarities) + (1 - alpha) *
//! hard targets`; MLM's targets likewise mix in the momentum model's
//! predictions. The trainer (`src/momentum.rs` of the `vlmatch` crate)
//! builds the copy, updates it after every optimizer step, ramps `alpha`
//! and saves all of it in checkpoints.
//!
//! Each queue entry carries its pair's [`PairKeys`], so that a queued copy
//! of a positive (same image id, identical caption or identical image) is a
//! positive in the hard targets, never a negative. Entries not yet written
//! hold random unit features (as ALBEF's initial queue) and keys that match
//! no pair ([`Queue::EMPTY_KEY`]).

use crate::positives::PairKeys;
use crate::{Result, VlModel};
use std::cell::{Cell, RefCell};
use tch::{Device, Kind, Tensor};

/// The ITC feature queues: `[Q, E]` unit image and text features of
/// earlier global batches, their keys, and where the next batch goes.
#[derive(Debug)]
pub struct Queue {
    pub image: Tensor,
    pub text: Tensor,
    pub keys: PairKeys,
    /// The row the next enqueued batch starts at.
    pub ptr: i64,
}

impl Queue {
    /// The key of a queue entry that holds no pair yet.
    pub const EMPTY_KEY: i64 = i64::MIN;

    /// `size` random unit features of width `embed_dim` (drawn from
    /// libtorch's generator) with keys that match no pair.
    pub fn new(size: i64, embed_dim: i64, device: Device) -> Queue {
        let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        let empty = || Tensor::full([size], Self::EMPTY_KEY, (Kind::Int64, device));
        Queue {
            image: unit(Tensor::randn([size, embed_dim], (Kind::Float, device))),
            text: unit(Tensor::randn([size, embed_dim], (Kind::Float, device))),
            keys: PairKeys {
                image_ids: empty(),
                image_keys: empty(),
                text_keys: empty(),
            },
            ptr: 0,
        }
    }

    pub fn len(&self) -> i64 {
        self.image.size()[0]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write a global batch's momentum features and keys at `ptr` and
    /// advance it (the queue's length is a multiple of the batch's).
    pub fn enqueue(&mut self, image: &Tensor, text: &Tensor, keys: &PairKeys) {
        let n = image.size()[0];
        if self.is_empty() || n == 0 {
            return;
        }
        let parts = [
            (&self.image, image),
            (&self.text, text),
            (&self.keys.image_ids, &keys.image_ids),
            (&self.keys.image_keys, &keys.image_keys),
            (&self.keys.text_keys, &keys.text_keys),
        ];
        for (dst, src) in parts {
            dst.narrow(0, self.ptr, n).copy_(src);
        }
        self.ptr = (self.ptr + n) % self.len();
    }

    /// The queue's tensors by name, for checkpoints (`ptr` as a scalar).
    pub fn named_tensors(&self) -> Vec<(&'static str, Tensor)> {
        vec![
            ("image", self.image.shallow_clone()),
            ("text", self.text.shallow_clone()),
            ("image_ids", self.keys.image_ids.shallow_clone()),
            ("image_keys", self.keys.image_keys.shallow_clone()),
            ("text_keys", self.keys.text_keys.shallow_clone()),
        ]
    }
}

/// The momentum model, its queues and the current `alpha`.
pub struct Momentum {
    /// The momentum copy (its variables live in the trainer's second
    /// `VarStore`; its discriminator is not used).
    pub model: VlModel,
    queue: RefCell<Queue>,
    alpha: Cell<f64>,
}

impl Momentum {
    pub fn new(model: VlModel, queue: Queue) -> Momentum {
        Momentum {
            model,
            queue: RefCell::new(queue),
            alpha: Cell::new(0.0),
        }
    }

    /// The weight of the soft targets in this step.
    pub fn alpha(&self) -> f64 {
        self.alpha.get()
    }

    pub fn set_alpha(&self, alpha: f64) {
        self.alpha.set(alpha);
    }

    pub fn queue(&self) -> std::cell::Ref<'_, Queue> {
        self.queue.borrow()
    }

    pub fn queue_mut(&self) -> std::cell::RefMut<'_, Queue> {
        self.queue.borrow_mut()
    }
}

/// One batch's ITC against the momentum features: local rows against the
/// columns `[global momentum batch; queue]` (`C = G + Q`), divided by the
/// temperature.
#[derive(Debug)]
pub struct MomentumContrast {
    /// `[B, C]`: online image embeddings against the columns' texts, with
    /// gradient.
    pub i2t: Tensor,
    /// `[B, C]`: online text embeddings against the columns' images.
    pub t2i: Tensor,
    /// `[B, C]`: the momentum model's `i2t`, no gradient.
    pub i2t_m: Tensor,
    /// `[B, C]`: the momentum model's `t2i`, no gradient.
    pub t2i_m: Tensor,
    /// `[B, C]` bool: which columns are positives of each local row.
    pub positives: Tensor,
    /// `[G, E]` the global batch's momentum features and keys: what the
    /// queue takes after this batch.
    pub image_feats: Tensor,
    pub text_feats: Tensor,
    pub keys: PairKeys,
}

/// Soft ITC targets `alpha * softmax(sim_m) + (1 - alpha) * hard`, where
/// `hard` spreads each row's mass evenly over its positives.
pub fn soft_targets(sim_m: &Tensor, positives: &Tensor, alpha: f64) -> Tensor {
    let pos = positives.to_kind(Kind::Float);
    let hard = &pos / pos.sum_dim_intlist(1, true, Kind::Float);
    sim_m.softmax(1, Kind::Float) * alpha + hard * (1.0 - alpha)
}

/// `[B, C]` similarities of `rows` `[B, E]` against `cols` `[C, E]`.
pub(crate) fn against(rows: &Tensor, cols: &Tensor, temp: &Tensor) -> Tensor {
    rows.matmul(&cols.tr()) / temp
}

pub(crate) fn check_queue_width(queue: &Queue, feats: &Tensor) -> Result<()> {
    let (q, f) = (queue.image.size(), feats.size());
    if !queue.is_empty() && q[1] != f[1] {
        return Err(crate::Error::Config(format!(
            "momentum queue holds features of width {} but the model's are {} wide",
            q[1], f[1]
        )));
    }
    Ok(())
}
