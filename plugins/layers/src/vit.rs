//! The ViT family (ViT, CLIP's vision tower): a patch embedding, a class
//! token and learned positions, an optional LayerNorm before the layers
//! (CLIP's `pre_layrnorm`), pre-LN layers with a choice of activation, and
//! a final LayerNorm. What differs between the families is data: the
//! parameter names, their shapes and creation order ([`VitNames`]), and
//! the keys of the plugin's resolved architecture ([`VitArch`]).

use crate::arch::LayerKeys;
use crate::hf::{ArchSection, CheckedArch};
use crate::{checkpointed, hf_init, path_at, Attention, LayerNorm, Linear};
use serde::{Deserialize, Serialize};
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::checkpoint::Checkpointer;
use vlmatch_core::{flops, Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_registry::{check, BuildContext};

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// Exact GELU (`gelu`).
    Gelu,
    /// `x * sigmoid(1.702 x)` (OpenAI CLIP's `quick_gelu`).
    QuickGelu,
}

impl Activation {
    /// The activation `hidden_act` names (`quick_gelu`; anything else is
    /// GELU, the configs check the name).
    pub fn named(hidden_act: &str) -> Activation {
        match hidden_act {
            "quick_gelu" => Activation::QuickGelu,
            _ => Activation::Gelu,
        }
    }

    /// Applied in the compute dtype of `h`.
    pub fn apply(&self, h: Tensor) -> Tensor {
        match self {
            Activation::Gelu => h.gelu("none"),
            Activation::QuickGelu => &h * (&h * 1.702).sigmoid(),
        }
    }
}

/// A part of a ViT-family encoder, in [`VitNames::order`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    ClassToken,
    Patch,
    Positions,
    PreLayerNorm,
    Layers,
    FinalLayerNorm,
}

/// Where a pre-LN layer keeps its parameters, below its path.
#[derive(Debug)]
pub struct VitLayerNames {
    pub layernorm_before: &'static [&'static str],
    /// The path of the query, key and value projections, and their names.
    pub attention: &'static [&'static str],
    pub qkv: [&'static str; 3],
    pub attention_out: &'static [&'static str],
    pub layernorm_after: &'static [&'static str],
    pub fc1: &'static [&'static str],
    pub fc2: &'static [&'static str],
}

/// A ViT-family encoder's parameter names (below the plugin's path), their
/// shapes where the families differ, and the order they are created in,
/// which a seeded initialisation follows.
#[derive(Debug)]
pub struct VitNames {
    /// The class token below `embeddings`: `[1, 1, H]` (ViT's `cls_token`)
    /// or `[H]` (CLIP's `class_embedding`).
    pub class_token: &'static str,
    pub class_token_3d: bool,
    /// The patch convolution below `embeddings`, and whether it has a bias.
    pub patch: &'static [&'static str],
    pub patch_bias: bool,
    /// The position table below `embeddings` (the last name is the
    /// tensor's): `[1, 1 + N, H]` or `[1 + N, H]`.
    pub positions: &'static [&'static str],
    pub positions_3d: bool,
    /// The LayerNorm over the embeddings before the layers, if any.
    pub pre_layernorm: Option<&'static str>,
    /// The layers' path (`encoder.layer`).
    pub layers: &'static [&'static str],
    pub layer: VitLayerNames,
    /// The LayerNorm after the layers.
    pub final_layernorm: &'static str,
    /// The order the parts are created in.
    pub order: &'static [Part],
}

/// `ViTModel`'s names: `cls_token` `[1, 1, H]`, a patch projection with a
/// bias, `position_embeddings` `[1, 1 + N, H]`, `encoder.layer.N`, a final
/// `layernorm`; the layers are created first.
pub const VIT_NAMES: VitNames = VitNames {
    class_token: "cls_token",
    class_token_3d: true,
    patch: &["patch_embeddings", "projection"],
    patch_bias: true,
    positions: &["position_embeddings"],
    positions_3d: true,
    pre_layernorm: None,
    layers: &["encoder", "layer"],
    layer: VitLayerNames {
        layernorm_before: &["layernorm_before"],
        attention: &["attention", "attention"],
        qkv: ["query", "key", "value"],
        attention_out: &["attention", "output", "dense"],
        layernorm_after: &["layernorm_after"],
        fc1: &["intermediate", "dense"],
        fc2: &["output", "dense"],
    },
    final_layernorm: "layernorm",
    order: &[
        Part::Layers,
        Part::Patch,
        Part::ClassToken,
        Part::Positions,
        Part::FinalLayerNorm,
    ],
};

