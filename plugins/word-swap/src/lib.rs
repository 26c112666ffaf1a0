//! A rule-based source of fine-grained negative captions: one word of the
//! caption that belongs to a group of interchangeable words (colors, shapes,
//! sizes, ...) is swapped for another word of its group, "a red circle" ->
//! "a blue circle". It is NegGen's cheap stand-in (no language model, no
//! filter) and useful in tests; FG-ITM reads its captions as text negatives.
//!
//! Registered as negative sampler `word_swap`. Key: `groups`, a list of word
//! lists (default: [`default_groups`]). Captions without a swappable word
//! yield no negative.

use serde::Deserialize;
use std::collections::HashMap;
use std::rc::Rc;
use vlmatch_core::{
    Error, NegativeSampler, Negatives, Result, SamplerInput, TextCodec, WordSwapper,
};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(negative_sampler "word_swap" => build);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WordSwapConfig {
    #[serde(default = "default_groups")]
    pub groups: Vec<Vec<String>>,
}

/// Colors, shapes, sizes, positions, counts, people and animals.
pub fn default_groups() -> Vec<Vec<String>> {
    let g: &[&[&str]] = &[
        &[
            "red", "green", "blue", "yellow", "purple", "orange", "white", "black", "gray",
            "brown", "pink",
        ],
        &["circle", "square", "triangle", "diamond"],
        &["small", "large", "big", "little", "tall", "short"],
        &["left", "right"],
        &["top", "bottom"],
        &["one", "two", "three", "four"],
        &["man", "woman", "boy", "girl", "child"],
        &["dog", "cat", "horse", "cow", "sheep", "bird"],
    ];
    g.iter()
        .map(|ws| ws.iter().map(|w| w.to_string()).collect())
        .collect()
}

/// One swap: the word index (whitespace-separated), old and new word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    pub text: String,
    pub index: usize,
    pub original: String,
    pub replacement: String,
}

pub struct WordSwap {
    codec: Option<Rc<dyn TextCodec>>,
    /// word -> its group's index
    group_of: HashMap<String, usize>,
    groups: Vec<Vec<String>>,
}

impl WordSwap {
    /// `codec` encodes the new captions; `None` only for [`WordSwap::swap`].
    pub fn new(groups: Vec<Vec<String>>, codec: Option<Rc<dyn TextCodec>>) -> Result<Self> {
        let mut group_of = HashMap::new();
        for (g, words) in groups.iter().enumerate() {
            for w in words {
                if let Some(prev) = group_of.insert(w.to_lowercase(), g) {
                    // Twice in one group, it would leave a group of one
                    // distinct word to draw a replacement from.
                    return Err(Error::Config(if prev != g {
                        format!("word_swap groups: `{w}` is in two groups ({prev} and {g})")
                    } else {
                        format!("word_swap groups: `{w}` is listed twice in group {g}")
                    }));
                }
            }
        }
        Ok(WordSwap {
            codec,
            group_of,
            groups,
        })
    }

    /// Swap one word of `caption`, choosing with `draw(n)` (uniform in
    /// `0..n`); `None` if no word belongs to a group of two or more.
    pub fn swap(&self, caption: &str, mut draw: impl FnMut(usize) -> usize) -> Option<Swap> {
        let words: Vec<&str> = caption.split(' ').collect();
        let candidates: Vec<(usize, usize, &str)> = words
            .iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let core = w.trim_end_matches(|c: char| c.is_ascii_punctuation());
                let g = *self.group_of.get(&core.to_lowercase())?;
                (self.groups[g].len() > 1).then_some((i, g, core))
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let (index, g, core) = candidates[draw(candidates.len())];
        let others: Vec<&String> = self.groups[g]
            .iter()
            .filter(|w| w.to_lowercase() != core.to_lowercase())
            .collect();
        let replacement = others[draw(others.len())].clone();
        let suffix = &words[index][core.len()..];
        let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        out[index] = format!("{replacement}{suffix}");
        Some(Swap {
            text: out.join(" "),
            index,
            original: core.to_string(),
            replacement,
        })
    }
}

impl WordSwapper for WordSwap {
    fn groups(&self) -> &[Vec<String>] {
        &self.groups
    }

    fn swap_word(&self, caption: &str, draw: &mut dyn FnMut(usize) -> usize) -> Option<String> {
        self.swap(caption, draw).map(|s| s.text)
    }
}

impl NegativeSampler for WordSwap {
    /// The swapper itself, for the matching evaluation.
    fn word_swapper(&self) -> Option<&dyn WordSwapper> {
        Some(self)
    }

    fn sample(&self, input: &SamplerInput<'_, '_>) -> Result<Negatives> {
        let batch = input.forward.batch;
        let device = batch.text.ids.device();
        // Two draws per caption, keyed by sample (`vlmatch_core::random`),
        // computed on the host: no read-back from the device.
        let draws = vlmatch_core::random::uniform_host(&input.forward.random_keys_host(), 2);
        let mut index = Vec::new();
        let mut texts = Vec::new();
        for (i, caption) in batch.captions.iter().enumerate() {
            let mut k = 0;
            let swap = self.swap(caption, |n| {
                let d = vlmatch_core::random::below(draws[2 * i + k], n);
                k += 1;
                d
            });
            if let Some(s) = swap {
                index.push(i as i64);
                texts.push(s.text);
            }
        }
        let codec = self
            .codec
            .as_ref()
            .ok_or_else(|| Error::plugin("word_swap", "built without a tokenizer"))?;
        Ok(Negatives::from_texts(
            codec.as_ref(),
            &index,
            &texts,
            device,
        ))
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Box<dyn NegativeSampler>> {
    let cfg: WordSwapConfig = ctx.params()?;
    let sampler = WordSwap::new(cfg.groups, Some(ctx.env.text.clone())).map_err(|e| {
        let why = e.to_string();
        let why = why.strip_prefix("word_swap groups: ").unwrap_or(&why);
        vlmatch_registry::check::invalid(&format!("{}.groups", ctx.key), why)
    })?;
    Ok(Box::new(sampler))
}
