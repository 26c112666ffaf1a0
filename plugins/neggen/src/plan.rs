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

/// How a vocabulary marks where a word starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceStyle {
    /// WordPiece (BERT): a word's later pieces start with `##`.
    WordPiece,
    /// Byte-level BPE (GPT-2, RoBERTa): a word after a space starts with
    /// `Ġ` (the space's byte); later pieces carry no mark.
    ByteLevel,
}

/// The byte-level BPE mark of a word that follows a space.
const SPACE: char = '\u{120}';

/// `codec`'s [`PieceStyle`], or `None` for a vocabulary with neither mark.
pub fn piece_style(codec: &dyn TextCodec) -> Option<PieceStyle> {
    let tokens = || (0..codec.vocab_size()).map(|id| codec.token(id));
    if tokens().any(|t| t.starts_with("##")) {
        Some(PieceStyle::WordPiece)
    } else if tokens().any(|t| t.starts_with(SPACE)) {
        Some(PieceStyle::ByteLevel)
    } else {
        None
    }
}

/// Mask the pieces of `chosen` words of `caption`. Words after the first
/// are encoded after their space, as the tokenizer encodes the whole
/// caption (byte-level BPE marks them; WordPiece drops the space). In a
/// byte-level vocabulary the caption's first word carries no mark while
/// filled first pieces do, so it is never masked there.
pub fn plan(
    caption: &str,
    chosen: &[usize],
    codec: &dyn TextCodec,
    style: PieceStyle,
) -> Option<Plan> {
    let special = codec.special();
    let words: Vec<String> = caption.split(' ').map(str::to_string).collect();
    let mut ids = vec![special.cls];
    let mut spans = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let lead = if i > 0 { " " } else { "" };
        let c = core(w);
        let masked = chosen.contains(&i) && !(style == PieceStyle::ByteLevel && i == 0);
        if masked {
            let core_pieces = codec.pieces(&format!("{lead}{c}"));
            if core_pieces.is_empty() || core_pieces.contains(&special.unk) {
                return None;
            }
            spans.push((i, ids.len(), core_pieces.len(), core_pieces[0]));
            ids.extend(std::iter::repeat_n(special.mask, core_pieces.len()));
            ids.extend(codec.pieces(&w[c.len()..]));
        } else {
            ids.extend(codec.pieces(&format!("{lead}{w}")));
        }
    }
    if spans.is_empty() {
        return None;
    }
    ids.push(special.sep);
    Some(Plan { words, spans, ids })
}

/// The caption with each span's word core replaced by its filled pieces.
pub fn realise(plan: &Plan, filled: &[i64], codec: &dyn TextCodec, style: PieceStyle) -> String {
    let mut words = plan.words.clone();
    for &(w, start, n, _) in &plan.spans {
        let mut text = String::new();
        for &id in &filled[start..start + n] {
            let t = codec.token(id);
            let bare = match style {
                PieceStyle::WordPiece => t.strip_prefix("##"),
                PieceStyle::ByteLevel => t.strip_prefix(SPACE),
            };
            text.push_str(bare.unwrap_or(&t));
        }
        let rest = &plan.words[w][core(&plan.words[w]).len()..];
        words[w] = format!("{text}{rest}");
    }
    words.join(" ")
}

/// Whether `codec` is a WordPiece vocabulary: some entry is a `##` piece.
pub fn is_wordpiece(codec: &dyn TextCodec) -> bool {
    piece_style(codec) == Some(PieceStyle::WordPiece)
}

/// Vocabulary masks: `[V]` bool, the alphabetic tokens that may start a
/// word (WordPiece: unmarked; byte-level: `Ġ`-marked) and those that may
/// continue one (WordPiece: `##`-marked; byte-level: unmarked).
pub fn piece_masks(codec: &dyn TextCodec, device: Device, style: PieceStyle) -> (Tensor, Tensor) {
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
        let (starts, continues) = match style {
            PieceStyle::WordPiece => (alpha(&t), t.strip_prefix("##").is_some_and(alpha)),
            PieceStyle::ByteLevel => (
                t.strip_prefix(SPACE).is_some_and(alpha),
                !t.starts_with(SPACE) && alpha(&t),
            ),
        };
        first.push(!is_special && starts);
        cont.push(!is_special && continues);
    }
    (
        Tensor::from_slice(&first).to_device(device),
        Tensor::from_slice(&cont).to_device(device),
    )
}
