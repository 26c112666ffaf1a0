//! NegGen's run counts. Its candidates are `vlmatch_core::NegativeCandidate`s.

use std::cell::Cell;

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
