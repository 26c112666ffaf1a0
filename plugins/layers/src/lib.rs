//! Transformer building blocks with HuggingFace parameter names and
//! initialisation, shared by the encoder plugins.
//!
//! Mixed precision: [`Linear`] and attention compute in the `compute` dtype
//! given at construction (bf16 on CUDA) from fp32 master weights; layer norms
//! and residual sums stay fp32. Tensors between blocks are fp32.

pub mod hf;
pub mod masking;

use tch::{nn, Kind, Tensor};
use vlmatch_core::flops;

/// HuggingFace's initialiser: normal(0, 0.02) weights, zero biases.
pub fn hf_init() -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// A linear layer (`weight` `[out, in]`, `bias` `[out]`) computing in
/// `compute` precision.
#[derive(Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    compute: Kind,
    /// What its FLOPs count under ([`vlmatch_core::flops`]).
    module: String,
}

impl Linear {
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64, bias: bool, compute: Kind) -> Self {
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], hf_init()),
            bias: bias.then(|| p.var("bias", &[out_dim], nn::Init::Const(0.0))),
            compute,
            module: flops::module_of(p.components()),
        }
    }

    /// The module its FLOPs count under.
    pub fn module(&self) -> &str {
        &self.module
    }

    /// The same parameters under a second handle (not a copy: both read
    /// and train one set of tensors), for layers that share a projection.
    pub fn shared(&self) -> Linear {
        Linear {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
            compute: self.compute,
            module: self.module.clone(),
        }
    }

    /// `[.., in]` -> `[.., out]` in the compute dtype.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let out = if self.compute == Kind::Float {
            xs.to_kind(Kind::Float)
                .linear(&self.weight, self.bias.as_ref())
        } else {
            let w = self.weight.to_kind(self.compute);
            let b = self.bias.as_ref().map(|b| b.to_kind(self.compute));
            xs.to_kind(self.compute).linear(&w, b.as_ref())
        };
        flops::linear(&self.module, xs, &self.weight, &out);
        out
    }
}

/// Layer norm (`weight`, `bias`) in fp32 with a configurable epsilon
/// (HuggingFace BERT and ViT use 1e-12; tch's default is 1e-5).
#[derive(Debug)]
pub struct LayerNorm {
    ln: nn::LayerNorm,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        let cfg = nn::LayerNormConfig {
            eps,
            ..Default::default()
        };
        LayerNorm {
            ln: nn::layer_norm(p, vec![dim], cfg),
        }
    }
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.to_kind(Kind::Float).apply(&self.ln)
    }
}

/// Multi-head attention projections `query`, `key`, `value` under one path
/// (BERT `attention.self`, ViT `attention.attention`); the output projection
/// is the caller's, as the two families name it differently.
#[derive(Debug)]
pub struct Attention {
    query: Linear,
    key: Linear,
    value: Linear,
    heads: i64,
    dropout: f64,
}

impl Attention {
    /// `q_dim`: width of the attending states; `kv_dim`: of the attended
    /// ones (differ for cross-attention); `dim`: the attention width.
    pub fn new(
        p: &nn::Path,
        q_dim: i64,
        kv_dim: i64,
        dim: i64,
        heads: i64,
        dropout: f64,
        compute: Kind,
    ) -> Self {
        Self::with_bias(p, q_dim, kv_dim, dim, heads, dropout, true, compute)
    }

    /// [`Attention::new`] with or without `query`/`key`/`value` biases.
    #[allow(clippy::too_many_arguments)]
    pub fn with_bias(
        p: &nn::Path,
        q_dim: i64,
        kv_dim: i64,
        dim: i64,
        heads: i64,
        dropout: f64,
        bias: bool,
        compute: Kind,
    ) -> Self {
        assert!(
            dim % heads == 0,
            "attention width {dim} is not divisible by {heads} heads"
        );
        Attention {
            query: Linear::new(&(p / "query"), q_dim, dim, bias, compute),
            key: Linear::new(&(p / "key"), kv_dim, dim, bias, compute),
            value: Linear::new(&(p / "value"), kv_dim, dim, bias, compute),
            heads,
            dropout,
        }
    }

    /// An attention with its own `query` under `p` and `with`'s `key` and
    /// `value` projections, shared ([`Linear::shared`]; ALBEF's NLVR2
    /// fusion shares them between the two cross-attentions of a layer pair).
    pub fn sharing_key_value(
        p: &nn::Path,
        q_dim: i64,
        with: &Attention,
        dropout: f64,
        compute: Kind,
    ) -> Self {
        let dim = with.key.weight.size()[0];
        Attention {
            query: Linear::new(&(p / "query"), q_dim, dim, with.key.bias.is_some(), compute),
            key: with.key.shared(),
            value: with.value.shared(),
            heads: with.heads,
            dropout,
        }
    }

    /// The `key` and `value` weights (to check what is shared).
    pub fn key_value_weights(&self) -> [&Tensor; 2] {
        [&self.key.weight, &self.value.weight]
    }

