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
//! `last_hidden_state` is [`ClipVit::forward_unnormed`]).
//!
//! Registered as encoder `clip_vit`. Input resolution comes from
//! `data.image_size`; a checkpoint at another resolution has its position
//! embeddings interpolated by the trainer when it loads.

use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::hf::ArchSource;
use vlmatch_layers::{hf_init, LayerNorm, Linear};
use vlmatch_registry::{check, BuildContext};

mod layout;
pub use layout::ClipVitLayout;

vlmatch_registry::register!(encoder "clip_vit" => build, layout = &ClipVitLayout);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.image]` for `plugin = "clip_vit"`. Architecture keys
    /// follow HuggingFace `CLIPVisionConfig`; with `init = "DIR"` (a hub-layout
    /// `CLIPVisionModel` or `CLIPModel` directory, whose `vision_config` is
    /// read) they come from `DIR/config.json`, and a key set here must agree
    /// with it. The weights of `DIR/model.safetensors` are applied by the
    /// trainer.
    pub struct ClipVitSection {
        #[serde(default, skip_serializing)]
        pub init: Option<PathBuf>,
        /// Let `init` leave parameters missing (they keep their random init).
        #[serde(default, skip_serializing)]
        pub allow_partial_init: bool,
    }
    /// A resolved CLIP vision architecture (also read from `config.json`).
    /// Defaults are `CLIPVisionConfig`'s, since `transformers` leaves keys at
    /// their default out of the `config.json` it writes.
    pub struct ClipVitConfig {
        pub hidden_size: i64 = 768,
        pub num_hidden_layers: i64 = 12,
        pub num_attention_heads: i64 = 12,
        pub intermediate_size: i64 = 3072,
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

impl ClipVitSection {
    /// The architecture this section describes (see [`ClipVitSection`]).
    pub fn resolve(&self, key: &str) -> Result<ClipVitConfig> {
        vlmatch_registry::weights::check_model_type(
            key,
            "clip_vit",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&ClipVitLayout),
        )?;
        let source = ArchSource {
            init: self.init.as_deref(),
            nested: Some("vision_config"),
            take_first_layers: false,
        };
        let cfg = self.resolve_arch(key, source)?;
        check::with_init(cfg.check(key), self.init.as_deref())?;
        Ok(cfg)
    }
}

impl ClipVitConfig {
    /// The layer sizes ([`check::layer_sizes`]), a positive patch size, a
    /// known activation, RGB input; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        let k = |field: &str| format!("{key}.{field}");
        check::layer_sizes(
            key,
            &check::LayerSizes {
                hidden_size: Some(self.hidden_size),
                num_hidden_layers: self.num_hidden_layers,
                num_attention_heads: self.num_attention_heads,
                intermediate_size: self.intermediate_size,
                layer_norm_eps: self.layer_norm_eps,
                dropouts: vec![("attention_dropout", self.attention_dropout)],
            },
        )?;
        check::positive(&k("patch_size"), self.patch_size)?;
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

/// `CLIPAttention`: `q_proj`, `k_proj`, `v_proj`, `out_proj`, no mask.
struct SelfAttention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: i64,
    dropout: f64,
}

impl SelfAttention {
    fn new(p: &nn::Path, cfg: &ClipVitConfig, compute: Kind) -> Self {
        let h = cfg.hidden_size;
        let lin = |name: &str| Linear::new(&(p / name), h, h, true, compute);
        SelfAttention {
            q: lin("q_proj"),
            k: lin("k_proj"),
            v: lin("v_proj"),
            out: lin("out_proj"),
            heads: cfg.num_attention_heads,
            dropout: cfg.attention_dropout,
        }
    }

    /// `[B, N, H]` -> `[B, N, H]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let (b, n, h) = xs.size3().expect("attention input is [B, N, H]");
        let split = |t: Tensor| t.view([b, n, self.heads, h / self.heads]).transpose(1, 2);
        let a = Tensor::scaled_dot_product_attention(
            &split(self.q.forward(xs)),
            &split(self.k.forward(xs)),
            &split(self.v.forward(xs)),
            None::<&Tensor>,
            if train { self.dropout } else { 0.0 },
            false,
            None::<f64>,
            false,
        );
        vlmatch_core::flops::attention(
            self.q.module(),
            b * self.heads,
            n,
            n,
            h / self.heads,
            a.requires_grad(),
        );
        self.out
            .forward(&a.transpose(1, 2).contiguous().view([b, n, h]))
            .to_kind(Kind::Float)
    }
}

/// `CLIPEncoderLayer`: pre-LN self-attention and MLP, each residual.
struct ClipLayer {
    layer_norm1: LayerNorm,
    self_attn: SelfAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    quick: bool,
}

