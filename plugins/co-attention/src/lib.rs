//! METER's co-attention fusion encoder (Dou et al., "An Empirical Study of
//! Training End-to-End Vision-and-Language Transformers", CVPR 2022): two
//! streams, text and image, that cross-attend to each other in every layer.
//!
//! - Input: each stream is projected to the fusion width `D` by a linear
//!   layer (`text_transform`, `image_transform`, always present, as METER's
//!   cross-modal transforms) and gets its modality-type embedding added
//!   (`token_type_embeddings.weight` `[2, D]`: row 0 text, row 1 image).
//! - Layer `i`, for each stream: self-attention over the stream (its own
//!   padding mask), cross-attention from the stream to the other stream's
//!   states *as they entered layer `i`* (the other stream's mask), and a GELU
//!   feed-forward block, each followed by residual + LayerNorm: a BERT layer
//!   with cross-attention, one per stream with its own weights
//!   (`text_layer.i.*`, `image_layer.i.*`, HuggingFace/ALBEF names:
//!   `attention.self.query`, `crossattention.output.LayerNorm`, ...). Both
//!   streams read the other's input to the layer, so they update
//!   symmetrically.
//! - Output: the [`Encoder`] interface returns one sequence, the *text*
//!   stream's final states `[B, L, D]` (MLM and VL-RTD read per-token states,
//!   ITM position 0), with position 0 replaced by the pair summary
//!   `pool_proj(concat(text_pooler(t_0), image_pooler(v_0)))`, where each
//!   pooler is METER's dense + tanh over its stream's first token and
//!   `pool_proj` is a linear `2D -> D`. Position 0 therefore reads both
//!   streams' `[CLS]`.
//!
//! Width: `D` is the text encoder's width. The fused text states feed the
//! MLM head, whose decoder is tied to the text word embeddings (width = text
//! width), and the discriminator is built on `hidden_size()`, so `D` must be
//! the text width: `hidden_size` may be set only to that value (anything else
//! is a config error). The image stream may have any width.
//!
//! Registered as encoder `co_attention`.

use serde::Deserialize;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::bert::BertStack;
use vlmatch_layers::{hf_init, BertLayerConfig, Linear};
use vlmatch_registry::{check, BuildContext};

vlmatch_registry::register!(encoder "co_attention" => build);

/// Keys of `[model.fusion]` for `plugin = "co_attention"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoAttentionSection {
    /// Co-attention layers (each one text and one image block); at least 1.
    pub num_hidden_layers: i64,
    /// Heads of every attention; must divide the fusion width.
    pub num_attention_heads: i64,
    /// Feed-forward width; default 4 x the fusion width.
    #[serde(default)]
    pub intermediate_size: Option<i64>,
    /// Fusion width; default (and only allowed value) the text width.
    #[serde(default)]
    pub hidden_size: Option<i64>,
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

/// The resolved architecture of a [`CoAttentionFusion`]: its depth and
/// the shared BERT-layer sizes of every text and image block (their
/// cross-attention reads the other stream, at the same width).
#[derive(Debug, Clone, Copy)]
pub struct CoAttentionConfig {
    pub num_hidden_layers: i64,
    pub layer: BertLayerConfig,
}

impl CoAttentionSection {
    /// Check the section `key` against the text encoder's width; errors name
    /// the offending key. The layers compute in `compute`.
    pub fn resolve(&self, key: &str, text_width: i64, compute: Kind) -> Result<CoAttentionConfig> {
        let hidden = self.hidden_size.unwrap_or(text_width);
        if hidden != text_width {
            return Err(check::invalid(
                &format!("{key}.hidden_size"),
                format!(
                    "{hidden} must equal the text encoder's width {text_width}: the fused text \
                     states feed the MLM head, which is tied to the text word embeddings \
                     (leave it unset)"
                ),
            ));
        }
        let keys = LayerKeys {
            hidden_size: Some(hidden),
            num_hidden_layers: self.num_hidden_layers,
            num_attention_heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size.unwrap_or(4 * hidden),
            layer_norm_eps: self.layer_norm_eps,
            hidden_dropout_prob: Some(self.hidden_dropout_prob),
            attention_probs_dropout_prob: Some(self.attention_probs_dropout_prob),
            attention_dropout: None,
        };
        keys.check(key, &[])?;
        Ok(CoAttentionConfig {
            num_hidden_layers: self.num_hidden_layers,
            layer: keys.bert_layer(None, Some(hidden), compute),
        })
    }
}

pub struct CoAttentionFusion {
    hidden: i64,
    text_transform: Linear,
    image_transform: Linear,
    /// `[2, D]`: row 0 is added to the text stream, row 1 to the image's.
    token_type_embeddings: Tensor,
    text_layers: BertStack,
    image_layers: BertStack,
    text_pooler: Linear,
    image_pooler: Linear,
    pool_proj: Linear,
}