/// `CLIPVisionModel`'s names (below `vision_model.`): `class_embedding`
/// `[H]`, a patch embedding without bias, `position_embedding.weight`
/// `[1 + N, H]`, `pre_layrnorm`, `encoder.layers.N`, `post_layernorm`.
pub const CLIP_NAMES: VitNames = VitNames {
    class_token: "class_embedding",
    class_token_3d: false,
    patch: &["patch_embedding"],
    patch_bias: false,
    positions: &["position_embedding", "weight"],
    positions_3d: false,
    pre_layernorm: Some("pre_layrnorm"),
    layers: &["encoder", "layers"],
    layer: VitLayerNames {
        layernorm_before: &["layer_norm1"],
        attention: &["self_attn"],
        qkv: ["q_proj", "k_proj", "v_proj"],
        attention_out: &["self_attn", "out_proj"],
        layernorm_after: &["layer_norm2"],
        fc1: &["mlp", "fc1"],
        fc2: &["mlp", "fc2"],
    },
    final_layernorm: "post_layernorm",
    order: &[
        Part::ClassToken,
        Part::Patch,
        Part::Positions,
        Part::PreLayerNorm,
        Part::Layers,
        Part::FinalLayerNorm,
    ],
};

/// The keys of a ViT-family architecture the stack reads besides the layer
/// sizes (HuggingFace names).
#[derive(Debug, Clone, Deserialize)]
struct VitKeys {
    patch_size: i64,
    hidden_act: String,
    #[serde(default = "yes")]
    qkv_bias: bool,
}

fn yes() -> bool {
    true
}

/// A ViT-family encoder's resolved architecture (a plugin's
/// [`hf_arch!`](crate::hf_arch) config, serialising under HuggingFace's
/// key names), as it configures a [`VitEncoder`].
/// Its [`CheckedArch`] is the checks resolving a section makes.
pub trait VitArch: Serialize + CheckedArch {
    /// The plugin's name, in errors.
    const PLUGIN: &'static str;
    /// Its parameter names ([`VIT_NAMES`], [`CLIP_NAMES`]).
    const NAMES: &'static VitNames;
    /// The plugin's trace span (`|| tracing::trace_span!("vit")`).
    const SPAN: fn() -> tracing::Span;
}

/// A pre-LN layer: LayerNorm, self-attention, residual; LayerNorm, MLP,
/// residual.
struct VitLayer {
    layernorm_before: LayerNorm,
    attention: Attention,
    attention_out: Linear,
    layernorm_after: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
    /// `None` (CLIP): no dropout after a sub-layer, whose output is cast to
    /// fp32 before the residual sum.
    hidden_dropout: Option<f64>,
}

impl VitLayer {
    fn new(
        p: &nn::Path,
        names: &VitLayerNames,
        keys: &LayerKeys,
        vit: &VitKeys,
        compute: Kind,
    ) -> Self {
        let h = keys.hidden_size.expect("a ViT has a width");
        let i = keys.intermediate_size;
        let eps = keys.layer_norm_eps;
        VitLayer {
            layernorm_before: LayerNorm::new(&path_at(p, names.layernorm_before), h, eps),
            attention: Attention::named(
                &path_at(p, names.attention),
                names.qkv,
                [h, h, h],
                keys.num_attention_heads,
                keys.attention_dropout(),
                vit.qkv_bias,
                compute,
            ),
            attention_out: Linear::new(&path_at(p, names.attention_out), h, h, true, compute),
            layernorm_after: LayerNorm::new(&path_at(p, names.layernorm_after), h, eps),
            fc1: Linear::new(&path_at(p, names.fc1), h, i, true, compute),
            fc2: Linear::new(&path_at(p, names.fc2), i, h, true, compute),
            activation: Activation::named(&vit.hidden_act),
            hidden_dropout: keys.hidden_dropout_prob,
        }
    }

    /// The same layer under a second handle (its tensors shared, not
    /// copied), which a checkpointed call keeps for backward.
    fn shared(&self) -> VitLayer {
        VitLayer {
            layernorm_before: self.layernorm_before.shared(),
            attention: self.attention.shared(),
            attention_out: self.attention_out.shared(),
            layernorm_after: self.layernorm_after.shared(),
            fc1: self.fc1.shared(),
            fc2: self.fc2.shared(),
            activation: self.activation,
            hidden_dropout: self.hidden_dropout,
        }
    }

    /// Every parameter the layer reads.
    fn params(&self) -> Vec<Tensor> {
        let mut out = Vec::new();
        self.layernorm_before.params(&mut out);
        self.attention.params(&mut out);
        self.attention_out.params(&mut out);
        self.layernorm_after.params(&mut out);
        self.fc1.params(&mut out);
        self.fc2.params(&mut out);
        out
    }

    /// A sub-layer's output, ready for the residual sum.
    fn residual(&self, out: Tensor, train: bool) -> Tensor {
        match self.hidden_dropout {
            Some(p) => out.dropout(p, train),
            None => out.to_kind(Kind::Float),
        }
    }

