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
use vlmatch_layers::layout::{head_arch, HubLayout, NameMap};
use vlmatch_layers::lm_head::{build_lm_head, BertHead, LmHead};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(generator "mlm_head" => build, layout = &MLM_HEAD_LAYOUT);

/// The checkpoint layout registered with generator `mlm_head`: a
/// `BertForMaskedLM`'s `cls.predictions.*`, under the same names (the
/// decoder weight is the tied word-embedding matrix and is not loaded). The
/// head's epsilon is the checkpoint's `layer_norm_eps`.
pub static MLM_HEAD_LAYOUT: HubLayout = HubLayout {
    model_types: &["bert"],
    architectures: &["BertForMaskedLM", "BertForPreTraining"],
    names: NameMap::Table {
        strip: &[],
        legacy_layer_norms: true,
        within: "cls.predictions.",
        skip_prefixes: &[],
        skip_names: &["decoder.weight", "decoder.bias"],
    },
    new_by_design: None,
    grid_positions: None,
    read_arch: Some(|dir| head_arch(config_eps(dir).unwrap_or_else(eps))),
    export: None,
};

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

/// BERT's MLM head: an [`LmHead`] under `cls.predictions`.
pub type MlmHead = LmHead<BertHead>;

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let cfg: MlmHeadConfig = ctx.params()?;
    build_lm_head::<BertHead>(ctx, "mlm_head", cfg.layer_norm_eps)
}