    /// `xs` `[B, Lq, q_dim]` attends to `kv` `[B, Lk, kv_dim]`; `kv_mask`
    /// `[B, Lk]` (1 = attend), `None` for all. Returns `[B, Lq, dim]`.
    pub fn forward(
        &self,
        xs: &Tensor,
        kv: &Tensor,
        kv_mask: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        self.forward_indexed(xs, kv, kv_mask, None, train)
    }

    /// [`Attention::forward`] where the attended states repeat: `kv`
    /// `[U, Lk, kv_dim]` (and `kv_mask` `[U, Lk]`) hold each distinct one
    /// once, and row `b` of `xs` attends to `kv[kv_index[b]]`. Keys and
    /// values are projected once per distinct row, then gathered: the same
    /// result as `forward` on `kv.index_select(0, kv_index)`, for a fraction
    /// of the projections when rows repeat (an image re-ranked against many
    /// captions). `kv_index` `None`: `kv` is per row already.
    pub fn forward_indexed(
        &self,
        xs: &Tensor,
        kv: &Tensor,
        kv_mask: Option<&Tensor>,
        kv_index: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let (b, lq, _) = xs.size3().expect("attention input is [B, L, D]");
        let lk = kv.size()[1];
        let split = |t: Tensor, l: i64| {
            let d = t.size()[2];
            t.view([b, l, self.heads, d / self.heads]).transpose(1, 2)
        };
        let per_row = |t: Tensor| match kv_index {
            Some(i) => t.index_select(0, i),
            None => t,
        };
        let q = split(self.query.forward(xs), lq);
        let k = split(per_row(self.key.forward(kv)), lk);
        let v = split(per_row(self.value.forward(kv)), lk);
        let mask = kv_mask.map(|m| per_row(m.to_kind(Kind::Bool)).view([b, 1, 1, lk]));
        let dropout = if train { self.dropout } else { 0.0 };
        let out = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            mask.as_ref(),
            dropout,
            false,
            None::<f64>,
            false,
        );
        let d = q.size()[3];
        flops::attention(
            self.query.module(),
            b * self.heads,
            lq,
            lk,
            d,
            out.requires_grad(),
        );
        out.transpose(1, 2).contiguous().view([b, lq, -1])
    }
}

/// A masked-language-model head whose decoder is tied to the text
/// encoder's word embeddings: dense + GELU + LayerNorm, then
/// `states . word_embeddings^T + bias` (BERT's `cls.predictions`, RoBERTa's
/// `lm_head`; the caller names the parameters as its checkpoints do).
pub struct TiedLmHead {
    dense: Linear,
    layer_norm: LayerNorm,
    bias: Tensor,
    word_embeddings: Tensor,
    compute: Kind,
}

impl TiedLmHead {
    /// `dense` and `layer_norm` under the paths given, `bias` `[V]` under
    /// `bias_at`; `word_embeddings` `[V, H]` is the tied decoder weight.
    pub fn new(
        dense: &nn::Path,
        layer_norm: &nn::Path,
        bias_at: &nn::Path,
        word_embeddings: Tensor,
        eps: f64,
        compute: Kind,
    ) -> Self {
        let (v, h) = word_embeddings.size2().expect("word embeddings are [V, H]");
        TiedLmHead {
            dense: Linear::new(dense, h, h, true, compute),
            layer_norm: LayerNorm::new(layer_norm, h, eps),
            bias: bias_at.var("bias", &[v], nn::Init::Const(0.0)),
            word_embeddings,
            compute,
        }
    }

    /// Vocabulary logits `[.., V]` (fp32) of states `[.., H]`.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        let h = self.dense.forward(hidden).gelu("none");
        let h = self.layer_norm.forward(&h);
        let logits = if self.compute == Kind::Float {
            h.matmul(&self.word_embeddings.tr())
        } else {
            h.to_kind(self.compute)
                .matmul(&self.word_embeddings.to_kind(self.compute).tr())
        };
        flops::linear(self.dense.module(), &h, &self.word_embeddings, &logits);
        logits.to_kind(Kind::Float) + &self.bias
    }
}

/// Hyper-parameters of a post-LN BERT layer (HuggingFace `BertLayer`).
#[derive(Debug, Clone, Copy)]
pub struct BertLayerConfig {
    pub hidden: i64,
    pub heads: i64,
    pub intermediate: i64,
    pub hidden_dropout: f64,
    pub attention_dropout: f64,
    pub layer_norm_eps: f64,
    /// Width of the states cross-attended to; `None` for a text-only layer.
    pub cross_width: Option<i64>,
    pub compute: Kind,
}

