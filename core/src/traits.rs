//! The plugin traits. Each documents its contract: inputs and outputs with
//! their shapes, what `train` changes, and where tensors live.
//!
//! Device: every plugin builds its parameters under the `tch::nn::Path` it is
//! given, so they live on that path's device; inputs arrive on the same device
//! and outputs stay there. Plugins never move tensors between devices.

use crate::{Encoded, Forward, Result, TextBatch};
use tch::Tensor;

/// What an [`Encoder`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Modality {
    /// Pixels to patch tokens: the image encoder `E_v`.
    Image,
    /// Token ids to token states, reading the text alone: `E_t`.
    Text,
    /// Text states attending to image states: the fusion encoder `E_m`.
    Multimodal,
}

/// The input of an [`Encoder`], one variant per [`Modality`].
#[derive(Debug, Clone, Copy)]
pub enum EncoderInput<'a> {
    /// `[B, 3, H, W]` f32 normalised pixels.
    Image(&'a Tensor),
    Text(&'a TextBatch),
    /// Text states (`[B, L, Dt]`, their mask) and image states (`[B, N, Dv]`).
    Fused {
        text: &'a Encoded,
        image: &'a Encoded,
    },
    /// Text states attending to two images per text (NLVR2: `images[0]`
    /// the left image's states, `images[1]` the right's, each `[B, N, Dv]`).
    /// Only a fusion built for two images takes it (ALBEF's doubled
    /// cross-attention, `cross_attention` with `images = 2`); others return
    /// an [`crate::Error::Plugin`], as for any input of the wrong kind.
    FusedPair {
        text: &'a Encoded,
        images: [&'a Encoded; 2],
    },
}

/// An encoder: image (`E_v`), text (`E_t`) or multimodal fusion (`E_m`).
///
/// Output: [`Encoded`] with `hidden` `[B, N, hidden_size()]`, position 0 the
/// sequence's `[CLS]` state. For `Text` and `Multimodal` encoders `N` is the
/// text length and the mask is the text mask; for `Image` encoders the mask
/// is all ones. `train = true` enables dropout; gradients flow unless the
/// caller runs under `tch::no_grad`.
pub trait Encoder {
    fn modality(&self) -> Modality;
    /// Width `D` of the states this encoder returns.
    fn hidden_size(&self) -> i64;
    /// An input of the wrong [`Modality`] is an [`crate::Error::Plugin`].
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded>;
    /// [`Encoder::forward_t`] when only position 0 (`[CLS]`) is needed, as
    /// for ITM: `hidden` `[B, 1, D]`, `mask` `[B, 1]`, equal to position 0
    /// of `forward_t`. The default runs `forward_t` and keeps that position;
    /// a fusion encoder overrides it to skip the other positions' work in
    /// its last layer, where nothing reads them.
    fn forward_cls(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        Ok(self.forward_t(input, train)?.position_zero())
    }
    /// [`Encoder::forward_cls`] of a fusion encoder for pairs whose images
    /// repeat: `image` holds each distinct image's states once (`[U, N, W]`)
    /// and pair `b` fuses `text` row `b` with image `image_index[b]`. Equals
    /// `forward_cls` on `image.select(image_index)`, which is what the
    /// default runs; a fusion whose image states do not change from layer to
    /// layer (cross-attention) overrides it to compute each image's keys and
    /// values once.
    fn forward_cls_indexed(
        &self,
        text: &Encoded,
        image: &Encoded,
        image_index: &Tensor,
        train: bool,
    ) -> Result<Encoded> {
        let image = image.select(image_index);
        self.forward_cls(
            EncoderInput::Fused {
                text,
                image: &image,
            },
            train,
        )
    }
    /// Text encoders: the word-embedding matrix `[V, D]`, which MLM heads tie
    /// their decoder to. `None` for other encoders.
    fn word_embeddings(&self) -> Option<Tensor> {
        None
    }
}

/// Options for [`Generator::fill`].
#[derive(Debug, Clone, Copy)]
pub struct FillOptions {
    /// Softmax temperature; 1.0 samples from the model's distribution.
    pub temperature: f64,
    /// Never put back the token that was there before masking (NegGen).
    pub forbid_original: bool,
}

impl Default for FillOptions {
    fn default() -> Self {
        FillOptions {
            temperature: 1.0,
            forbid_original: false,
        }
    }
}

/// A masked-language-model generator: an MLM head over token states.
///
/// Used by MLM (predict masked tokens from fused states), VL-RTD (corrupt
/// text by sampling, reading the text alone) and NegGen (refill masked nouns
/// and adjectives).
pub trait Generator {
    /// Vocabulary logits `[B, L, V]` for token states `[B, L, D]`.
    fn logits(&self, states: &Encoded, train: bool) -> Result<Tensor>;

    /// Sample replacements at `positions` (`[B, L]` bool) from `logits`
    /// (`[B, L, V]`), without gradient. Returns new ids `[B, L]`: `original`
    /// where `positions` is false. The draw at row `b`, position `l` is keyed
    /// by `keys[b]` (`[B]` i64, from `Forward::random_keys`) and `l`
    /// ([`crate::random`]).
    fn fill(
        &self,
        logits: &Tensor,
        original: &Tensor,
        positions: &Tensor,
        opts: FillOptions,
        keys: &Tensor,
    ) -> Result<Tensor> {
        tch::no_grad(|| {
            let (b, l, v) = logits.size3()?;
            let mut scaled = logits.to_kind(tch::Kind::Float);
            if opts.forbid_original {
                let onehot = original.one_hot(v).to_kind(tch::Kind::Bool);
                scaled = scaled.masked_fill(&onehot, f64::NEG_INFINITY);
            }
            let u = crate::random::uniform(keys, l).view([b * l]);
            let drawn =
                crate::random::categorical_logits(&scaled.view([b * l, v]), opts.temperature, &u)
                    .view([b, l]);
            Ok(original.where_self(&positions.logical_not(), &drawn))
        })
    }
}

/// Matching heads on fused states.
pub trait Discriminator {
    /// Per-token logits `[B, L]` that each text token was replaced (VL-RTD):
    /// sigmoid gives the probability that the token does not match.
    fn token_logits(&self, fused: &Encoded) -> Result<Tensor>;
    /// Pair logits `[B, 2]` from the fused `[CLS]` (ITM): index 1 is "match".
    fn pair_logits(&self, fused: &Encoded) -> Result<Tensor>;
}

/// What a [`NegativeSampler`] sees: the batch, the forward cache (image and
/// text states, ITC similarities) and the training step.
pub struct SamplerInput<'a, 'b> {
    pub forward: &'a Forward<'b>,
    pub step: i64,
}

/// Negatives for a batch of `B` positive pairs.
#[derive(Debug)]
pub enum Negatives {
    /// Negatives drawn from the batch itself: for each local image `i` the
    /// index of a text `text_for_image[i]`, and for each local text `j` the
    /// index of an image `image_for_text[j]` (both `[B]` i64), indices into
    /// the candidates of [`crate::Forward::negative_candidates`] (the
    /// global batch by default; the batch itself on one process); never a
    /// positive of the row. -1 where there is no negative for that row.
    InBatch {
        text_for_image: Tensor,
        image_for_text: Tensor,
    },
    /// New texts `[K, L]`, each paired with the batch image
    /// `image_index[k]` (`[K]` i64). `K` may be 0. A text identical to a
    /// caption of one of the image's positives is not a negative: the ITM
    /// objective gives it no weight ([`crate::Batch::text_is_positive`]).
    Texts {
        image_index: Tensor,
        text: TextBatch,
    },
}

impl Negatives {
    /// Text negatives: `texts[k]` pairs with batch image `index[k]`, encoded
    /// with the run's `codec` on `device`.
    pub fn from_texts<S: AsRef<str>>(
        codec: &dyn crate::TextCodec,
        index: &[i64],
        texts: &[S],
        device: tch::Device,
    ) -> Negatives {
        let refs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        Negatives::Texts {
            image_index: Tensor::from_slice(index).to_device(device),
            text: codec.encode(&refs, device),
        }
    }
}

/// Yields negatives for a batch.
///
/// Sampling never back-propagates: implementations run under `no_grad`.
/// Randomness comes from libtorch's global generator, which the trainer seeds
/// per step, so sampling is reproducible.
pub trait NegativeSampler {
    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives>;
    /// Counters of the last [`NegativeSampler::sample`] call (for example
    /// captions seen, negatives produced, candidates dropped by a filter),
    /// logged by the objective that uses the sampler as
    /// `<objective>_<sampler>_<name>` in `metrics.jsonl`. Default: none.
    fn stats(&self) -> Vec<(String, f64)> {
        Vec::new()
    }
    /// Per-caption CPU work (NegGen: POS tagging) that the data loader should
    /// do on its worker threads ahead of the step; the results arrive in
    /// [`crate::Batch::prepared`]. Default: none.
    fn caption_prep(&self) -> Option<std::sync::Arc<dyn CaptionPrep>> {
        None
    }
    /// Every candidate for the batch's captions with its provenance and
    /// whether the sampler's filters kept it (at `step`, for filters that
    /// start late), for offline generation (`vlmatch neggen`) and
    /// benchmarks. Default: `None`, a sampler that lists no candidates.
    fn candidates(
        &self,
        _forward: &Forward<'_>,
        _step: i64,
    ) -> Option<Result<Vec<crate::NegativeCandidate>>> {
        None
    }
    /// The sampler as a word swapper on text alone, when it is one
    /// (`word_swap`; the matching evaluation uses it). Default: `None`.
    fn word_swapper(&self) -> Option<&dyn crate::WordSwapper> {
        None
    }
}

/// CPU work on each caption, done by the data loader on its worker threads
/// while the previous step trains, so the sampler that asked for it finds
/// the result ready in [`crate::Batch::prepared`] (and computes it itself
/// when a batch comes without).
pub trait CaptionPrep: Send + Sync {
    /// Where the results go in [`crate::Batch::prepared`]; preps with equal
    /// keys compute the same thing, and run once.
    fn key(&self) -> String;
    fn prepare(&self, caption: &str) -> crate::batch::Prepared;
}

/// Named losses (scalar tensors carrying gradient, unweighted) and named
/// metrics (scalar tensors, detached) of one objective on one batch.
#[derive(Debug, Default)]
pub struct ObjectiveOutput {
    pub losses: Vec<(String, Tensor)>,
    pub metrics: Vec<(String, Tensor)>,
}

/// A training objective: a batch and the model's outputs in, named losses out.
///
/// Objectives read the model through the [`Forward`] cache so that encoders
/// shared between objectives run once per batch. The trainer weights each
/// loss by its config weight and sums them; loss names appear as keys in
/// `metrics.jsonl`, so they must be unique across objectives.
pub trait Objective {
    fn forward(&self, forward: &Forward<'_>, step: i64) -> Result<ObjectiveOutput>;
    /// Whether this objective reads only the ITC embeddings of the batch
    /// ([`Forward::embeds`], [`Forward::similarity`], [`Forward::positives`]
    /// and the contrastive head's parameters), no encoder states: such an
    /// objective can run once over a whole accumulated batch from cached
    /// embeddings (`train.contrastive_accum = "cached"`). Default: no.
    fn contrastive(&self) -> bool {
        false
    }
    /// The [`CaptionPrep`]s of the samplers this objective uses, for the
    /// loader. Default: none.
    fn caption_preps(&self) -> Vec<std::sync::Arc<dyn CaptionPrep>> {
        Vec::new()
    }
}

/// A downstream task's head on fused `[CLS]` states: VQA's answer
/// classifier, SNLI-VE's and NLVR2's class heads. Built for a task's
/// output count; its parameters live under the path it is built at, so
/// they are checkpointed and optimised with the model.
pub trait Head {
    /// Logits `[B, outputs]` (fp32) from `[CLS]` states `[B, D]`.
    fn forward(&self, cls: &Tensor) -> Tensor;
}
