//! ViT image encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! ICLR 2021), laid out as HuggingFace `transformers`' `ViTModel`: pre-LN
//! layers, `[CLS]` token, learned position embeddings, final `layernorm`.
//! Parameter names match `ViTModel`'s so its checkpoints load by name.
//!
//! Registered as encoder `vit`. Input resolution comes from `data.image_size`.

use vlmatch_core::Result;
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::hf::Resolve;
use vlmatch_layers::vit::{vit_encoder, VitArch, VitEncoder, VitNames, VIT_NAMES};

mod layout;
pub use layout::VIT_LAYOUT;

vlmatch_registry::register!(encoder "vit" => vit_encoder::<VitSection>, layout = &VIT_LAYOUT);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.image]` for `plugin = "vit"`. Architecture keys follow
    /// HuggingFace `ViTConfig`; with `init = "DIR"` (a hub-layout directory)
    /// they come from `DIR/config.json`, and a key set here must agree with it.
    /// The weights of `DIR/model.safetensors` are applied by the trainer.
    pub struct VitSection: init {}
    resolve = Resolve::new("vit", &VIT_LAYOUT).only_gelu();
    /// A resolved ViT architecture (also read from HuggingFace `config.json`).
    pub struct VitConfig {
        layer_sizes,
        pub patch_size: i64,
        pub hidden_dropout_prob: f64 = 0.0,
        pub attention_probs_dropout_prob: f64 = 0.0,
        pub layer_norm_eps: f64 = 1e-12,
        pub qkv_bias: bool = true,
    }
    from_checkpoint {
        /// The checkpoint's resolution.
        pub image_size: Option<i64> = None,
        pub hidden_act: String = "gelu",
    }
}

impl VitConfig {
    /// The layer sizes ([`LayerKeys::check`]) and a positive patch size;
    /// errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        LayerKeys::of(self).check(key, &[("patch_size", self.patch_size)])
    }
}

/// The ViT encoder: a [`VitEncoder`] under `ViTModel`'s names
/// ([`VIT_NAMES`]).
pub type Vit = VitEncoder;

impl VitArch for VitConfig {
    const PLUGIN: &'static str = "vit";
    const NAMES: &'static VitNames = &VIT_NAMES;
    const SPAN: fn() -> tracing::Span = || tracing::trace_span!("vit");
}
