//! BERT's WordPiece tokenizer (basic tokenisation, then greedy longest-match
//! word pieces), over a `vocab.txt` or the built-in vocabulary.
//!
//! The built-in vocabulary holds the special tokens, every word the synthetic
//! dataset writes, and single characters (as words and `##` pieces), so any
//! ASCII text tokenises without `[UNK]` floods.

use crate::data::synthetic;
use std::collections::HashMap;
use std::path::Path;
use vlmatch_core::{Error, Result, SpecialTokens, TextBatch};

#[derive(Debug, Clone)]
pub struct Tokenizer {
    vocab: HashMap<String, i64>,
    tokens: Vec<String>,
    lowercase: bool,
    pub special: SpecialTokens,
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];

impl Tokenizer {
    pub fn from_tokens(tokens: Vec<String>, lowercase: bool, origin: &str) -> Result<Self> {
        let mut vocab = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.entry(t.clone()).or_insert(i as i64);
        }
        let id = |t: &str| {
            vocab.get(t).copied().ok_or_else(|| Error::Data {
                path: origin.into(),
                line: None,
                message: format!("vocabulary has no `{t}` token"),
            })
        };
        let special = SpecialTokens {
            pad: id("[PAD]")?,
            unk: id("[UNK]")?,
            cls: id("[CLS]")?,
            sep: id("[SEP]")?,
            mask: id("[MASK]")?,
        };
        Ok(Tokenizer {
            vocab,
            tokens,
            lowercase,
            special,
        })
    }

    /// A BERT `vocab.txt`: one token per line, the line number its id.
    pub fn from_vocab_file(path: &Path, lowercase: bool) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let tokens = text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        Self::from_tokens(tokens, lowercase, &path.display().to_string())
    }

    /// The built-in vocabulary (see the module docs).
    pub fn builtin() -> Self {
        let mut tokens: Vec<String> = SPECIALS.iter().map(|s| s.to_string()).collect();
        let mut words: Vec<&str> = synthetic::WORDS.to_vec();
        words.sort_unstable();
        words.dedup();
        tokens.extend(words.iter().map(|w| w.to_string()));
        let chars = "abcdefghijklmnopqrstuvwxyz0123456789";
        let punct = ".,;:!?'\"()-/&";
        tokens.extend(chars.chars().chain(punct.chars()).map(String::from));
        tokens.extend(chars.chars().map(|c| format!("##{c}")));
        let mut seen = std::collections::HashSet::new();
        tokens.retain(|t| seen.insert(t.clone()));
        Self::from_tokens(tokens, true, "builtin vocabulary")
            .expect("builtin vocabulary has the special tokens")
    }

    pub fn vocab_size(&self) -> i64 {
        self.tokens.len() as i64
    }

    pub fn token(&self, id: i64) -> &str {
        self.tokens
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("[UNK]")
    }

    /// Whitespace and punctuation splitting, lowercasing if configured.
    fn basic(&self, text: &str) -> Vec<String> {
        let text = if self.lowercase {
            text.to_lowercase()
        } else {
            text.to_string()
        };
        let mut words = Vec::new();
        let mut cur = String::new();
        for c in text.chars() {
            if c.is_whitespace() || c.is_control() {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            } else if c.is_ascii_punctuation() || (!c.is_alphanumeric() && !c.is_whitespace()) {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
                words.push(c.to_string());
            } else {
                cur.push(c);
            }
        }
        if !cur.is_empty() {
            words.push(cur);
        }
        words
    }

    /// Greedy longest-match-first word pieces of one word.
    fn wordpiece(&self, word: &str, out: &mut Vec<i64>) {
        let chars: Vec<char> = word.chars().collect();
        if chars.len() > 100 {
            out.push(self.special.unk);
            return;
        }
        let mut pieces = Vec::new();
        let mut start = 0;
        while start < chars.len() {
            let mut end = chars.len();
            let mut found = None;
            while start < end {
                let mut piece: String = chars[start..end].iter().collect();
                if start > 0 {
                    piece.insert_str(0, "##");
                }
                if let Some(&id) = self.vocab.get(&piece) {
                    found = Some(id);
                    break;
                }
                end -= 1;
            }
            match found {
                Some(id) => pieces.push(id),
                None => {
                    out.push(self.special.unk);
                    return;
                }
            }
            start = end;
        }
        out.extend(pieces);
    }

    /// `[CLS] pieces [SEP]`, truncated to `max_len` tokens in all.
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<i64> {
        let mut ids = vec![self.special.cls];
        for word in self.basic(text) {
            self.wordpiece(&word, &mut ids);
        }
        ids.truncate(max_len.saturating_sub(1).max(1));
        ids.push(self.special.sep);
        ids
    }

    /// [`Tokenizer::encode`] with the words (after whitespace and
    /// punctuation splitting) and the token positions each one became;
    /// words cut off by truncation are left out.
    pub fn encode_words(
        &self,
        text: &str,
        max_len: usize,
    ) -> (Vec<i64>, Vec<(String, std::ops::Range<usize>)>) {
        let keep = max_len.saturating_sub(1).max(1);
        let mut ids = vec![self.special.cls];
        let mut words = Vec::new();
        for word in self.basic(text) {
            let start = ids.len();
            self.wordpiece(&word, &mut ids);
            if ids.len() > keep {
                break;
            }
            words.push((word, start..ids.len()));
        }
        ids.truncate(keep);
        ids.push(self.special.sep);
        (ids, words)
    }

    /// [`Tokenizer::encode_batch`] as a [`TextBatch`] on `device`.
    pub fn text_batch(&self, texts: &[&str], max_len: usize, device: tch::Device) -> TextBatch {
        let (ids, mask, l) = self.encode_batch(texts, max_len);
        let shape = [texts.len() as i64, l as i64];
        TextBatch::new(
            tch::Tensor::from_slice(&ids).view(shape).to_device(device),
            tch::Tensor::from_slice(&mask).view(shape).to_device(device),
        )
    }

    /// Encode and pad to the longest in the batch: `(ids, mask, L)`, each
    /// flattened row-major `[B, L]`.
    pub fn encode_batch(&self, texts: &[&str], max_len: usize) -> (Vec<i64>, Vec<i64>, usize) {
        let encoded: Vec<Vec<i64>> = texts.iter().map(|t| self.encode(t, max_len)).collect();
        let l = encoded.iter().map(Vec::len).max().unwrap_or(2);
        let mut ids = Vec::with_capacity(texts.len() * l);
        let mut mask = Vec::with_capacity(texts.len() * l);
        for e in &encoded {
            ids.extend(e);
            mask.extend(std::iter::repeat_n(1, e.len()));
            ids.extend(std::iter::repeat_n(self.special.pad, l - e.len()));
            mask.extend(std::iter::repeat_n(0, l - e.len()));
        }
        (ids, mask, l)
    }
}

