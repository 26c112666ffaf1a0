//! ALBEF's multimodal encoder `E_m` (Li et al., "Align before Fuse", NeurIPS
//! 2021): BERT layers whose text states cross-attend to the image tokens
//! after self-attention. Parameter names follow ALBEF's BERT
//! (`layer.N.attention`, `layer.N.crossattention`, `layer.N.intermediate`,
//! `layer.N.output`), so the upper layers of a BERT checkpoint map onto it.
//!
//! Registered as encoder `cross_attention`. Width: the text encoder's.
//!
//! With `images = 2` it is ALBEF's NLVR2 fusion (`model_nlvr.py`): each of
//! the `num_hidden_layers` layers becomes two, `layer.2k` cross-attending
//! to the left image and `layer.2k+1` to the right, the pair's
//! cross-attention `key` and `value` projections shared (held once, under
//! `layer.2k`); it takes [`EncoderInput::FusedPair`]. Initialising both
//! layers of pair `k` from pretrained layer `k` is the caller's (vlmatch's
//! `finetune --task nlvr2` does).

use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::bert::BertStack;
use vlmatch_layers::hf::{ArchSource, Resolve};
use vlmatch_layers::{BertLayer, BertLayerConfig};
use vlmatch_registry::{check, BuildContext};

mod layout;
pub use layout::CROSS_ATTENTION_LAYOUT;

