//! Step 1: part-of-speech tagging, which words are candidates, and the
//! loader-side [`TagPrep`].

use std::sync::Arc;
use vlmatch_core::{CaptionPrep, Prepared};

/// Part-of-speech tagging of whitespace-separated words. `Send + Sync`:
/// the data loader's worker threads tag captions ahead of the step.
pub trait PosTagger: Send + Sync {
    /// One Penn Treebank tag per word (trailing punctuation already removed).
    fn tag_words(&self, words: &[&str]) -> Vec<String>;
}

/// The default tagger: `english-pos-tagger`'s Brill-style lexicon and rules.
pub struct BrillTagger(english_pos_tagger::Tagger);

impl BrillTagger {
    pub fn new() -> Self {
        BrillTagger(english_pos_tagger::Tagger::new())
    }
}

impl Default for BrillTagger {
    fn default() -> Self {
        Self::new()
    }
}

impl PosTagger for BrillTagger {
    fn tag_words(&self, words: &[&str]) -> Vec<String> {
        self.0
            .tag_raw_tokens(words)
            .into_iter()
            .map(|t| t.pos.unwrap_or_default())
            .collect()
    }
}

/// A word's text without trailing punctuation.
pub fn core(word: &str) -> &str {
    word.trim_end_matches(|c: char| c.is_ascii_punctuation())
}

/// Indices (into `caption.split(' ')`) of the words tagged with one of `tags`.
pub fn candidate_words(caption: &str, tagger: &dyn PosTagger, tags: &[String]) -> Vec<usize> {
    tagged_candidates(caption, tagger, tags)
        .into_iter()
        .map(|(i, _)| i)
        .collect()
}

/// [`candidate_words`] with each word's tag.
pub fn tagged_candidates(
    caption: &str,
    tagger: &dyn PosTagger,
    tags: &[String],
) -> Vec<(usize, String)> {
    let words: Vec<&str> = caption.split(' ').collect();
    let cores: Vec<&str> = words.iter().map(|w| core(w)).collect();
    let nonempty: Vec<usize> = (0..cores.len())
        .filter(|&i| cores[i].chars().any(char::is_alphabetic))
        .collect();
    let tagged = tagger.tag_words(&nonempty.iter().map(|&i| cores[i]).collect::<Vec<_>>());
    nonempty
        .into_iter()
        .zip(tagged)
        .filter(|(_, t)| tags.iter().any(|x| x == t))
        .collect()
}

/// Whether every word index in `masked` is, in `text`, still tagged with one
/// of `tags` (NegGen's `pos_check`: a noun stays a noun or adjective).
pub fn replacements_keep_their_kind(
    text: &str,
    masked: &[usize],
    tagger: &dyn PosTagger,
    tags: &[String],
) -> bool {
    let tagged = tagged_candidates(text, tagger, tags);
    masked.iter().all(|w| tagged.iter().any(|(i, _)| i == w))
}

/// `caption` with its candidate words in brackets (`A [red] [car].`), the
/// form of the golden tagging file.
pub fn mark_candidates(caption: &str, tagger: &dyn PosTagger, tags: &[String]) -> String {
    let picked = candidate_words(caption, tagger, tags);
    caption
        .split(' ')
        .enumerate()
        .map(|(i, w)| {
            if picked.contains(&i) {
                format!("[{w}]")
            } else {
                w.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A caption's replaceable words with their tags, as [`tagged_candidates`]
/// gives them.
pub type Tagged = Vec<(usize, String)>;

/// NegGen's per-caption CPU work, which the data loader does on its worker
/// threads: POS tagging ([`tagged_candidates`]), result type [`Tagged`].
pub struct TagPrep {
    tagger: Arc<dyn PosTagger>,
    tags: Vec<String>,
}

impl TagPrep {
    pub fn new(tagger: Arc<dyn PosTagger>, tags: Vec<String>) -> Self {
        TagPrep { tagger, tags }
    }
}

impl CaptionPrep for TagPrep {
    fn key(&self) -> String {
        format!("neggen.pos_tags:{}", self.tags.join(","))
    }
    fn prepare(&self, caption: &str) -> Prepared {
        Arc::new(tagged_candidates(caption, self.tagger.as_ref(), &self.tags))
    }
}