    /// `[B, N, H]` -> `[B, N, H]`.
    fn forward(&self, xs: &Tensor, train: bool) -> Tensor {
        let h = self.layernorm_before.forward(xs);
        let a = self.attention.forward(&h, &h, None, train);
        let xs = self.residual(self.attention_out.forward(&a), train) + xs;
        let h = self.fc1.forward(&self.layernorm_after.forward(&xs));
        let h = self.activation.apply(h);
        self.residual(self.fc2.forward(&h), train) + xs
    }
}

/// A ViT-family image encoder.
pub struct VitEncoder {
    plugin: &'static str,
    span: fn() -> tracing::Span,
    hidden: i64,
    image_size: i64,
    patch_size: i64,
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    class_token: Tensor,
    positions: Tensor,
    pre_layernorm: Option<LayerNorm>,
    /// After the embeddings (ViT's `hidden_dropout_prob`; CLIP has none).
    embedding_dropout: Option<f64>,
    layers: Vec<VitLayer>,
    /// Activation checkpointing of every layer, where set.
    checkpoint: Option<Checkpointer>,
    final_layernorm: LayerNorm,
    compute: Kind,
    /// What its FLOPs count under ([`vlmatch_core::flops`]).
    module: String,
}

impl VitEncoder {
    /// Build `cfg` under `p` for images of `image_size` pixels a side,
    /// computing in `compute`.
    pub fn new<C: VitArch>(p: &nn::Path, cfg: &C, image_size: i64, compute: Kind) -> Result<Self> {
        // The checks that resolving a section made, for models built directly.
        cfg.check_arch(C::PLUGIN)?;
        let keys = LayerKeys::of(cfg);
        let vit: VitKeys = serde_json::to_value(cfg)
            .and_then(serde_json::from_value)
            .expect("a resolved ViT architecture has a patch size and activation");
        let ps = vit.patch_size;
        check::patch_divides(&format!("{}.patch_size", C::PLUGIN), ps, image_size)?;
        let names = C::NAMES;
        let h = keys.hidden_size.expect("a ViT has a width");
        let n = (image_size / ps).pow(2);
        let emb = p / "embeddings";
        let (mut class_token, mut patch, mut positions, mut pre_ln, mut layers, mut final_ln) =
            (None, None, None, None, None, None);
        for part in names.order {
            match part {
                Part::ClassToken => {
                    let shape = if names.class_token_3d {
                        vec![1, 1, h]
                    } else {
                        vec![h]
                    };
                    class_token = Some(emb.var(names.class_token, &shape, hf_init()));
                }
                Part::Patch => {
                    let at = path_at(&emb, names.patch);
                    let weight = at.var("weight", &[h, 3, ps, ps], hf_init());
                    let bias = names
                        .patch_bias
                        .then(|| at.var("bias", &[h], nn::Init::Const(0.0)));
                    patch = Some((weight, bias));
                }
                Part::Positions => {
                    let (dirs, name) = names.positions.split_at(names.positions.len() - 1);
                    let shape = if names.positions_3d {
                        vec![1, n + 1, h]
                    } else {
                        vec![n + 1, h]
                    };
                    positions = Some(path_at(&emb, dirs).var(name[0], &shape, hf_init()));
                }
                Part::PreLayerNorm => {
                    pre_ln = names
                        .pre_layernorm
                        .map(|name| LayerNorm::new(&(p / name), h, keys.layer_norm_eps));
                }
                Part::Layers => {
                    let at = path_at(p, names.layers);
                    layers = Some(
                        (0..keys.num_hidden_layers)
                            .map(|i| VitLayer::new(&(&at / i), &names.layer, &keys, &vit, compute))
                            .collect(),
                    );
                }
                Part::FinalLayerNorm => {
                    let at = p / names.final_layernorm;
                    final_ln = Some(LayerNorm::new(&at, h, keys.layer_norm_eps));
                }
            }
        }
        let (patch_weight, patch_bias) = patch.expect("the order names the patch embedding");
        Ok(VitEncoder {
            plugin: C::PLUGIN,
            span: C::SPAN,
            hidden: h,
            image_size,
            patch_size: ps,
            patch_weight,
            patch_bias,
            class_token: class_token.expect("the order names the class token"),
            positions: positions.expect("the order names the positions"),
            pre_layernorm: pre_ln,
            embedding_dropout: keys.hidden_dropout_prob,
            layers: layers.expect("the order names the layers"),
            checkpoint: None,
            final_layernorm: final_ln.expect("the order names the final LayerNorm"),
            compute,
            module: flops::module_of(p.components()),
        })
    }