vlmatch_registry::register!(encoder "cross_attention" => build, layout = &CROSS_ATTENTION_LAYOUT);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.fusion]` for `plugin = "cross_attention"`. With
    /// `init = "DIR"` (a BERT checkpoint in hub layout) the attention heads,
    /// feed-forward width, epsilon and dropouts come from `DIR/config.json` (a
    /// key set here must agree), and the trainer initialises fusion layer `i`
    /// from the checkpoint's layer `i + init_layer_offset` (default: the number
    /// of text layers), ALBEF's split of one BERT into text and fusion layers.
    pub struct CrossAttentionSection {
        #[serde(skip_serializing)]
        pub num_hidden_layers: i64,
        #[serde(default, skip_serializing)]
        pub init: Option<PathBuf>,
        #[serde(default, skip_serializing)]
        pub init_layer_offset: Option<i64>,
        #[serde(default, skip_serializing)]
        pub allow_partial_init: bool,
        /// Images per text: 1 (default), or 2 for the NLVR2 fusion.
        #[serde(default, skip_serializing)]
        pub images: Option<i64>,
    }
    /// The resolved per-layer architecture (also read from BERT's `config.json`).
    pub struct CrossAttentionConfig {
        pub num_attention_heads: i64,
        pub intermediate_size: i64,
        pub hidden_dropout_prob: f64 = 0.0,
        pub attention_probs_dropout_prob: f64 = 0.0,
        pub layer_norm_eps: f64 = 1e-12,
    }
    from_checkpoint {
        /// The section's `num_hidden_layers` (a checkpoint's counts the
        /// whole BERT's).
        pub num_hidden_layers: i64 = 0,
    }
}

impl CrossAttentionSection {
    pub fn resolve(&self, key: &str) -> Result<CrossAttentionConfig> {
        let how = Resolve::new("cross_attention", &CROSS_ATTENTION_LAYOUT);
        let resolve = |source: ArchSource<'_>| {
            let mut cfg = self.resolve_arch(key, source)?;
            // The checkpoint's layer count is the whole BERT's; the fusion's
            // own depth is always this section's.
            cfg.num_hidden_layers = self.num_hidden_layers;
            Ok(cfg)
        };
        how.run(
            key,
            self.init.as_deref(),
            resolve,
            CrossAttentionConfig::check,
        )
    }
}

impl CrossAttentionConfig {
    /// The layer sizes ([`LayerKeys::check`]); errors name
    /// `{key}.<field>`. That the heads divide the text width is checked in
    /// [`CrossAttentionFusion::new`], which knows the width.
    pub fn check(&self, key: &str) -> Result<()> {
        LayerKeys::of(self).check(key, &[])
    }
}

pub struct CrossAttentionFusion {
    hidden: i64,
    layers: BertStack,
    /// Images per text: 1, or 2 (layer `i` attends to image `i % 2`).
    images: usize,
}

impl CrossAttentionFusion {
    /// The fusion for `images` images per text: 1, or 2 for ALBEF's NLVR2
    /// fusion (`2 * cfg.num_hidden_layers` layers, layer `2k + 1` sharing
    /// layer `2k`'s cross-attention key and value).
    pub fn new(
        p: &nn::Path,
        cfg: &CrossAttentionConfig,
        text_width: i64,
        image_width: i64,
        images: usize,
        compute: tch::Kind,
    ) -> Result<Self> {
        let stack: fn(&nn::Path, i64, &BertLayerConfig) -> BertStack = match images {
            1 => BertStack::new,
            2 => BertStack::pairs,
            n => {
                return Err(Error::plugin(
                    "cross_attention",
                    format!("images must be 1 or 2 (NLVR2's doubled fusion), got {n}"),
                ))
            }
        };
        check::heads_divide(
            "cross_attention.num_attention_heads",
            cfg.num_attention_heads,
            "the text encoder's width",
            text_width,
        )?;
        let layer_cfg = LayerKeys::of(cfg).bert_layer(Some(text_width), Some(image_width), compute);
        Ok(CrossAttentionFusion {
            hidden: text_width,
            layers: stack(&(p / "layer"), cfg.num_hidden_layers, &layer_cfg),
            images,
        })
    }

    /// Images per text (1, or 2 for the NLVR2 fusion).
    pub fn images(&self) -> usize {
        self.images
    }

    /// Each layer's cross-attention `key` and `value` weights (to check
    /// which are shared).
    pub fn cross_key_value_weights(&self) -> Vec<[&Tensor; 2]> {
        self.layers
            .layers()
            .iter()
            .filter_map(BertLayer::cross_key_value_weights)
            .collect()
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
        self.run(input, None, false, train)
    }

    fn forward_cls(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("cross_attention_cls").entered();
        self.run(input, None, true, train)
    }

    /// The image states are the same in every layer, so each image's
    /// cross-attention keys and values are computed once per layer and
    /// shared by all its pairs.
    fn forward_cls_indexed(
        &self,
        text: &Encoded,
        image: &Encoded,
        image_index: &Tensor,
        train: bool,
    ) -> Result<Encoded> {
        let _span = tracing::trace_span!("cross_attention_cls_indexed").entered();
        self.run(
            EncoderInput::Fused { text, image },
            Some(image_index),
            true,
            train,
        )
    }
}

impl CrossAttentionFusion {
    /// Every layer over all text positions, except that with `cls_only` the
    /// last layer computes position 0 alone (its other outputs are unread).
    /// With `image_index`, text row `b` attends to image `image_index[b]`.
    fn run(
        &self,
        input: EncoderInput<'_>,
        image_index: Option<&Tensor>,
        cls_only: bool,
        train: bool,
    ) -> Result<Encoded> {
        let (text, images) = match (input, self.images) {
            (EncoderInput::Fused { text, image }, 1) => (text, [image, image]),
            (EncoderInput::FusedPair { text, images }, 2) => (text, images),
            (EncoderInput::FusedPair { .. }, _) => {
                return Err(Error::plugin(
                    "cross_attention",
                    "this fusion takes one image per text; two (NLVR2) need \
                     model.fusion.images = 2",
                ))
            }
            (EncoderInput::Fused { .. }, _) => {
                return Err(Error::plugin(
                    "cross_attention",
                    "this fusion was built with images = 2 (NLVR2) and takes two images \
                     per text",
                ))
            }
            _ => {
                return Err(Error::plugin(
                    "cross_attention",
                    "a fusion encoder takes text and image states",
                ))
            }
        };
        let xs = self.layers.forward(
            text.hidden.shallow_clone(),
            &text.mask,
            |i| Some((&images[i % 2].hidden, &images[i % 2].mask)),
            image_index,
            cls_only,
            train,
        );
        Ok(if cls_only {
            Encoded {
                hidden: xs.narrow(1, 0, 1),
                mask: text.mask.narrow(1, 0, 1),
            }
        } else {
            Encoded {
                hidden: xs,
                mask: text.mask.shallow_clone(),
            }
        })
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: CrossAttentionSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    let text_width = ctx.width("text")?;
    vlmatch_registry::check::heads_divide(
        &format!("{}.num_attention_heads", ctx.key),
        cfg.num_attention_heads,
        "the text encoder's width",
        text_width,
    )?;
    let images = match section.images.unwrap_or(1) {
        n @ (1 | 2) => n as usize,
        n => {
            return Err(vlmatch_registry::check::invalid(
                &format!("{}.images", ctx.key),
                format!("must be 1 or 2 (NLVR2's doubled fusion), got {n}"),
            ))
        }
    };
    let mut fusion = CrossAttentionFusion::new(
        &ctx.path,
        &cfg,
        text_width,
        ctx.width("image")?,
        images,
        ctx.env.compute,
    )?;
    fusion.layers.set_checkpointing(ctx.checkpointer()?);
    Ok(Rc::new(fusion))
}
