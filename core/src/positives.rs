//! Which pairs are positives of each other: the one definition that ITC
//! targets, every negative sampler and the FG-ITM negatives read.
//!
//! ALBEF counts two pairs as positives only when they share an image id.
//! Datasets repeat captions ("a large orange diamond in the top left
//! corner", CC3M's hypernymised captions) and images (the same file under
//! two ids, the same bytes in two shards), and with image ids alone such a
//! duplicate is a negative of its twin: ITC pushes identical embeddings
//! apart and the hard-negative sampler, which prefers the most similar
//! text, draws exactly the identical caption, so ITM is told that a pair is
//! both a match and not a match.
//!
//! [`PositiveRule::Identical`] (the default) adds two rules. Pairs `i` and
//! `j` are positives of each other when
//! - they share an image id (ALBEF), **or**
//! - their tokenised captions are identical, **or**
//! - their images are identical (equal [`PairKeys::image_keys`]: the data
//!   loader hashes each decoded image).
//!
//! The relation is pairwise, not a transitive merge of groups: one generic
//! caption shared by two images makes those two *pairs* positives, not the
//! images' other captions. [`PositiveRule::ImageId`] keeps ALBEF's rule.
//!
//! Everything works on [`PairKeys`], three `[B]` i64 tensors per set of
//! pairs, so that the same relation holds between a batch and pairs from
//! elsewhere (other ranks' batches, a feature queue): gather or store the
//! keys and call [`PairKeys::relation`].

use crate::TextBatch;
use tch::{Kind, Tensor};

/// Which pairs of a batch are positives of each other (see the module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PositiveRule {
    /// Same image id, identical tokenised caption, or identical image.
    #[default]
    Identical,
    /// Same image id only (ALBEF exactly).
    ImageId,
}

/// Identity keys of a set of pairs, all `[N]` i64 on one device.
#[derive(Debug)]
pub struct PairKeys {
    /// The dataset's image ids.
    pub image_ids: Tensor,
    /// A hash of each pair's image content; equal for identical images.
    pub image_keys: Tensor,
    /// [`text_keys`] of each pair's tokenised caption.
    pub text_keys: Tensor,
}

impl PairKeys {
    pub fn len(&self) -> i64 {
        self.image_ids.size()[0]
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `[R, C]` bool: `true` where row pair `r` of `self` and column pair
    /// `c` of `cols` are positives of each other under `rule`.
    pub fn relation(&self, cols: &PairKeys, rule: PositiveRule) -> Tensor {
        let eq = |a: &Tensor, b: &Tensor| a.unsqueeze(1).eq_tensor(&b.unsqueeze(0));
        let same_id = eq(&self.image_ids, &cols.image_ids);
        match rule {
            PositiveRule::ImageId => same_id,
            PositiveRule::Identical => same_id
                .logical_or(&eq(&self.image_keys, &cols.image_keys))
                .logical_or(&eq(&self.text_keys, &cols.text_keys)),
        }
    }

    /// `[K]` bool: whether text `k` (its [`text_keys`] `texts`) is a caption
    /// of a pair that is a positive of row `rows[k]` of `self`, i.e. whether
    /// pairing it with that row's image makes a true match. A generated
    /// negative for which this holds is not a negative.
    pub fn text_is_positive(&self, rows: &Tensor, texts: &Tensor, rule: PositiveRule) -> Tensor {
        let positives = self.relation(self, rule).index_select(0, rows);
        let same_text = texts.unsqueeze(1).eq_tensor(&self.text_keys.unsqueeze(0));
        positives.logical_and(&same_text).any_dim(1, false)
    }

    /// Rows `index` (`[K]` i64).
    pub fn select(&self, index: &Tensor) -> PairKeys {
        PairKeys {
            image_ids: self.image_ids.index_select(0, index),
            image_keys: self.image_keys.index_select(0, index),
            text_keys: self.text_keys.index_select(0, index),
        }
    }

    /// The keys of several sets, one after the other (e.g. every rank's).
    pub fn cat(parts: &[&PairKeys]) -> PairKeys {
        let pick = |f: fn(&PairKeys) -> &Tensor| {
            Tensor::cat(&parts.iter().map(|p| f(p)).collect::<Vec<_>>(), 0)
        };
        PairKeys {
            image_ids: pick(|p| &p.image_ids),
            image_keys: pick(|p| &p.image_keys),
            text_keys: pick(|p| &p.text_keys),
        }
    }

    pub fn shallow_clone(&self) -> PairKeys {
        PairKeys {
            image_ids: self.image_ids.shallow_clone(),
            image_keys: self.image_keys.shallow_clone(),
            text_keys: self.text_keys.shallow_clone(),
        }
    }
}

/// The multiplier of [`text_keys`]' polynomial hash (odd, 64-bit).
const TEXT_HASH_BASE: i64 = 0x5851_F42D_4C95_7F2D;

/// `[B]` i64: a hash of each row's real tokens (`ids` where `mask` is 1),
/// equal for identical token sequences whatever their padding, computed on
/// the batch's device without reading it back: `sum_l mask_l * (ids_l + 1)
/// * c^(l+1)` in wrapping 64-bit arithmetic, `c` a fixed odd constant.
pub fn text_keys(text: &TextBatch) -> Tensor {
    let len = text.ids.size()[1];
    let mut weights = Vec::with_capacity(len as usize);
    let mut w = TEXT_HASH_BASE;
    for _ in 0..len {
        weights.push(w);
        w = w.wrapping_mul(TEXT_HASH_BASE);
    }
    let weights = Tensor::from_slice(&weights).to_device(text.ids.device());
    let tokens = (&text.ids + 1) * &text.mask.to_kind(Kind::Int64);
    (tokens * weights.unsqueeze(0)).sum_dim_intlist(1, false, Kind::Int64)
}

/// A 64-bit FNV-1a-style hash over 32-bit `words` (an image's pixels as
/// `f32::to_bits`), as an i64 image key.
pub fn content_key(words: impl IntoIterator<Item = u32>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for w in words {
        h ^= w as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}
