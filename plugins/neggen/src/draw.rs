//! The stream NegGen draws a caption's masked words from.

/// A 64-bit linear congruential stream seeded by a caption's random key
/// (`vlmatch_core::random`), so a caption's choices do not depend on how
/// the batch is split.
pub(crate) struct Draw(u64);

impl Draw {
    pub(crate) fn new(key: i64) -> Self {
        Draw(key as u64)
    }

    /// The next draw, uniform in `0..n` (`0` for `n == 0`).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n.max(1)
    }
}
