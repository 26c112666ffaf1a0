//! BERT's masked-language-model head (`BertForMaskedLM`'s
//! `cls.predictions`): dense + GELU + LayerNorm, then a decoder whose weights
//! are the text encoder's word embeddings (tied) plus a bias. Parameter names
//! match HuggingFace so a checkpoint's MLM head loads by name.
//!
//! Registered as generator `mlm_head`. It serves MLM (on fused states),
//! VL-RTD's generator (on text-only states) and NegGen's mask filling.

use serde::Deserialize;
use std::path::Path;
use std::rc::Rc;
use vlmatch_core::{Generator, Result};
use vlmatch_layers::lm_head::{build_lm_head, HeadNames, LmHead, LmHeadNames};
use vlmatch_registry::weights::{hub_name, CheckpointArch, CheckpointLayout, LoadContext};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(generator "mlm_head" => build, layout = &MlmHeadLayout);

/// The checkpoint layout registered with generator `mlm_head`: a
/// `BertForMaskedLM`'s `cls.predictions.*`, under the same names (the
/// decoder weight is the tied word-embedding matrix and is not loaded).
pub struct MlmHeadLayout;

impl CheckpointLayout for MlmHeadLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["bert"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["BertForMaskedLM", "BertForPreTraining"]
    }

    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let n = hub_name(name, &[]);
        let tail = n.strip_prefix("cls.predictions.")?;
        (tail != "decoder.weight" && tail != "decoder.bias").then_some(n)
    }

    /// The head's epsilon is the checkpoint's `layer_norm_eps`.
    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let eps = config_eps(dir).unwrap_or_else(eps);
        let mut section = serde_json::Map::new();
        section.insert("layer_norm_eps".into(), eps.into());
        Ok(Some(CheckpointArch {
            section,
            max_text_len: None,
            vocab_size: None,
        }))
    }
}

/// `dir/config.json`'s `layer_norm_eps`.
fn config_eps(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("layer_norm_eps")?
        .as_f64()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlmHeadConfig {
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn eps() -> f64 {
    1e-12
}

/// `BertForMaskedLM`'s names of its `cls.predictions`.
pub struct BertHeadNames;

impl HeadNames for BertHeadNames {
    const NAMES: LmHeadNames = LmHeadNames {
        root: &["cls", "predictions"],
        dense: &["transform", "dense"],
        layer_norm: &["transform", "LayerNorm"],
    };
}

/// BERT's MLM head: an [`LmHead`] under `cls.predictions`.
pub type MlmHead = LmHead<BertHeadNames>;

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let cfg: MlmHeadConfig = ctx.params()?;
    build_lm_head::<BertHeadNames>(ctx, "mlm_head", cfg.layer_norm_eps)
}
