//! ALBEF's multimodal encoder `E_m` (Li et al., "Align before Fuse", NeurIPS
//! 2021): BERT layers whose text states cross-attend to the image tokens
//! after self-attention. Parameter names follow ALBEF's BERT
//! (`layer.N.attention`, `layer.N.crossattention`, `layer.N.intermediate`,
//! `layer.N.output`), so the upper layers of a BERT checkpoint map onto it.
//!
//! Registered as encoder `cross_attention`. Width: the text encoder's.

use serde::Deserialize;
use std::rc::Rc;
use tch::nn;
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::{BertLayer, BertLayerConfig};
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(encoder "cross_attention" => build);

/// Keys of `[model.fusion]` for `plugin = "cross_attention"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossAttentionConfig {
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn eps() -> f64 {
    1e-12
}

pub struct CrossAttentionFusion {
    hidden: i64,
    layers: Vec<BertLayer>,
}

impl CrossAttentionFusion {
    pub fn new(
        p: &nn::Path,
        cfg: &CrossAttentionConfig,
        text_width: i64,
        image_width: i64,
        compute: tch::Kind,
    ) -> Result<Self> {
        if text_width % cfg.num_attention_heads != 0 {
            return Err(Error::plugin(
                "cross_attention",
                format!(
                    "text width {text_width} is not divisible by num_attention_heads {}",
                    cfg.num_attention_heads
                ),
            ));
        }
        let layer_cfg = BertLayerConfig {
            hidden: text_width,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
            layer_norm_eps: cfg.layer_norm_eps,
            cross_width: Some(image_width),
            compute,
        };
        Ok(CrossAttentionFusion {
            hidden: text_width,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::new(&(p / "layer" / i), &layer_cfg))
                .collect(),
        })
    }
}

impl Encoder for CrossAttentionFusion {
    fn modality(&self) -> Modality {
        Modality::Multimodal
    }
    fn hidden_size(&self) -> i64 {
        self.hidden
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("cross_attention").entered();
        let EncoderInput::Fused { text, image } = input else {
            return Err(Error::plugin(
                "cross_attention",
                "a fusion encoder takes text and image states",
            ));
        };
        let mut xs = text.hidden.shallow_clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, &text.mask, Some((&image.hidden, &image.mask)), train);
        }
        Ok(Encoded {
            hidden: xs,
            mask: text.mask.shallow_clone(),
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let cfg: CrossAttentionConfig = ctx.params()?;
    Ok(Rc::new(CrossAttentionFusion::new(
        &ctx.path,
        &cfg,
        ctx.width("text")?,
        ctx.width("image")?,
        ctx.env.compute,
    )?))
}
