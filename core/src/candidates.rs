//! What a negative sampler offers outside training, through
//! [`crate::NegativeSampler`]: the candidates it generates with their
//! provenance (offline generation, benchmarks), and word swapping on text
//! alone (the matching evaluation). The host reaches these through the
//! sampler trait, never through a plugin's own types.

/// A replaced word of a generated negative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedWord {
    /// Index among the caption's whitespace-separated words.
    pub index: usize,
    pub original: String,
    pub replacement: String,
    /// The word's part-of-speech tag (empty when the sampler does not tag).
    pub tag: String,
}

/// One generated negative and its provenance.
#[derive(Debug, Clone)]
pub struct NegativeCandidate {
    /// The batch row of the caption it was generated from.
    pub owner: usize,
    pub text: String,
    pub masked: Vec<MaskedWord>,
    /// The ITM match probability with the owner's image, when the sampler
    /// scored it.
    pub itm: Option<f64>,
    /// Whether it passed the sampler's filters.
    pub kept: bool,
}

/// A sampler that swaps one word of a caption for another word of its
/// group (colors, shapes, ...), on text alone.
pub trait WordSwapper {
    /// The groups of interchangeable words.
    fn groups(&self) -> &[Vec<String>];
    /// `caption` with one word swapped, choosing with `draw(n)` (uniform in
    /// `0..n`); `None` if no word of it can be swapped.
    fn swap_word(&self, caption: &str, draw: &mut dyn FnMut(usize) -> usize) -> Option<String>;
}
