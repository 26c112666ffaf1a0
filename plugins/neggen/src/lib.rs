//! NegGen (`shared/method.md`): generated fine-grained negative captions.
//!
//! 1. POS-tag the caption ([`PosTagger`]; default [`BrillTagger`], offline);
//!    candidates are the words tagged noun or adjective.
//! 2. Mask `mask_ratio` of them (at least one), every word piece of a word.
//! 3. Refill the masks with the model's generator (text encoder + MLM head,
//!    reading the masked text alone), or with a fixed masked language model
//!    from a checkpoint (`fill_model`, in its own tokenizer), piece by piece
//!    from left to right; a word's first piece never takes its original
//!    value, so the word always changes; first pieces are whole-word tokens
//!    and later ones continuation pieces (WordPiece's `##` pieces, or a
//!    byte-level BPE's unmarked ones after a `Ġ`-marked first piece).
//! 4. Filter: a candidate equal to a caption of the same image is dropped,
//!    and, after `filter_after_steps`, one whose ITM match probability with
//!    the image is above `filter_threshold` (it may describe the image).
//!
//! Tagging (step 1) is a [`TagPrep`] that the data loader runs on its
//! worker threads while the previous step trains.
//!
//! Registered as negative sampler `neggen`; FG-ITM lists it in `samplers`.
//! Words are whitespace-separated; punctuation stays attached to its word.

mod cache;
mod candidate;
mod config;
mod draw;
mod fill;
mod filter;
mod par;
mod plan;
mod sampler;
mod tagging;

pub use cache::{NegGenCache, NegGenCacheConfig};
pub use candidate::Counts;
pub use config::{default_tags_vec, NegGenConfig, DEFAULT_TAGS};
pub use fill::fill;
pub use plan::{is_wordpiece, piece_masks, piece_style, plan, realise, PieceStyle, Plan};
pub use sampler::NegGen;
pub use tagging::{
    candidate_words, core, mark_candidates, replacements_keep_their_kind, tagged_candidates,
    BrillTagger, PosTagger, TagPrep, Tagged,
};
pub use vlmatch_core::MaskedWord;
/// One generated candidate and its provenance (the core type).
pub use vlmatch_core::NegativeCandidate as Candidate;
