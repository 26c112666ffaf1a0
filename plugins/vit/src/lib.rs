//! ViT image encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! ICLR 2021), laid out as HuggingFace `transformers`' `ViTModel`: pre-LN
//! layers, `[CLS]` token, learned position embeddings, final `layernorm`.
//! Parameter names match `ViTModel`'s so its checkpoints load by name.
//!
//! Registered as encoder `vit`. Input resolution comes from `data.image_size`.

use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::hf::ArchSource;
use vlmatch_layers::{Attention, LayerNorm, Linear};
use vlmatch_registry::{check, BuildContext};

mod layout;
pub use layout::VitLayout;

vlmatch_registry::register!(encoder "vit" => build, layout = &VitLayout);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.image]` for `plugin = "vit"`. Architecture keys follow
    /// HuggingFace `ViTConfig`; with `init = "DIR"` (a hub-layout directory)
    /// they come from `DIR/config.json`, and a key set here must agree with it.
    /// The weights of `DIR/model.safetensors` are applied by the trainer.
    pub struct VitSection {
        #[serde(default, skip_serializing)]
        pub init: Option<PathBuf>,
        /// Let `init` leave parameters missing (they keep their random init).
        #[serde(default, skip_serializing)]
        pub allow_partial_init: bool,
    }
    /// A resolved ViT architecture (also read from HuggingFace `config.json`).
    pub struct VitConfig {
        pub hidden_size: i64,
        pub num_hidden_layers: i64,
        pub num_attention_heads: i64,
        pub intermediate_size: i64,
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

impl VitSection {
    /// The architecture this section describes (see [`VitSection`]).
    pub fn resolve(&self, key: &str) -> Result<VitConfig> {
        vlmatch_registry::weights::check_model_type(
            key,
            "vit",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&VitLayout),
        )?;
        let source = ArchSource {
            init: self.init.as_deref(),
            ..Default::default()
        };
        let cfg = self.resolve_arch(key, source)?;
        check::with_init(cfg.check(key), self.init.as_deref())?;
        if cfg.hidden_act != "gelu" {
            return Err(Error::plugin(
                "vit",
                format!(
                    "hidden_act `{}` is not supported (only `gelu`)",
                    cfg.hidden_act
                ),
            ));
        }
        Ok(cfg)
    }
}

impl VitConfig {
    /// The layer sizes ([`check::layer_sizes`]) and a positive patch size;
    /// errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        check::layer_sizes(
            key,
            &check::LayerSizes {
                hidden_size: Some(self.hidden_size),
                num_hidden_layers: self.num_hidden_layers,
                num_attention_heads: self.num_attention_heads,
                intermediate_size: self.intermediate_size,
                layer_norm_eps: self.layer_norm_eps,
                dropouts: vec![
                    ("hidden_dropout_prob", self.hidden_dropout_prob),
                    (
                        "attention_probs_dropout_prob",
                        self.attention_probs_dropout_prob,
                    ),
                ],
            },
        )?;
        check::positive(&format!("{key}.patch_size"), self.patch_size)
    }
}

struct VitLayer {
    layernorm_before: LayerNorm,
    attention: Attention,
    attention_out: Linear,
    layernorm_after: LayerNorm,
    intermediate: Linear,
    output: Linear,
    dropout: f64,
}

impl VitLayer {
    fn new(p: &nn::Path, cfg: &VitConfig, compute: Kind) -> Self {
        let h = cfg.hidden_size;
        VitLayer {
            layernorm_before: LayerNorm::new(&(p / "layernorm_before"), h, cfg.layer_norm_eps),
            attention: Attention::with_bias(
                &(p / "attention" / "attention"),
                h,
                h,
                h,
                cfg.num_attention_heads,
                cfg.attention_probs_dropout_prob,
                cfg.qkv_bias,
                compute,
            ),
            attention_out: Linear::new(
                &(p / "attention" / "output" / "dense"),
                h,
                h,
                true,
                compute,
            ),
            layernorm_after: LayerNorm::new(&(p / "layernorm_after"), h, cfg.layer_norm_eps),
            intermediate: Linear::new(
                &(p / "intermediate" / "dense"),
                h,
                cfg.intermediate_size,
                true,
                compute,
            ),
            output: Linear::new(
                &(p / "output" / "dense"),
                cfg.intermediate_size,
                h,
                true,
                compute,
            ),
            dropout: cfg.hidden_dropout_prob,
        }
    }

    /// `[B, N, H]` -> `[B, N, H]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.layernorm_before.forward(xs);
        let a = self.attention.forward(&h, &h, None, train);
        let xs = self.attention_out.forward(&a).dropout(self.dropout, train) + xs;
        let h = self.layernorm_after.forward(&xs);
        let h = self.intermediate.forward(&h).gelu("none");
        self.output.forward(&h).dropout(self.dropout, train) + xs
    }
}

