//! Step 2: masking the chosen words' pieces, and putting a filled caption
//! back together.

use tch::{Device, Tensor};
use vlmatch_core::TextCodec;

use crate::tagging::core;

/// One caption prepared for filling: token ids with the chosen words'
/// pieces masked, and where each chosen word's pieces sit.
#[derive(Debug, Clone)]
pub struct Plan {
    pub words: Vec<String>,
    /// `(word index, first token position, piece count, original first piece)`.
    pub spans: Vec<(usize, usize, usize, i64)>,
    pub ids: Vec<i64>,
}

/// Mask the pieces of `chosen` words of `caption`.
pub fn plan(caption: &str, chosen: &[usize], codec: &dyn TextCodec) -> Option<Plan> {
    let special = codec.special();
    let words: Vec<String> = caption.split(' ').map(str::to_string).collect();
    let mut ids = vec![special.cls];
    let mut spans = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let c = core(w);
        let core_pieces = codec.pieces(c);
        if chosen.contains(&i) {
            if core_pieces.is_empty() || core_pieces.contains(&special.unk) {
                return None;
            }
            spans.push((i, ids.len(), core_pieces.len(), core_pieces[0]));
            ids.extend(std::iter::repeat_n(special.mask, core_pieces.len()));
            ids.extend(codec.pieces(&w[c.len()..]));
        } else {
            ids.extend(codec.pieces(w));
        }
    }
    ids.push(special.sep);
    Some(Plan { words, spans, ids })
}

/// The caption with each span's word core replaced by its filled pieces.
pub fn realise(plan: &Plan, filled: &[i64], codec: &dyn TextCodec) -> String {
    let mut words = plan.words.clone();
    for &(w, start, n, _) in &plan.spans {
        let mut text = String::new();
        for &id in &filled[start..start + n] {
            let t = codec.token(id);
            text.push_str(t.strip_prefix("##").unwrap_or(&t));
        }
        let rest = &plan.words[w][core(&plan.words[w]).len()..];
        words[w] = format!("{text}{rest}");
    }
    words.join(" ")
}

/// Whether `codec` is a WordPiece vocabulary: some entry is a `##` piece.
pub fn is_wordpiece(codec: &dyn TextCodec) -> bool {
    (0..codec.vocab_size()).any(|id| codec.token(id).starts_with("##"))
}

/// Vocabulary masks: `[V]` bool, whole-word alphabetic tokens and `##`
/// alphabetic continuation pieces.
pub fn piece_masks(codec: &dyn TextCodec, device: Device) -> (Tensor, Tensor) {
    let special = codec.special();
    let specials = [
        special.pad,
        special.unk,
        special.cls,
        special.sep,
        special.mask,
    ];
    let (mut first, mut cont) = (Vec::new(), Vec::new());
    for id in 0..codec.vocab_size() {
        let t = codec.token(id);
        let alpha = |s: &str| !s.is_empty() && s.chars().all(char::is_alphabetic);
        let is_special = specials.contains(&id);
        first.push(!is_special && alpha(&t));
        cont.push(!is_special && t.strip_prefix("##").is_some_and(alpha));
    }
    (
        Tensor::from_slice(&first).to_device(device),
        Tensor::from_slice(&cont).to_device(device),
    )
}
