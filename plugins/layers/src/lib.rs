//! Transformer building blocks with HuggingFace parameter names and
//! initialisation, shared by the encoder plugins, and one stack per model
//! family that the encoder crates configure:
//!
//! - [`bert`]: the BERT family (post-LN layers with optional
//!   cross-attention, embeddings by position-id rule): `bert`, `roberta`,
//!   `cross_attention`, `co_attention`;
//! - [`vit`]: the ViT family (pre-LN layers, class token, patch embedding,
//!   activation choice, CLIP's pre-LayerNorm): `vit`, `clip_vit`;
//! - [`lm_head`]: the masked-LM head (`mlm_head`, `roberta_lm_head`);
//! - [`arch`], [`hf`], [`layout`]: HuggingFace config keys, `config.json`
//!   reading and writing, and checkpoint layouts as tables.
//!
//! Each stack calls its layers in one place (`BertStack::layer`,
//! `VitEncoder`'s `layer`), where activation checkpointing wraps them: with
//! the host's [`Checkpointer`] (given to the factories of the roles that
//! `train.activation_checkpointing` names), a layer is computed without
//! keeping its activations and computed again in backward
//! ([`vlmatch_core::checkpoint`]). Layers hand it a handle on themselves
//! ([`BertLayer::shared`]; the same tensors, not a copy) and the list of
//! their parameters.
//!
//! Mixed precision: [`Linear`] and attention compute in the `compute` dtype
//! given at construction (bf16 on CUDA) from fp32 master weights; layer norms
//! and residual sums stay fp32. Tensors between blocks are fp32.

pub mod arch;
pub mod bert;
pub mod hf;
pub mod layout;
pub mod lm_head;
pub mod masking;
pub mod vit;

pub use bert::{BertLayer, BertLayerConfig};
pub use lm_head::TiedLmHead;

use tch::{nn, Kind, Tensor};
use vlmatch_core::checkpoint::{Checkpointer, Recompute};
use vlmatch_core::flops;

/// `run(inputs)` through the host's `checkpointer`: the layer's activations
/// are not kept, and it runs again in backward. `params`: every tensor `run`
/// reads that needs a gradient and is not an input.
pub fn checkpointed(
    checkpointer: Checkpointer,
    inputs: &[Tensor],
    params: &[Tensor],
    run: Recompute,
) -> Tensor {
    // Like a libtorch operation, a layer that cannot run panics (the layer
    // itself would have); the checkpointer only reports it.
    checkpointer(inputs, params, run).unwrap_or_else(|e| panic!("activation checkpointing: {e}"))
}

/// HuggingFace's initialiser: normal(0, 0.02) weights, zero biases.
pub fn hf_init() -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// `p / names[0] / names[1] / ...`.
pub fn path_at<'a>(p: &nn::Path<'a>, names: &[&str]) -> nn::Path<'a> {
    names.iter().fold(p.clone(), |q, n| &q / *n)
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

    /// Its weight and bias, for a checkpointed layer's parameter list.
    pub fn params(&self, out: &mut Vec<Tensor>) {
        out.push(self.weight.shallow_clone());
        out.extend(self.bias.as_ref().map(Tensor::shallow_clone));
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
/// (`nn::layer_norm`'s variables and computation, held so that a layer can
/// hand out a second handle on them.)
#[derive(Debug)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    dim: i64,
    eps: f64,
}

impl LayerNorm {
    pub fn new(p: &nn::Path, dim: i64, eps: f64) -> Self {
        LayerNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            bias: p.var("bias", &[dim], nn::Init::Const(0.0)),
            dim,
            eps,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.to_kind(Kind::Float).layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )
    }

    /// The same parameters under a second handle (not a copy).
    pub fn shared(&self) -> LayerNorm {
        LayerNorm {
            weight: self.weight.shallow_clone(),
            bias: self.bias.shallow_clone(),
            dim: self.dim,
            eps: self.eps,
        }
    }

    /// Its weight and bias, for a checkpointed layer's parameter list.
    pub fn params(&self, out: &mut Vec<Tensor>) {
        out.extend([self.weight.shallow_clone(), self.bias.shallow_clone()]);
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
    /// ones (differ for cross-attention); `dim`: the attention width. The
    /// projections are `query`, `key` and `value`, with biases.
    pub fn new(
        p: &nn::Path,
        q_dim: i64,
        kv_dim: i64,
        dim: i64,
        heads: i64,
        dropout: f64,
        compute: Kind,
    ) -> Self {
        let names = ["query", "key", "value"];
        Self::named(
            p,
            names,
            [q_dim, kv_dim, dim],
            heads,
            dropout,
            true,
            compute,
        )
    }

    /// An attention whose query, key and value projections are under
    /// `names` (CLIP's `q_proj`, `k_proj`, `v_proj`), with or without
    /// biases; `dims`: the query and key/value input widths and the
    /// attention width.
    pub fn named(
        p: &nn::Path,
        names: [&str; 3],
        [q_dim, kv_dim, dim]: [i64; 3],
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
            query: Linear::new(&(p / names[0]), q_dim, dim, bias, compute),
            key: Linear::new(&(p / names[1]), kv_dim, dim, bias, compute),
            value: Linear::new(&(p / names[2]), kv_dim, dim, bias, compute),
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

    /// The same parameters under a second handle (not a copy).
    pub fn shared(&self) -> Attention {
        Attention {
            query: self.query.shared(),
            key: self.key.shared(),
            value: self.value.shared(),
            heads: self.heads,
            dropout: self.dropout,
        }
    }

    /// Its projections' weights and biases, for a checkpointed layer's
    /// parameter list.
    pub fn params(&self, out: &mut Vec<Tensor>) {
        for l in [&self.query, &self.key, &self.value] {
            l.params(out);
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
