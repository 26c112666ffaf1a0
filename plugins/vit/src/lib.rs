//! ViT image encoder (Dosovitskiy et al., "An Image is Worth 16x16 Words",
//! ICLR 2021), laid out as HuggingFace `transformers`' `ViTModel`: pre-LN
//! layers, `[CLS]` token, learned position embeddings, final `layernorm`.
//! Parameter names match `ViTModel`'s so its checkpoints load by name.
//!
//! Registered as encoder `vit`. Input resolution comes from `data.image_size`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::hf::resolve_section;
use vlmatch_layers::{Attention, LayerNorm, Linear};
use vlmatch_registry::BuildContext;

mod layout;
pub use layout::VitLayout;

vlmatch_registry::register!(encoder "vit" => build, layout = &VitLayout);

/// Keys of `[model.image]` for `plugin = "vit"`. Architecture keys follow
/// HuggingFace `ViTConfig`; with `init = "DIR"` (a hub-layout directory)
/// they come from `DIR/config.json`, and a key set here must agree with it.
/// The weights of `DIR/model.safetensors` are applied by the trainer.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VitSection {
    #[serde(default, skip_serializing)]
    pub init: Option<PathBuf>,
    /// Let `init` leave parameters missing (they keep their random init).
    #[serde(default, skip_serializing)]
    pub allow_partial_init: bool,
    pub hidden_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub patch_size: Option<i64>,
    pub hidden_dropout_prob: Option<f64>,
    pub attention_probs_dropout_prob: Option<f64>,
    pub layer_norm_eps: Option<f64>,
    pub qkv_bias: Option<bool>,
}

/// A resolved ViT architecture (also read from HuggingFace `config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct VitConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub patch_size: i64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    /// From `config.json` only: the checkpoint's resolution.
    #[serde(default)]
    pub image_size: Option<i64>,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn eps() -> f64 {
    1e-12
}
fn yes() -> bool {
    true
}
fn gelu() -> String {
    "gelu".into()
}

impl VitSection {
    /// The architecture this section describes (see [`VitSection`]).
    pub fn resolve(&self, key: &str) -> Result<VitConfig> {
        // A NaN would serialise as null, that is as unset, on its way to
        // the resolved architecture: reject it here.
        vlmatch_registry::check::finite_options(
            key,
            &[
                ("hidden_dropout_prob", self.hidden_dropout_prob),
                (
                    "attention_probs_dropout_prob",
                    self.attention_probs_dropout_prob,
                ),
                ("layer_norm_eps", self.layer_norm_eps),
            ],
        )?;
        vlmatch_registry::weights::check_model_type(
            key,
            "vit",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&VitLayout),
        )?;
        let cfg: VitConfig = resolve_section(key, self.init.as_deref(), self)?;
        cfg.check(key).map_err(|e| match &self.init {
            Some(dir) => Error::Config(format!("{e} (with init {})", dir.display())),
            None => e,
        })?;
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
    /// Every size positive, the heads dividing `hidden_size`, dropouts in
    /// [0, 1), a positive epsilon; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        use vlmatch_registry::check;
        let k = |field: &str| format!("{key}.{field}");
        check::positive(&k("hidden_size"), self.hidden_size)?;
        check::positive(&k("num_hidden_layers"), self.num_hidden_layers)?;
        check::heads_divide(
            &k("num_attention_heads"),
            self.num_attention_heads,
            &format!("`{}`", k("hidden_size")),
            self.hidden_size,
        )?;
        check::positive(&k("intermediate_size"), self.intermediate_size)?;
        check::positive(&k("patch_size"), self.patch_size)?;
        check::dropout(&k("hidden_dropout_prob"), self.hidden_dropout_prob)?;
        check::dropout(
            &k("attention_probs_dropout_prob"),
            self.attention_probs_dropout_prob,
        )?;
        check::positive_f64(&k("layer_norm_eps"), self.layer_norm_eps)
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
        let invalid = |m: String| Error::plugin("vit", m);
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(invalid(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                cfg.hidden_size, cfg.num_attention_heads
            )));
        }
        if cfg.patch_size <= 0 || image_size % cfg.patch_size != 0 {
            return Err(invalid(format!(
                "data.image_size {image_size} is not a multiple of patch_size {}",
                cfg.patch_size
            )));
        }
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
