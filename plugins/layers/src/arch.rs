//! The layer keys every HuggingFace transformer config shares
//! (`BertConfig`, `RobertaConfig`, `ViTConfig`, `CLIPVisionConfig`), read
//! by name from a plugin's resolved architecture ([`hf_arch!`](crate::hf_arch)
//! configs serialise under those names), checked once and turned into the
//! stacks' layer configurations.

use crate::bert::BertLayerConfig;
use serde::{Deserialize, Serialize};
use tch::Kind;
use vlmatch_core::Result;
use vlmatch_registry::check;

/// The sizes of a transformer stack under HuggingFace's key names; a
/// dropout a family does not have is `None` (CLIP has `attention_dropout`
/// alone, BERT and ViT `hidden_dropout_prob` and
/// `attention_probs_dropout_prob`).
#[derive(Debug, Clone, Deserialize)]
pub struct LayerKeys {
    /// `None` where the width is another encoder's (a fusion's).
    #[serde(default)]
    pub hidden_size: Option<i64>,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub hidden_dropout_prob: Option<f64>,
    #[serde(default)]
    pub attention_probs_dropout_prob: Option<f64>,
    #[serde(default)]
    pub attention_dropout: Option<f64>,
}

impl LayerKeys {
    /// The keys of a resolved architecture (any type that serialises under
    /// HuggingFace's names).
    pub fn of<C: Serialize>(cfg: &C) -> LayerKeys {
        serde_json::to_value(cfg)
            .and_then(serde_json::from_value)
            .expect("a resolved architecture has the layer keys")
    }

    /// [`check::layer_sizes`], then each of `positive` (`(field, value)`,
    /// the family's own sizes) at least 1; errors name `{key}.<field>`.
    pub fn check(&self, key: &str, positive: &[(&str, i64)]) -> Result<()> {
        let dropouts = [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
            ("attention_dropout", self.attention_dropout),
        ]
        .into_iter()
        .filter_map(|(name, p)| Some((name, p?)))
        .collect();
        check::layer_sizes(
            key,
            &check::LayerSizes {
                hidden_size: self.hidden_size,
                num_hidden_layers: self.num_hidden_layers,
                num_attention_heads: self.num_attention_heads,
                intermediate_size: self.intermediate_size,
                layer_norm_eps: self.layer_norm_eps,
                dropouts,
            },
        )?;
        for (field, value) in positive {
            check::positive(&format!("{key}.{field}"), *value)?;
        }
        Ok(())
    }

    /// The dropout after each sub-layer (0 where the family has none).
    pub fn hidden_dropout(&self) -> f64 {
        self.hidden_dropout_prob.unwrap_or(0.0)
    }

    /// The dropout of the attention probabilities.
    pub fn attention_dropout(&self) -> f64 {
        self.attention_probs_dropout_prob
            .or(self.attention_dropout)
            .unwrap_or(0.0)
    }

    /// A BERT layer of width `hidden` (the section's own where `None`)
    /// with these sizes, cross-attending to states `cross_width` wide.
    pub fn bert_layer(
        &self,
        hidden: Option<i64>,
        cross_width: Option<i64>,
        compute: Kind,
    ) -> BertLayerConfig {
        BertLayerConfig {
            hidden: hidden
                .or(self.hidden_size)
                .expect("a BERT layer has a width"),
            heads: self.num_attention_heads,
            intermediate: self.intermediate_size,
            hidden_dropout: self.hidden_dropout(),
            attention_dropout: self.attention_dropout(),
            layer_norm_eps: self.layer_norm_eps,
            cross_width,
            compute,
        }
    }
}
