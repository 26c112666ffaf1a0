//! What NegGen produces: candidates with their provenance, and run counts.

use std::cell::Cell;

/// A replaced word of a NegGen candidate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MaskedWord {
    /// Index among the caption's whitespace-separated words.
    pub index: usize,
    pub original: String,
    pub replacement: String,
    pub tag: String,
}

/// One generated candidate and its provenance.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// Index of the caption in the batch.
    pub owner: usize,
    pub text: String,
    pub masked: Vec<MaskedWord>,
    /// ITM match probability with the image, when the ITM filter ran.
    pub itm: Option<f64>,
    /// Whether it passed the filters.
    pub kept: bool,
}

/// Run counts, for the log.
#[derive(Debug, Default)]
pub struct Counts {
    pub captions: Cell<u64>,
    pub produced: Cell<u64>,
    pub no_candidate: Cell<u64>,
    pub dropped_by_filter: Cell<u64>,
}

impl Counts {
    pub(crate) fn values(&self) -> [u64; 4] {
        [
            self.captions.get(),
            self.produced.get(),
            self.no_candidate.get(),
            self.dropped_by_filter.get(),
        ]
    }
}