/// The ViT encoder.
pub struct Vit {
    cfg: VitConfig,
    image_size: i64,
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    position_embeddings: Tensor,
    layers: Vec<VitLayer>,
    layernorm: LayerNorm,
    compute: Kind,
    /// What its FLOPs count under ([`vlmatch_core::flops`]).
    module: String,
}

impl Vit {
    /// Build under `p` (`embeddings.*`, `encoder.layer.N.*`, `layernorm.*`).
    pub fn new(p: &nn::Path, cfg: &VitConfig, image_size: i64, compute: Kind) -> Result<Self> {
        // The checks that resolving a section made, for models built directly.
        cfg.check("vit")?;
        check::patch_divides("vit.patch_size", cfg.patch_size, image_size)?;
        let h = cfg.hidden_size;
        let n = (image_size / cfg.patch_size).pow(2);
        let emb = p / "embeddings";
        let proj = &emb / "patch_embeddings" / "projection";
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| VitLayer::new(&(p / "encoder" / "layer" / i), cfg, compute))
            .collect();
        Ok(Vit {
            module: vlmatch_core::flops::module_of(p.components()),
            cfg: cfg.clone(),
            image_size,
            patch_weight: proj.var(
                "weight",
                &[h, 3, cfg.patch_size, cfg.patch_size],
                vlmatch_layers::hf_init(),
            ),
            patch_bias: proj.var("bias", &[h], nn::Init::Const(0.0)),
            cls_token: emb.var("cls_token", &[1, 1, h], vlmatch_layers::hf_init()),
            position_embeddings: emb.var(
                "position_embeddings",
                &[1, n + 1, h],
                vlmatch_layers::hf_init(),
            ),
            layers,
            layernorm: LayerNorm::new(&(p / "layernorm"), h, cfg.layer_norm_eps),
            compute,
        })
    }

    /// `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, H]`.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let size = images.size();
        if size.len() != 4
            || size[1] != 3
            || size[2] != self.image_size
            || size[3] != self.image_size
        {
            return Err(Error::plugin(
                "vit",
                format!(
                    "expected images [B, 3, {s}, {s}], got {size:?}",
                    s = self.image_size
                ),
            ));
        }
        let b = size[0];
        let (w, bias) = if self.compute == Kind::Float {
            (
                self.patch_weight.shallow_clone(),
                self.patch_bias.shallow_clone(),
            )
        } else {
            (
                self.patch_weight.to_kind(self.compute),
                self.patch_bias.to_kind(self.compute),
            )
        };
        let p = self.cfg.patch_size;
        let patches =
            images
                .to_kind(self.compute)
                .conv2d(&w, Some(&bias), [p, p], [0, 0], [1, 1], 1);
        vlmatch_core::flops::patch_embedding(&self.module, images, &self.patch_weight, &patches);
        let patches = patches.flatten(2, 3).transpose(1, 2).to_kind(Kind::Float);
        let cls = self.cls_token.expand([b, 1, self.cfg.hidden_size], false);
        let mut xs = Tensor::cat(&[cls, patches], 1) + &self.position_embeddings;
        xs = xs.dropout(self.cfg.hidden_dropout_prob, train);
        for layer in &self.layers {
            xs = layer.forward(&xs, train);
        }
        Ok(self.layernorm.forward(&xs))
    }
}

impl Encoder for Vit {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("vit").entered();
        let EncoderInput::Image(images) = input else {
            return Err(Error::plugin("vit", "an image encoder takes images"));
        };
        Ok(Encoded::all_valid(self.forward(images, train)?))
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: VitSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    vlmatch_registry::check::patch_divides(
        &format!("{}.patch_size", ctx.key),
        cfg.patch_size,
        ctx.env.image_size,
    )?;
    // A checkpoint at another resolution is fine: the trainer interpolates
    // its position embeddings to `data.image_size` when loading.
    Ok(Rc::new(Vit::new(
        &ctx.path,
        &cfg,
        ctx.env.image_size,
        ctx.env.compute,
    )?))
}
