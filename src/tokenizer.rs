//! Text to token ids: BERT's WordPiece (basic tokenisation, then greedy
//! longest-match word pieces) over a `vocab.txt` or the built-in vocabulary,
//! or a HuggingFace `tokenizer.json` run by the `tokenizers` crate.
//!
//! The built-in vocabulary holds the special tokens, every word the synthetic
//! dataset writes, and single characters (as words and `##` pieces), so any
//! ASCII text tokenises without `[UNK]` floods.
//!
//! A `tokenizer.json` brings its own normalisation (lowercasing included),
//! pre-tokenisation and post-processor; its special tokens are BERT's
//! (`[PAD]`, `[UNK]`, `[CLS]`, `[SEP]`, `[MASK]`) or RoBERTa's (`<pad>`,
//! `<unk>`, `<s>`, `</s>`, `<mask>`). Truncation and padding saved in the file
//! are ignored: [`Tokenizer::encode`] truncates to its `max_len`, keeping the
//! post-processor's final token, and batches pad to the longest with the pad
//! id. NegGen tells a word's pieces apart by WordPiece's `##` continuations
//! or byte-level BPE's `Ġ` word starts.

use crate::data::synthetic;
use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use tokenizers::{Encoding, TruncationDirection};
use vlmatch_core::{Error, Result, SpecialTokens, TextBatch};

#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Token text by id (a HuggingFace vocabulary's unused ids read
    /// `[unusedN]`).
    tokens: Vec<String>,
    pub special: SpecialTokens,
    /// Where the vocabulary came from: a file, or `builtin vocabulary`.
    origin: String,
    backend: Backend,
    /// `data.max_caption_bytes` ([`Tokenizer::caption_prefix`]).
    pub max_caption_bytes: Option<usize>,
}

#[derive(Debug, Clone)]
enum Backend {
    /// vlmatch's own WordPiece.
    WordPiece {
        vocab: HashMap<String, i64>,
        lowercase: bool,
    },
    /// A HuggingFace `tokenizer.json`, its truncation and padding off.
    Hf(Box<Hf>),
}

/// A HuggingFace tokenizer twice: `full` as loaded, `raw` without its
/// post-processor, for the pieces that `full`'s post-processor then finishes
/// once (a second pass would trim byte-level offsets again).
#[derive(Debug, Clone)]
struct Hf {
    full: tokenizers::Tokenizer,
    raw: tokenizers::Tokenizer,
}

const SPECIALS: [&str; 5] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"];
/// RoBERTa's names for pad, unk, cls, sep and mask.
const ROBERTA_SPECIALS: [&str; 5] = ["<pad>", "<unk>", "<s>", "</s>", "<mask>"];