    /// `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, H]` before the final LayerNorm
    /// (CLIP: `transformers`' `last_hidden_state`).
    pub fn forward_unnormed(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        let size = images.size();
        if size.len() != 4
            || size[1] != 3
            || size[2] != self.image_size
            || size[3] != self.image_size
        {
            return Err(Error::plugin(
                self.plugin,
                format!(
                    "expected images [B, 3, {s}, {s}], got {size:?}",
                    s = self.image_size
                ),
            ));
        }
        let (b, h, p) = (size[0], self.hidden, self.patch_size);
        let (w, bias) = if self.compute == Kind::Float {
            (
                self.patch_weight.shallow_clone(),
                self.patch_bias.as_ref().map(Tensor::shallow_clone),
            )
        } else {
            (
                self.patch_weight.to_kind(self.compute),
                self.patch_bias.as_ref().map(|b| b.to_kind(self.compute)),
            )
        };
        let patches =
            images
                .to_kind(self.compute)
                .conv2d(&w, bias.as_ref(), [p, p], [0, 0], [1, 1], 1);
        flops::patch_embedding(&self.module, images, &self.patch_weight, &patches);
        let patches = patches.flatten(2, 3).transpose(1, 2).to_kind(Kind::Float);
        let cls = if self.class_token.dim() == 3 {
            self.class_token.expand([b, 1, h], false)
        } else {
            self.class_token.view([1, 1, h]).expand([b, 1, h], false)
        };
        let xs = Tensor::cat(&[cls, patches], 1);
        let mut xs = if self.positions.dim() == 3 {
            xs + &self.positions
        } else {
            xs + self.positions.unsqueeze(0)
        };
        if let Some(p) = self.embedding_dropout {
            xs = xs.dropout(p, train);
        }
        if let Some(ln) = &self.pre_layernorm {
            xs = ln.forward(&xs);
        }
        for i in 0..self.layers.len() {
            xs = self.layer(i, &xs, train);
        }
        Ok(xs)
    }

    /// Checkpoint every layer through `checkpointer` (the host's, from
    /// `BuildContext::checkpointer`), or none with `None`: each layer then
    /// keeps only its input and is computed again in backward.
    pub fn set_checkpointing(&mut self, checkpointer: Option<Checkpointer>) {
        self.checkpoint = checkpointer;
    }

    /// Layer `i`: the one place this stack calls a layer, checkpointed
    /// where the encoder is.
    fn layer(&self, i: usize, xs: &Tensor, train: bool) -> Tensor {
        let layer = &self.layers[i];
        let Some(checkpointer) = self.checkpoint else {
            return layer.forward(xs, train);
        };
        let owned = layer.shared();
        let run = move |t: &[Tensor]| owned.forward(&t[0], train);
        checkpointed(
            checkpointer,
            &[xs.shallow_clone()],
            &layer.params(),
            Box::new(run),
        )
    }

    /// `[B, 3, S, S]` -> `[B, 1 + (S/P)^2, H]`, the final LayerNorm applied.
    pub fn forward(&self, images: &Tensor, train: bool) -> Result<Tensor> {
        Ok(self
            .final_layernorm
            .forward(&self.forward_unnormed(images, train)?))
    }
}

impl Encoder for VitEncoder {
    fn modality(&self) -> Modality {
        Modality::Image
    }
    fn hidden_size(&self) -> i64 {
        self.hidden
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = (self.span)().entered();
        let EncoderInput::Image(images) = input else {
            return Err(Error::plugin(self.plugin, "an image encoder takes images"));
        };
        Ok(Encoded::all_valid(self.forward(images, train)?))
    }
}

/// The factory of an image encoder plugin whose config section is `S`:
/// the section resolved, then [`build_vit`].
pub fn vit_encoder<S>(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>>
where
    S: ArchSection,
    S::Arch: VitArch,
{
    build_vit(ctx, &ctx.params::<S>()?.resolve(&ctx.key)?)
}

/// The factory of an image encoder plugin: `cfg` (resolved from the
/// section) checked against `data.image_size`, then built. A checkpoint at
/// another resolution is fine: the trainer interpolates its position
/// embeddings to `data.image_size` when loading.
pub fn build_vit<C: VitArch>(ctx: &BuildContext<'_>, cfg: &C) -> Result<Rc<dyn Encoder>> {
    let vit: VitKeys = serde_json::to_value(cfg)
        .and_then(serde_json::from_value)
        .expect("a resolved ViT architecture has a patch size");
    check::patch_divides(
        &format!("{}.patch_size", ctx.key),
        vit.patch_size,
        ctx.env.image_size,
    )?;
    let mut encoder = VitEncoder::new(&ctx.path, cfg, ctx.env.image_size, ctx.env.compute)?;
    encoder.set_checkpointing(ctx.checkpointer()?);
    Ok(Rc::new(encoder))
}
