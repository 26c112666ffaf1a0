//! BERT's masked-language-model head (`BertForMaskedLM`'s
//! `cls.predictions`): dense + GELU + LayerNorm, then a decoder whose weights
//! are the text encoder's word embeddings (tied) plus a bias. Parameter names
//! match HuggingFace so a checkpoint's MLM head loads by name.
//!
//! Registered as generator `mlm_head`. It serves MLM (on fused states),
//! VL-RTD's generator (on text-only states) and NegGen's mask filling.

use std::path::Path;
use vlmatch_layers::layout::{head_arch, HubLayout, NameMap, TIED_DECODER};
use vlmatch_layers::lm_head::{lm_head, BertHead, HeadNames, LmHead};

vlmatch_registry::register!(generator "mlm_head" => lm_head::<BertHead>, layout = &MLM_HEAD_LAYOUT);

/// The checkpoint layout registered with generator `mlm_head`: a
/// `BertForMaskedLM`'s `cls.predictions.*`, under the same names (the
/// decoder weight is the tied word-embedding matrix and is not loaded). The
/// head's epsilon is the checkpoint's `layer_norm_eps`.
pub static MLM_HEAD_LAYOUT: HubLayout = HubLayout::new(
    &["bert"],
    &["BertForMaskedLM", "BertForPreTraining"],
    NameMap::within("cls.predictions.").skip(&[], TIED_DECODER),
)
.with_read_arch(|dir| head_arch(config_eps(dir).unwrap_or(BertHead::EPS)));

/// `dir/config.json`'s `layer_norm_eps`.
fn config_eps(dir: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    serde_json::from_str::<serde_json::Value>(&text)
        .ok()?
        .get("layer_norm_eps")?
        .as_f64()
}

/// BERT's MLM head: an [`LmHead`] under `cls.predictions`; its section is
/// an [`LmHeadSection`](vlmatch_layers::lm_head::LmHeadSection), epsilon
/// 1e-12 by default.
pub type MlmHead = LmHead<BertHead>;