impl ClipLayer {
    fn new(p: &nn::Path, cfg: &ClipVitConfig, compute: Kind) -> Self {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        ClipLayer {
            layer_norm1: LayerNorm::new(&(p / "layer_norm1"), h, cfg.layer_norm_eps),
            self_attn: SelfAttention::new(&(p / "self_attn"), cfg, compute),
            layer_norm2: LayerNorm::new(&(p / "layer_norm2"), h, cfg.layer_norm_eps),
            fc1: Linear::new(&(p / "mlp" / "fc1"), h, i, true, compute),
            fc2: Linear::new(&(p / "mlp" / "fc2"), i, h, true, compute),
            quick: cfg.hidden_act == "quick_gelu",
        }
    }

    /// `[B, N, H]` -> `[B, N, H]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let xs = self.self_attn.forward(&self.layer_norm1.forward(xs), train) + xs;
        let h = self.fc1.forward(&self.layer_norm2.forward(&xs));
        // quick_gelu: x * sigmoid(1.702 x), in the compute dtype like GELU.
        let h = if self.quick {
            &h * (&h * 1.702).sigmoid()
        } else {
            h.gelu("none")
        };
        self.fc2.forward(&h).to_kind(Kind::Float) + xs
    }
}

/// The CLIP vision encoder.
pub struct ClipVit {
    cfg: ClipVitConfig,
    image_size: i64,
    class_embedding: Tensor,
    patch_weight: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    compute: Kind,
    /// What its FLOPs count under ([`vlmatch_core::flops`]).
    module: String,
}

impl ClipVit {
    /// Build under `p` (`embeddings.*`, `pre_layrnorm.*`,
    /// `encoder.layers.N.*`, `post_layernorm.*`).
    pub fn new(p: &nn::Path, cfg: &ClipVitConfig, image_size: i64, compute: Kind) -> Result<Self> {
        // The checks that resolving a section made, for models built directly.
        cfg.check("clip_vit")?;
        check::patch_divides("clip_vit.patch_size", cfg.patch_size, image_size)?;
        let (h, ps) = (cfg.hidden_size, cfg.patch_size);
        let n = (image_size / ps).pow(2);
        let emb = p / "embeddings";
        Ok(ClipVit {
            module: vlmatch_core::flops::module_of(p.components()),
            cfg: cfg.clone(),
            image_size,
            class_embedding: emb.var("class_embedding", &[h], hf_init()),
            patch_weight: (&emb / "patch_embedding").var("weight", &[h, 3, ps, ps], hf_init()),
            position_embedding: (&emb / "position_embedding").var("weight", &[n + 1, h], hf_init()),
            pre_layrnorm: LayerNorm::new(&(p / "pre_layrnorm"), h, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| ClipLayer::new(&(p / "encoder" / "layers" / i), cfg, compute))
                .collect(),
            post_layernorm: LayerNorm::new(&(p / "post_layernorm"), h, cfg.layer_norm_eps),
            compute,
        })
    }

    /// `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, H]` before `post_layernorm`:
    /// `transformers`' `last_hidden_state`.
    pub fn forward_unnormed(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let size = images.size();
        if size.len() != 4
            || size[1] != 3
            || size[2] != self.image_size
            || size[3] != self.image_size
        {
            return Err(Error::plugin(
                "clip_vit",
                format!(
                    "expected images [B, 3, {s}, {s}], got {size:?}",
                    s = self.image_size
                ),
            ));
        }
        let (b, h, p) = (size[0], self.cfg.hidden_size, self.cfg.patch_size);
        let w = if self.compute == Kind::Float {
            self.patch_weight.shallow_clone()
        } else {
            self.patch_weight.to_kind(self.compute)
        };
        let patches =
            images
                .to_kind(self.compute)
                .conv2d(&w, None::<&Tensor>, [p, p], [0, 0], [1, 1], 1);
        vlmatch_core::flops::patch_embedding(&self.module, images, &self.patch_weight, &patches);
        let patches = patches.flatten(2, 3).transpose(1, 2).to_kind(Kind::Float);
        let cls = self
            .class_embedding
            .view([1, 1, h])
            .expand([b, 1, h], false);
        let xs = Tensor::cat(&[cls, patches], 1) + self.position_embedding.unsqueeze(0);
        let mut xs = self.pre_layrnorm.forward(&xs);
        for layer in &self.layers {
            xs = layer.forward(&xs, train);
        }
        Ok(xs)
    }

    /// `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, H]`, `post_layernorm` applied.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self
            .post_layernorm
            .forward(&self.forward_unnormed(images, train)?))
    }
}

impl Encoder for ClipVit {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("clip_vit").entered();
        let EncoderInput::Image(images) = input else {
            return Err(Error::plugin("clip_vit", "an image encoder takes images"));
        };
        Ok(Encoded::all_valid(self.forward(images, train)?))
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: ClipVitSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    vlmatch_registry::check::patch_divides(
        &format!("{}.patch_size", ctx.key),
        cfg.patch_size,
        ctx.env.image_size,
    )?;
    Ok(Rc::new(ClipVit::new(
        &ctx.path,
        &cfg,
        ctx.env.image_size,
        ctx.env.compute,
    )?))
}