/// Self-attention, then (fusion layers) cross-attention to the image, then a
/// feed-forward block; each sub-layer residual + LayerNorm. Parameter names
/// follow HuggingFace `BertLayer` and ALBEF's `crossattention`.
#[derive(Debug)]
pub struct BertLayer {
    attention: Attention,
    attention_out: Linear,
    attention_ln: LayerNorm,
    cross: Option<(Attention, Linear, LayerNorm)>,
    intermediate: Linear,
    output: Linear,
    output_ln: LayerNorm,
    dropout: f64,
}

impl BertLayer {
    pub fn new(p: &nn::Path, cfg: &BertLayerConfig) -> Self {
        Self::build(p, cfg, None)
    }

    /// A fusion layer whose cross-attention `key` and `value` projections
    /// are `with`'s (shared, not copied; `with` must have cross-attention
    /// of the same width): the second layer of an ALBEF NLVR2 pair. Its own
    /// parameters are everything else, under `p`.
    pub fn sharing_cross_key_value(p: &nn::Path, cfg: &BertLayerConfig, with: &BertLayer) -> Self {
        let shared = with
            .cross
            .as_ref()
            .map(|(a, _, _)| a)
            .expect("the layer shared with has cross-attention");
        Self::build(p, cfg, Some(shared))
    }

    /// The cross-attention's `key` and `value` weights; `None` for a
    /// text-only layer.
    pub fn cross_key_value_weights(&self) -> Option<[&Tensor; 2]> {
        self.cross.as_ref().map(|(a, _, _)| a.key_value_weights())
    }

    fn build(p: &nn::Path, cfg: &BertLayerConfig, share_kv: Option<&Attention>) -> Self {
        let h = cfg.hidden;
        let attn = |p: nn::Path, kv: i64, share: Option<&Attention>| {
            (
                match share {
                    Some(with) => Attention::sharing_key_value(
                        &(&p / "self"),
                        h,
                        with,
                        cfg.attention_dropout,
                        cfg.compute,
                    ),
                    None => Attention::new(
                        &(&p / "self"),
                        h,
                        kv,
                        h,
                        cfg.heads,
                        cfg.attention_dropout,
                        cfg.compute,
                    ),
                },
                Linear::new(&(&p / "output" / "dense"), h, h, true, cfg.compute),
                LayerNorm::new(&(&p / "output" / "LayerNorm"), h, cfg.layer_norm_eps),
            )
        };
        let (attention, attention_out, attention_ln) = attn(p / "attention", h, None);
        BertLayer {
            attention,
            attention_out,
            attention_ln,
            cross: cfg
                .cross_width
                .map(|w| attn(p / "crossattention", w, share_kv)),
            intermediate: Linear::new(
                &(p / "intermediate" / "dense"),
                h,
                cfg.intermediate,
                true,
                cfg.compute,
            ),
            output: Linear::new(
                &(p / "output" / "dense"),
                cfg.intermediate,
                h,
                true,
                cfg.compute,
            ),
            output_ln: LayerNorm::new(&(p / "output" / "LayerNorm"), h, cfg.layer_norm_eps),
            dropout: cfg.hidden_dropout,
        }
    }

    /// `xs` `[B, L, H]` with `mask` `[B, L]`; `image` `[B, N, W]` with its
    /// mask for fusion layers. Returns `[B, L, H]` fp32.
    pub fn forward(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> Tensor {
        self.forward_rows(xs, xs, mask, image, train)
    }

    /// The layer's output at the positions `rows` only (`[B, R, D]`, a slice
    /// of `xs` along dimension 1): self-attention still reads every position
    /// of `xs` as keys and values, so each returned row equals that row of
    /// [`BertLayer::forward`]; the others are not computed.
    pub fn forward_rows(
        &self,
        rows: &Tensor,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        train: bool,
    ) -> Tensor {
        self.forward_rows_indexed(rows, xs, mask, image, None, train)
    }

    /// [`BertLayer::forward_rows`] with `image` `[U, N, W]` holding each
    /// distinct image once and `image_index` `[B]` naming row `b`'s
    /// ([`Attention::forward_indexed`]): the cross-attention keys and values
    /// are computed once per image.
    pub fn forward_rows_indexed(
        &self,
        rows: &Tensor,
        xs: &Tensor,
        mask: &Tensor,
        image: Option<(&Tensor, &Tensor)>,
        image_index: Option<&Tensor>,
        train: bool,
    ) -> Tensor {
        let a = self.attention.forward(rows, xs, Some(mask), train);
        let a = self.attention_out.forward(&a).dropout(self.dropout, train);
        let mut xs = self.attention_ln.forward(&(a + rows));
        if let (Some((attn, out, ln)), Some((img, img_mask))) = (&self.cross, image) {
            let c = attn.forward_indexed(&xs, img, Some(img_mask), image_index, train);
            let c = out.forward(&c).dropout(self.dropout, train);
            xs = ln.forward(&(c + &xs));
        }
        let h = self.intermediate.forward(&xs).gelu("none");
        let h = self.output.forward(&h).dropout(self.dropout, train);
        self.output_ln.forward(&(h + xs))
    }
}
