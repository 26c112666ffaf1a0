//! `[samplers.<name>]` for `plugin = "neggen"`.

use serde::Deserialize;
use vlmatch_core::Result;
use vlmatch_registry::check;

/// Tags whose words NegGen may replace: nouns and adjectives (Penn Treebank).
pub const DEFAULT_TAGS: [&str; 5] = ["NN", "NNS", "JJ", "JJR", "JJS"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NegGenConfig {
    /// Share of the candidate words masked (at least one).
    #[serde(default = "half")]
    pub mask_ratio: f64,
    #[serde(default = "one")]
    pub temperature: f64,
    /// Sample among the top k tokens only (0: all).
    #[serde(default)]
    pub top_k: i64,
    /// Candidates generated per caption; the first that passes the filter is used.
    #[serde(default = "one_usize")]
    pub candidates: usize,
    /// Drop candidates whose ITM match probability is above this.
    #[serde(default = "half")]
    pub filter_threshold: f64,
    /// Training steps before the ITM filter applies (an untrained ITM head
    /// says nothing).
    #[serde(default)]
    pub filter_after_steps: i64,
    /// POS tags of replaceable words.
    #[serde(default = "default_tags")]
    pub tags: Vec<String>,
    /// Drop a candidate unless every replacement is itself tagged with one
    /// of `tags` in the new caption (a noun stays a noun): the fluency check
    /// that keeps fills like "on a black in" out.
    #[serde(default = "yes")]
    pub pos_check: bool,
    /// Fill with this fixed masked language model instead of the model's
    /// generator: a HuggingFace `BertForMaskedLM` directory (`config.json`,
    /// `model.safetensors`, `tokenizer.json` or `vocab.txt`). Its tokenizer
    /// may differ from the run's: negatives are re-tokenised as text.
    #[serde(default)]
    pub fill_model: Option<std::path::PathBuf>,
}

impl NegGenConfig {
    /// Every key in range; `key` is the section (`samplers.neggen`) errors name.
    pub fn check(&self, key: &str) -> Result<()> {
        let k = |field: &str| format!("{key}.{field}");
        if !(self.mask_ratio > 0.0 && self.mask_ratio <= 1.0) {
            return Err(check::invalid(
                &k("mask_ratio"),
                format!("must be in (0, 1], got {}", self.mask_ratio),
            ));
        }
        check::positive_f64(&k("temperature"), self.temperature)?;
        check::at_least(&k("top_k"), self.top_k, 0)?;
        check::positive(
            &k("candidates"),
            i64::try_from(self.candidates).unwrap_or(i64::MAX),
        )?;
        check::probability(&k("filter_threshold"), self.filter_threshold)?;
        check::at_least(&k("filter_after_steps"), self.filter_after_steps, 0)?;
        Ok(())
    }
}

fn yes() -> bool {
    true
}

fn half() -> f64 {
    0.5
}
fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
/// [`DEFAULT_TAGS`] as owned strings.
pub fn default_tags_vec() -> Vec<String> {
    default_tags()
}

fn default_tags() -> Vec<String> {
    DEFAULT_TAGS.iter().map(|t| t.to_string()).collect()
}