impl Tokenizer {
    /// A WordPiece vocabulary, the id of a token its index; a token listed
    /// twice gets its last index, as BERT's `vocab.txt` loader does.
    pub fn from_tokens(tokens: Vec<String>, lowercase: bool, origin: &str) -> Result<Self> {
        let mut vocab = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            vocab.insert(t.clone(), i as i64);
        }
        let special = special_tokens(origin, &SPECIALS, |t| vocab.get(t).copied())?;
        Ok(Tokenizer {
            tokens,
            special,
            origin: origin.to_string(),
            backend: Backend::WordPiece { vocab, lowercase },
            max_caption_bytes: None,
        })
    }

    /// A BERT `vocab.txt`: one token per line, the line number its id.
    pub fn from_vocab_file(path: &Path, lowercase: bool) -> Result<Self> {
        let text = vlmatch_registry::check::read_utf8(path)?;
        let tokens = text
            .lines()
            .map(|l| l.trim_end_matches('\r').to_string())
            .collect();
        Self::from_tokens(tokens, lowercase, &path.display().to_string())
    }

    /// A HuggingFace `tokenizer.json` (any model the `tokenizers` crate
    /// reads: WordPiece, BPE, Unigram, WordLevel). Its special tokens are
    /// BERT's when it has `[CLS]`, else RoBERTa's; one missing is an error
    /// naming the file and the token. A tokenizer without a post-processor
    /// gets `cls $A sep`.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let bad = |message: String| Error::Data {
            path: path.into(),
            line: None,
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut hf = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| bad(format!("not a HuggingFace tokenizer.json: {e}")))?;
        hf.with_truncation(None)
            .map_err(|e| bad(format!("cannot turn truncation off: {e}")))?;
        hf.with_padding(None);
        let vocab = hf.get_vocab(true);
        let names = if vocab.contains_key("[CLS]") || !vocab.contains_key("<s>") {
            SPECIALS
        } else {
            ROBERTA_SPECIALS
        };
        let special = special_tokens(&origin, &names, |t| vocab.get(t).map(|&i| i as i64))?;
        if hf.get_post_processor().is_none() {
            let (cls, sep) = (names[2], names[3]);
            let template = tokenizers::processors::template::TemplateProcessing::builder()
                .try_single(format!("{cls} $A {sep}"))
                .and_then(|b| {
                    b.special_tokens(vec![(cls, special.cls as u32), (sep, special.sep as u32)])
                        .build()
                        .map_err(|e| e.to_string())
                })
                .map_err(|e| bad(format!("cannot add `{cls} ... {sep}`: {e}")))?;
            hf.with_post_processor(Some(template));
        }
        // An id far past the size would size the token table (u32::MAX aborted).
        let (size, limit) = (vocab.len(), vocab.len().saturating_mul(2) + 1024);
        if let Some((t, &i)) = vocab.iter().find(|(_, &i)| i as usize >= limit) {
            let m = format!("token {t:?} has id {i}, far past the vocabulary's {size} tokens");
            return Err(bad(m));
        }
        let n = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let mut tokens: Vec<String> = (0..n).map(|i| format!("[unused{i}]")).collect();
        for (t, i) in vocab {
            tokens[i as usize] = t;
        }
        let mut raw = hf.clone();
        raw.with_post_processor(None::<tokenizers::PostProcessorWrapper>);
        let tok = Tokenizer {
            tokens,
            special,
            origin,
            backend: Backend::Hf(Box::new(Hf { full: hf, raw })),
            max_caption_bytes: None,
        };
        // vlmatch reads the text's [CLS] at position 0 and ends it with [SEP].
        let empty = tok.encode("", usize::MAX);
        if empty != [special.cls, special.sep] {
            let got: Vec<&str> = empty.iter().map(|&i| tok.token(i)).collect();
            return Err(bad(format!(
                "its post-processor turns an empty text into {got:?}; vlmatch needs [{:?}, {:?}]",
                tok.token(special.cls),
                tok.token(special.sep)
            )));
        }
        Ok(tok)
    }

    /// A `tokenizer.json` (a `.json` file), a `vocab.txt` (any other file),
    /// or a directory holding either (`tokenizer.json` preferred).
    /// `lowercase` applies to `vocab.txt` only.
    pub fn from_path(path: &Path, lowercase: bool) -> Result<Self> {
        if path.is_dir() {
            let json = path.join("tokenizer.json");
            let vocab = path.join("vocab.txt");
            return if json.is_file() {
                Self::from_tokenizer_json(&json)
            } else if vocab.is_file() {
                Self::from_vocab_file(&vocab, lowercase)
            } else {
                Err(Error::Data {
                    path: path.into(),
                    line: None,
                    message: "directory has neither tokenizer.json nor vocab.txt".into(),
                })
            };
        }
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        {
            Self::from_tokenizer_json(path)
        } else {
            Self::from_vocab_file(path, lowercase)
        }
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

    /// `text` cut to `max_caption_bytes` (`None`: 64 x `max_len`) at a char boundary.
    pub fn caption_prefix<'t>(&self, text: &'t str, max_len: usize) -> &'t str {
        let max = self.max_caption_bytes.unwrap_or(max_len.saturating_mul(64));
        let mut end = max.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        &text[..end]
    }

    /// The vocabulary's file, or `builtin vocabulary`.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The HuggingFace tokenizer, when this one came from a `tokenizer.json`.
    pub fn hf(&self) -> Option<&tokenizers::Tokenizer> {
        match &self.backend {
            Backend::Hf(hf) => Some(&hf.full),
            Backend::WordPiece { .. } => None,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        self.tokens.len() as i64
    }

    pub fn token(&self, id: i64) -> &str {
        self.tokens
            .get(id as usize)
            .or_else(|| self.tokens.get(self.special.unk as usize))
            .map_or("[UNK]", String::as_str)
    }

    /// The ids of `text` without special tokens or truncation.
    pub fn pieces(&self, text: &str) -> Vec<i64> {
        match &self.backend {
            Backend::WordPiece { vocab, lowercase } => {
                let mut ids = Vec::new();
                for word in basic(text, *lowercase) {
                    wordpiece(vocab, self.special.unk, &word, &mut ids);
                }
                ids
            }
            Backend::Hf(hf) => ids_of(&self.hf_pieces(hf, text, false)),
        }
    }

    /// `text` through a HuggingFace tokenizer, special tokens left out; an
    /// error (none is expected once loaded) becomes one unknown token.
    fn hf_pieces(&self, hf: &Hf, text: &str, offsets: bool) -> Encoding {
        let enc = if offsets {
            hf.raw.encode(text, false)
        } else {
            hf.raw.encode_fast(text, false)
        };
        enc.unwrap_or_else(|e| {
            tracing::warn!(tokenizer = %self.origin, text, "cannot tokenise: {e}");
            let unk = tokenizers::Token::new(
                self.special.unk as u32,
                self.token(self.special.unk).to_string(),
                (0, text.len()),
            );
            Encoding::from_tokens(vec![unk], 0)
        })
    }

    /// `pieces` cut to leave room for the post-processor's tokens, then
    /// post-processed (`[CLS] ... [SEP]`).
    fn hf_finish(&self, hf: &Hf, mut pieces: Encoding, max_len: usize) -> Encoding {
        let hf = &hf.full;
        let added = hf
            .get_post_processor()
            .map_or(0, |p| tokenizers::PostProcessor::added_tokens(p, false));
        pieces.truncate(max_len.saturating_sub(added), 0, TruncationDirection::Right);
        pieces.take_overflowing();
        hf.post_process(pieces, None, true).unwrap_or_else(|e| {
            tracing::warn!(tokenizer = %self.origin, "cannot add special tokens: {e}");
            let token = |id: i64| tokenizers::Token::new(id as u32, self.token(id).into(), (0, 0));
            Encoding::from_tokens(vec![token(self.special.cls), token(self.special.sep)], 0)
        })
    }

    /// `[CLS] pieces [SEP]`, truncated to `max_len` tokens in all (the final
    /// `[SEP]` kept).
    pub fn encode(&self, text: &str, max_len: usize) -> Vec<i64> {
        let text = self.caption_prefix(text, max_len);
        match &self.backend {
            Backend::WordPiece { .. } => {
                let mut ids = vec![self.special.cls];
                ids.extend(self.pieces(text));
                ids.truncate(max_len.saturating_sub(1).max(1));
                ids.push(self.special.sep);
                ids
            }
            Backend::Hf(hf) => {
                let pieces = self.hf_pieces(hf, text, false);
                ids_of(&self.hf_finish(hf, pieces, max_len))
            }
        }
    }

    /// [`Tokenizer::encode`] with the words and the token positions each
    /// one became; words cut off by truncation are left out. WordPiece
    /// words are those of whitespace and punctuation splitting (lowercased
    /// if configured); a `tokenizer.json`'s are its pre-tokenizer's, as
    /// they appear in `text`.
    pub fn encode_words(
        &self,
        text: &str,
        max_len: usize,
    ) -> (Vec<i64>, Vec<(String, Range<usize>)>) {
        let text = self.caption_prefix(text, max_len);
        let (vocab, lowercase) = match &self.backend {
            Backend::WordPiece { vocab, lowercase } => (vocab, *lowercase),
            Backend::Hf(hf) => return self.hf_encode_words(hf, text, max_len),
        };
        let keep = max_len.saturating_sub(1).max(1);
        let mut ids = vec![self.special.cls];
        let mut words = Vec::new();
        for word in basic(text, lowercase) {
            let start = ids.len();
            wordpiece(vocab, self.special.unk, &word, &mut ids);
            if ids.len() > keep {
                break;
            }
            words.push((word, start..ids.len()));
        }
        ids.truncate(keep);
        ids.push(self.special.sep);
        (ids, words)
    }

    /// [`Tokenizer::encode_words`] from the encoding's word ids and offsets.
    fn hf_encode_words(
        &self,
        hf: &Hf,
        text: &str,
        max_len: usize,
    ) -> (Vec<i64>, Vec<(String, Range<usize>)>) {
        let pieces = self.hf_pieces(hf, text, true);
        // Each word's piece count before truncation.
        let mut full: HashMap<u32, usize> = HashMap::new();
        for w in pieces.get_word_ids().iter().flatten() {
            *full.entry(*w).or_default() += 1;
        }
        let enc = self.hf_finish(hf, pieces, max_len);
        let mut words: Vec<(u32, Range<usize>, Range<usize>)> = Vec::new();
        for (pos, (word, &(a, b))) in enc.get_word_ids().iter().zip(enc.get_offsets()).enumerate() {
            let Some(word) = *word else { continue };
            match words.last_mut() {
                Some((w, tokens, chars)) if *w == word => {
                    tokens.end = pos + 1;
                    chars.start = chars.start.min(a);
                    chars.end = chars.end.max(b);
                }
                _ => words.push((word, pos..pos + 1, a..b)),
            }
        }
        let words = words
            .into_iter()
            .filter(|(w, tokens, _)| full.get(w) == Some(&tokens.len()))
            .map(|(_, tokens, chars)| {
                let word = text.get(chars).unwrap_or_default().trim().to_string();
                (word, tokens)
            })
            .collect();
        (ids_of(&enc), words)
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

/// The ids of the special tokens named `names` (pad, unk, cls, sep, mask).
fn special_tokens(
    origin: &str,
    names: &[&str; 5],
    id: impl Fn(&str) -> Option<i64>,
) -> Result<SpecialTokens> {
    let get = |t: &str| {
        id(t).ok_or_else(|| Error::Data {
            path: origin.into(),
            line: None,
            message: format!("vocabulary has no `{t}` token"),
        })
    };
    Ok(SpecialTokens {
        pad: get(names[0])?,
        unk: get(names[1])?,
        cls: get(names[2])?,
        sep: get(names[3])?,
        mask: get(names[4])?,
    })
}

fn ids_of(enc: &Encoding) -> Vec<i64> {
    enc.get_ids().iter().map(|&i| i64::from(i)).collect()
}

/// Whitespace and punctuation splitting, lowercasing if asked.
fn basic(text: &str, lowercase: bool) -> Vec<String> {
    let text = if lowercase {
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
fn wordpiece(vocab: &HashMap<String, i64>, unk: i64, word: &str, out: &mut Vec<i64>) {
    let chars: Vec<char> = word.chars().collect();
    if chars.len() > 100 {
        out.push(unk);
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
            if let Some(&id) = vocab.get(&piece) {
                found = Some(id);
                break;
            }
            end -= 1;
        }
        match found {
            Some(id) => pieces.push(id),
            None => {
                out.push(unk);
                return;
            }
        }
        start = end;
    }
    out.extend(pieces);
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
        self.tokenizer.pieces(text)
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

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name)
    }

    const BERT: &str = "bert-h48-3heads-vocab";
    const ROBERTA: &str = "tokenizer-roberta-bpe";

    fn hf(name: &str) -> Tokenizer {
        Tokenizer::from_tokenizer_json(&fixture(name).join("tokenizer.json")).unwrap()
    }

    fn spans(words: &[(String, Range<usize>)]) -> Vec<(&str, Range<usize>)> {
        words.iter().map(|(w, r)| (w.as_str(), r.clone())).collect()
    }

    /// A copy of a fixture's tokenizer.json with `edit` applied, in a
    /// scratch directory removed on drop.
    fn edited(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> Scratch {
        let src = std::fs::read_to_string(fixture(name).join("tokenizer.json")).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&src).unwrap();
        edit(&mut json);
        let dir = std::env::temp_dir().join(format!(
            "vlmatch-tokenizer-{name}-{}-{}",
            std::process::id(),
            EDITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        std::fs::write(&path, json.to_string()).unwrap();
        Scratch(path)
    }

    /// A file in a scratch directory of its own.
    struct Scratch(std::path::PathBuf);
    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
        }
    }
    static EDITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

    #[test]
    fn tokenizer_json_ids_equal_transformers() {
        for name in [BERT, ROBERTA] {
            let dir = fixture(name);
            let texts: Vec<String> =
                serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap())
                    .unwrap();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let expected: HashMap<String, tch::Tensor> =
                tch::Tensor::read_safetensors(dir.join("expected.safetensors"))
                    .unwrap()
                    .into_iter()
                    .collect();
            let want = |k: &str| Vec::<i64>::try_from(expected[k].flatten(0, 1)).unwrap();
            let t = hf(name);
            let (ids, mask, _) = t.encode_batch(&refs, 512);
            assert_eq!(ids, want("input_ids"), "{name}");
            assert_eq!(mask, want("attention_mask"), "{name}");
        }
        // transformers on the BERT fixture: `a` is the vocabulary's last `a`
        // (id 19; it is listed twice), `zebra` five pieces.
        let t = hf(BERT);
        assert_eq!(
            t.encode("Large zebra, small circle", 64),
            [2, 11, 44, 51, 48, 64, 47, 46, 10, 8, 3]
        );
        assert_eq!(t.encode("A red", 64), [2, 19, 6, 3]);
        assert_eq!(t.pieces("A red"), [19, 6]);
        assert_eq!(t.token(46), ",");
        assert_eq!(t.vocab_size(), 73);
        // vocab.txt's second `a` wins there too, as in BERT's loader.
        let v = Tokenizer::from_vocab_file(&fixture(BERT).join("vocab.txt"), true).unwrap();
        assert_eq!(v.encode("A red", 64), [2, 19, 6, 3]);
        assert!(v.hf().is_none() && t.hf().is_some());
    }

    #[test]
    fn special_tokens_of_bert_and_roberta_style_files() {
        let bert = hf(BERT).special;
        assert_eq!(
            (bert.pad, bert.unk, bert.cls, bert.sep, bert.mask),
            (0, 1, 2, 3, 4)
        );
        let t = hf(ROBERTA);
        let s = t.special;
        let names: Vec<&str> = [s.pad, s.unk, s.cls, s.sep, s.mask]
            .iter()
            .map(|&i| t.token(i))
            .collect();
        assert_eq!(names, ["<pad>", "<unk>", "<s>", "</s>", "<mask>"]);
        assert_eq!((s.pad, s.cls, s.sep), (1, 0, 2));
        let ids = t.encode("the dog runs", 64);
        assert_eq!((ids[0], ids[ids.len() - 1]), (s.cls, s.sep));
    }

    #[test]
    fn tokenizer_json_truncation_keeps_the_final_sep() {
        let text = "A red circle left of a blue square.";
        let t = hf(BERT);
        assert_eq!(t.encode(text, 5), [2, 19, 6, 8, 3]);
        let r = hf(ROBERTA);
        assert_eq!(r.encode(text, 5), [0, 37, 288, 290, 2]);
        let (ids, mask, l) = r.encode_batch(&[text, "the dog runs"], 4);
        assert_eq!(l, 4);
        assert_eq!(ids, [0, 37, 288, 2, 0, 276, 291, 2]);
        assert_eq!(mask, [1; 8]);
        let (ids, mask, l) = r.encode_batch(&[text, "the dog"], 6);
        assert_eq!(
            (l, &ids[6..], &mask[6..]),
            (6, &[0, 276, 291, 2, 1, 1][..], &[1, 1, 1, 1, 0, 0][..])
        );
    }

    #[test]
    fn tokenizer_json_word_spans_cover_multi_piece_words() {
        let text = "Large zebra, small circle";
        let t = hf(BERT);
        let (ids, words) = t.encode_words(text, 64);
        assert_eq!(ids, t.encode(text, 64));
        assert_eq!(
            spans(&words),
            [
                ("Large", 1..2),
                ("zebra", 2..7),
                (",", 7..8),
                ("small", 8..9),
                ("circle", 9..10)
            ]
        );
        // Truncation drops the words that do not fit whole.
        let (ids, words) = t.encode_words(text, 8);
        assert_eq!((ids.len(), ids[7]), (8, 3));
        assert_eq!(spans(&words), [("Large", 1..2), ("zebra", 2..7)]);
        let (_, words) = t.encode_words(text, 6);
        assert_eq!(spans(&words), [("Large", 1..2)]);
        // Byte-level BPE: `Large` is three pieces, ` zebra` six (a lone
        // space piece first), `small` three.
        let r = hf(ROBERTA);
        let (ids, words) = r.encode_words(text, 64);
        assert_eq!(ids, r.encode(text, 64));
        assert_eq!(
            spans(&words),
            [
                ("Large", 1..4),
                ("zebra", 4..10),
                (",", 10..11),
                ("small", 11..14),
                ("circle", 14..15)
            ]
        );
    }

    #[test]
    fn a_missing_special_token_is_an_error_naming_file_and_token() {
        let path = edited(BERT, |j| {
            j["model"]["vocab"]
                .as_object_mut()
                .unwrap()
                .remove("[MASK]");
            j["added_tokens"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t["content"] != "[MASK]");
        });
        let err = Tokenizer::from_tokenizer_json(&path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("`[MASK]`"),
            "{err}"
        );
        let path = edited(ROBERTA, |j| {
            j["model"]["vocab"].as_object_mut().unwrap().remove("<pad>");
            j["added_tokens"]
                .as_array_mut()
                .unwrap()
                .retain(|t| t["content"] != "<pad>");
        });
        let err = Tokenizer::from_path(&path, true).unwrap_err().to_string();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("`<pad>`"),
            "{err}"
        );
        let bad = path.with_file_name("broken.json");
        std::fs::write(&bad, "{\"model\": 3}").unwrap();
        let err = Tokenizer::from_path(&bad, true).unwrap_err().to_string();
        assert!(
            err.contains("broken.json") && err.contains("tokenizer.json"),
            "{err}"
        );
    }

    #[test]
    fn saved_truncation_and_padding_are_ignored_and_a_missing_post_processor_is_added() {
        let path = edited(BERT, |j| {
            j["truncation"] = serde_json::json!({
                "direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0
            });
            j["padding"] = serde_json::json!({
                "strategy": {"Fixed": 20}, "direction": "Right", "pad_to_multiple_of": null,
                "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"
            });
            j["post_processor"] = serde_json::Value::Null;
        });
        let t = Tokenizer::from_tokenizer_json(&path).unwrap();
        assert_eq!(
            t.encode("Large zebra, small circle", 64),
            [2, 11, 44, 51, 48, 64, 47, 46, 10, 8, 3]
        );
        assert_eq!(t.encode("Large zebra, small circle", 4), [2, 11, 44, 3]);
    }

    #[test]
    fn a_directory_prefers_tokenizer_json_then_vocab_txt() {
        let t = Tokenizer::from_path(&fixture(BERT), true).unwrap();
        assert!(t.origin().ends_with("tokenizer.json"), "{}", t.origin());
        let scratch = edited(BERT, |_| {});
        let dir = scratch.parent().unwrap();
        std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
        let err = Tokenizer::from_path(dir, true).unwrap_err().to_string();
        assert!(
            err.contains("neither tokenizer.json nor vocab.txt"),
            "{err}"
        );
        std::fs::copy(fixture(BERT).join("vocab.txt"), dir.join("vocab.txt")).unwrap();
        let v = Tokenizer::from_path(dir, true).unwrap();
        assert!(v.hf().is_none() && v.origin().ends_with("vocab.txt"));
        assert_eq!(
            v.encode("Large zebra, small circle", 64),
            t.encode("Large zebra, small circle", 64)
        );
    }
}