impl CoAttentionFusion {
    /// Build under `p`; everything computes in `cfg.layer.compute`.
    pub fn new(p: &nn::Path, cfg: &CoAttentionConfig, text_width: i64, image_width: i64) -> Self {
        let (d, compute) = (cfg.layer.hidden, cfg.layer.compute);
        let layer_cfg = cfg.layer;
        let layers = |name: &str| BertStack::new(&(p / name), cfg.num_hidden_layers, &layer_cfg);
        CoAttentionFusion {
            hidden: d,
            text_transform: Linear::new(&(p / "text_transform"), text_width, d, true, compute),
            image_transform: Linear::new(&(p / "image_transform"), image_width, d, true, compute),
            token_type_embeddings: (p / "token_type_embeddings").var("weight", &[2, d], hf_init()),
            text_layers: layers("text_layer"),
            image_layers: layers("image_layer"),
            text_pooler: Linear::new(&(p / "text_pooler" / "dense"), d, d, true, compute),
            image_pooler: Linear::new(&(p / "image_pooler" / "dense"), d, d, true, compute),
            pool_proj: Linear::new(&(p / "pool_proj"), 2 * d, d, true, compute),
        }
    }

    /// Every layer over both streams, except that with `cls_only` the last
    /// layer computes each stream's position 0 alone: the pair summary reads
    /// only those two rows, and nothing reads the others then.
    fn run(&self, input: EncoderInput<'_>, cls_only: bool, train: bool) -> Result<Encoded> {
        let EncoderInput::Fused { text, image } = input else {
            return Err(Error::plugin(
                "co_attention",
                "a fusion encoder takes text and image states",
            ));
        };
        let (tm, vm) = (&text.mask, &image.mask);
        let mut t = self
            .text_transform
            .forward(&text.hidden)
            .to_kind(Kind::Float)
            + self.token_type_embeddings.get(0);
        let mut v = self
            .image_transform
            .forward(&image.hidden)
            .to_kind(Kind::Float)
            + self.token_type_embeddings.get(1);
        let (ts, vs) = (&self.text_layers, &self.image_layers);
        for i in 0..ts.len() {
            // Both streams read the other's states from before this layer.
            let (t_rows, v_rows) = (ts.rows(i, &t, cls_only), vs.rows(i, &v, cls_only));
            let t_next = ts.layer(i, &t_rows, &t, tm, Some((&v, vm)), None, train);
            let v_next = vs.layer(i, &v_rows, &v, vm, Some((&t, tm)), None, train);
            (t, v) = (t_next, v_next);
        }
        let pool = |pooler: &Linear, xs: &Tensor| pooler.forward(&xs.select(1, 0)).tanh();
        let pair = Tensor::cat(
            &[pool(&self.text_pooler, &t), pool(&self.image_pooler, &v)],
            -1,
        );
        let cls = self
            .pool_proj
            .forward(&pair)
            .to_kind(Kind::Float)
            .unsqueeze(1);
        Ok(if cls_only {
            Encoded {
                hidden: cls,
                mask: tm.narrow(1, 0, 1),
            }
        } else {
            let l = t.size()[1];
            Encoded {
                hidden: Tensor::cat(&[cls, t.narrow(1, 1, l - 1)], 1),
                mask: tm.shallow_clone(),
            }
        })
    }
}

impl Encoder for CoAttentionFusion {
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("co_attention").entered();
        self.run(input, false, train)
    }
    fn forward_cls(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("co_attention_cls").entered();
        self.run(input, true, train)
    }
    fn modality(&self) -> Modality {
        Modality::Multimodal
    }
    fn hidden_size(&self) -> i64 {
        self.hidden
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: CoAttentionSection = ctx.params()?;
    let text_width = ctx.width("text")?;
    let cfg = section.resolve(&ctx.key, text_width, ctx.env.compute)?;
    let mut fusion = CoAttentionFusion::new(&ctx.path, &cfg, text_width, ctx.width("image")?);
    let checkpointer = ctx.checkpointer()?;
    fusion.text_layers.set_checkpointing(checkpointer);
    fusion.image_layers.set_checkpointing(checkpointer);
    Ok(Rc::new(fusion))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn fused(compute: Kind) -> Tensor {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let section = CoAttentionSection {
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: None,
            hidden_size: None,
            hidden_dropout_prob: 0.0,
            attention_probs_dropout_prob: 0.0,
            layer_norm_eps: 1e-12,
        };
        let cfg = section.resolve("model.fusion", 16, compute).unwrap();
        assert_eq!(cfg.layer.intermediate, 64);
        let fusion = CoAttentionFusion::new(&vs.root(), &cfg, 16, 24);
        let text = Encoded {
            hidden: Tensor::randn([2, 5, 16], (Kind::Float, Device::Cpu)),
            mask: Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 0, 0]).view([2, 5]),
        };
        let image = Encoded {
            hidden: Tensor::randn([2, 4, 24], (Kind::Float, Device::Cpu)),
            mask: Tensor::ones([2, 4], (Kind::Int64, Device::Cpu)),
        };
        let out = fusion
            .forward_t(
                EncoderInput::Fused {
                    text: &text,
                    image: &image,
                },
                false,
            )
            .unwrap();
        assert_eq!(out.mask.size(), [2, 5]);
        out.hidden
    }

    /// bf16 compute (as on CUDA) returns fp32 states close to the fp32 run.
    #[test]
    fn mixed_precision_returns_fp32_close_to_full_precision() {
        let full = fused(Kind::Float);
        let half = fused(Kind::BFloat16);
        assert_eq!(full.size(), [2, 5, 16]);
        assert_eq!(half.kind(), Kind::Float);
        let d = (&full - &half).abs().max().double_value(&[]);
        assert!(d < 0.1, "bf16 differs by {d}");
    }
}
