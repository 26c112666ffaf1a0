//! CLIP's ViT image encoder (Radford et al., "Learning Transferable Visual
//! Models From Natural Language Supervision", ICML 2021), laid out as
//! HuggingFace `transformers`' `CLIPVisionModel` (the vision half of
//! `CLIPModel`): class embedding, patch embedding without bias, learned
//! position embeddings, a LayerNorm before the encoder (`pre_layrnorm`,
//! HuggingFace's spelling), pre-LN layers with `quick_gelu`, and
//! `post_layernorm`. Parameter names match `CLIPVisionModel`'s below its
//! `vision_model.` prefix, so its checkpoints load by name.
//!
//! Output: `post_layernorm` over every position, as METER's CLIP encoder
//! does (`transformers` applies it to the pooled `[CLS]` only; its
//! `last_hidden_state` is [`VitEncoder::forward_unnormed`]).
//!
//! Registered as encoder `clip_vit`. Input resolution comes from
//! `data.image_size`; a checkpoint at another resolution has its position
//! embeddings interpolated by the trainer when it loads.

use vlmatch_core::Result;
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::hf::Resolve;
use vlmatch_layers::vit::{vit_encoder, VitArch, VitEncoder, VitNames, CLIP_NAMES};
use vlmatch_registry::check;

mod layout;
pub use layout::CLIP_VIT_LAYOUT;

vlmatch_registry::register!(encoder "clip_vit" => vit_encoder::<ClipVitSection>, layout = &CLIP_VIT_LAYOUT);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.image]` for `plugin = "clip_vit"`. Architecture keys
    /// follow HuggingFace `CLIPVisionConfig`; with `init = "DIR"` (a hub-layout
    /// `CLIPVisionModel` or `CLIPModel` directory, whose `vision_config` is
    /// read) they come from `DIR/config.json`, and a key set here must agree
    /// with it. The weights of `DIR/model.safetensors` are applied by the
    /// trainer.
    pub struct ClipVitSection: init {}
    resolve = Resolve::new("clip_vit", &CLIP_VIT_LAYOUT).nested("vision_config");
    /// A resolved CLIP vision architecture (also read from `config.json`).
    /// Defaults are `CLIPVisionConfig`'s, since `transformers` leaves keys at
    /// their default out of the `config.json` it writes.
    pub struct ClipVitConfig {
        layer_sizes(768, 12, 12, 3072),
        pub patch_size: i64 = 32,
        pub attention_dropout: f64 = 0.0,
        pub layer_norm_eps: f64 = 1e-5,
        /// `quick_gelu` (OpenAI CLIP) or `gelu`.
        pub hidden_act: String = "quick_gelu",
    }
    from_checkpoint {
        /// The checkpoint's resolution.
        pub image_size: Option<i64> = None,
        pub num_channels: i64 = 3,
    }
}

impl ClipVitConfig {
    /// The layer sizes ([`LayerKeys::check`]), a positive patch size, a
    /// known activation, RGB input; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        let k = |field: &str| format!("{key}.{field}");
        LayerKeys::of(self).check(key, &[("patch_size", self.patch_size)])?;
        if self.hidden_act != "quick_gelu" && self.hidden_act != "gelu" {
            return Err(check::invalid(
                &k("hidden_act"),
                format!(
                    "`{}` is not supported (quick_gelu or gelu)",
                    self.hidden_act
                ),
            ));
        }
        if self.num_channels != 3 {
            return Err(check::invalid(
                &k("num_channels"),
                format!("{}: images are RGB, 3 channels", self.num_channels),
            ));
        }
        Ok(())
    }
}

/// The CLIP vision encoder: a [`VitEncoder`] under `CLIPVisionModel`'s
/// names ([`CLIP_NAMES`]), with `pre_layrnorm` and no dropout but the
/// attention's.
pub type ClipVit = VitEncoder;

impl VitArch for ClipVitConfig {
    const PLUGIN: &'static str = "clip_vit";
    const NAMES: &'static VitNames = &CLIP_NAMES;
    const SPAN: fn() -> tracing::Span = || tracing::trace_span!("clip_vit");
}