/// The tokenizer with the run's maximum length, as plugins see it.
pub struct Codec {
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub max_len: usize,
}

impl vlmatch_core::TextCodec for Codec {
    fn special(&self) -> SpecialTokens {
        self.tokenizer.special
    }
    fn vocab_size(&self) -> i64 {
        self.tokenizer.vocab_size()
    }
    fn encode(&self, texts: &[&str], device: tch::Device) -> TextBatch {
        self.tokenizer.text_batch(texts, self.max_len, device)
    }
    fn token(&self, id: i64) -> String {
        self.tokenizer.token(id).to_string()
    }
    fn pieces(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        for word in self.tokenizer.basic(text) {
            self.tokenizer.wordpiece(&word, &mut ids);
        }
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wordpiece_splits_unknown_words_into_pieces() {
        let t = Tokenizer::builtin();
        let ids = t.encode("A red circle, zebra!", 32);
        let toks: Vec<&str> = ids.iter().map(|&i| t.token(i)).collect();
        assert_eq!(
            toks,
            ["[CLS]", "a", "red", "circle", ",", "z", "##e", "##b", "##r", "##a", "!", "[SEP]"]
        );
    }

    #[test]
    fn words_map_to_their_pieces_and_match_encode() {
        let t = Tokenizer::builtin();
        let (ids, words) = t.encode_words("A red zebra!", 32);
        assert_eq!(ids, t.encode("A red zebra!", 32));
        let spans: Vec<(&str, std::ops::Range<usize>)> =
            words.iter().map(|(w, r)| (w.as_str(), r.clone())).collect();
        assert_eq!(
            spans,
            [("a", 1..2), ("red", 2..3), ("zebra", 3..8), ("!", 8..9)]
        );
        // Truncation drops whole words that do not fit.
        let (ids, words) = t.encode_words("A red zebra!", 6);
        assert_eq!(ids.len(), 6);
        assert_eq!(words.len(), 2);
    }

    #[test]
    fn truncation_keeps_sep_and_padding_masks() {
        let t = Tokenizer::builtin();
        let (ids, mask, l) = t.encode_batch(&["a red circle left of a blue square", "a circle"], 5);
        assert_eq!(l, 5);
        assert_eq!(ids[4], t.special.sep);
        assert_eq!(&mask[5..], &[1, 1, 1, 1, 0]);
        assert_eq!(ids[9], t.special.pad);
    }
}
