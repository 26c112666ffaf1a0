//! vlmatch's core: the traits every plugin implements, the batch and output
//! types that flow between them, and the error type.
//!
//! The plugin traits mirror the roles of VL-Match (`shared/method.md`), and
//! [`Hook`] lets a plugin act at fixed points of training:
//!
//! | trait | role in VL-Match |
//! |---|---|
//! | [`Encoder`] | the image encoder `E_v`, the text encoder `E_t`, the multimodal (fusion) encoder `E_m` |
//! | [`Generator`] | the MLM head: corrupts text for VL-RTD, fills masks for NegGen, predicts masked tokens for MLM |
//! | [`Discriminator`] | per-token (RTD) and per-pair (ITM) matching heads on fused states |
//! | [`NegativeSampler`] | negatives for a batch: in-batch hard negatives, generated captions |
//! | [`Objective`] | turns a batch and the model's outputs into named losses |
//! | [`Hook`] | runs at fixed points of training: momentum distillation, logging, evaluation |
//! | [`Head`] | a downstream task's output layers on fused `[CLS]` states (VQA, SNLI-VE, NLVR2) |
//!
//! `core` knows nothing of plugins, configuration files, the file system or
//! dynamic loading: those live in `vlmatch-registry` and the `vlmatch` crate.

mod batch;
mod candidates;
pub mod checkpoint;
mod collective;
mod error;
pub mod flops;
mod forward;
pub mod hook;
pub mod momentum;
pub mod positives;
pub mod random;
pub mod readback;
mod traits;

pub use batch::{Batch, Encoded, Prepared, TextBatch};
pub use candidates::{MaskedWord, NegativeCandidate, WordSwapper};
pub use collective::Collective;
pub use error::{Error, Result};
pub use forward::{ContrastiveHead, Forward, Similarity, VlModel};
pub use hook::{Evaluation, Hook, HookState, Record, RunEnd, RunStart};
pub use momentum::{Momentum, MomentumContrast, Queue};
pub use positives::{PairKeys, PositiveRule};
pub use traits::{
    CaptionPrep, Discriminator, Encoder, EncoderInput, FillOptions, Generator, Head, Modality,
    NegativeSampler, Negatives, Objective, ObjectiveOutput, SamplerInput,
};

/// The run's tokenizer as plugins see it: samplers that write new captions
/// (NegGen, word swaps) encode them with the same vocabulary as the batch.
pub trait TextCodec {
    fn special(&self) -> SpecialTokens;
    fn vocab_size(&self) -> i64;
    /// Encode `texts` into a batch padded to its longest row, on `device`.
    fn encode(&self, texts: &[&str], device: tch::Device) -> TextBatch;
    /// The vocabulary entry of `id`.
    fn token(&self, id: i64) -> String;
    /// Word-piece ids of `text`, without `[CLS]`/`[SEP]` or truncation.
    /// Whitespace-separated words tokenise independently, so a caption's
    /// pieces are the concatenation of its words' pieces, each word after the
    /// first taken with its leading space (which byte-level BPE marks).
    fn pieces(&self, text: &str) -> Vec<i64>;
}

/// Special token ids of the text vocabulary, needed by masking and sampling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialTokens {
    pub pad: i64,
    pub unk: i64,
    pub cls: i64,
    pub sep: i64,
    pub mask: i64,
}
