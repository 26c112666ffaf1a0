//! The masked-language-model head, once for every family: BERT's
//! `cls.predictions` (generator `mlm_head`) and RoBERTa's `lm_head`
//! (generator `roberta_lm_head`) differ only in their parameter names
//! ([`LmHeadNames`]).

use crate::{path_at, LayerNorm, Linear};
use serde::Deserialize;
use std::marker::PhantomData;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{flops, Encoded, Error, Generator, Result};
use vlmatch_registry::BuildContext;

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

/// Where an LM head keeps its parameters, below the generator's path.
#[derive(Debug)]
pub struct LmHeadNames {
    /// The head's own path (`cls.predictions`, `lm_head`), which holds the
    /// decoder `bias`.
    pub root: &'static [&'static str],
    /// The dense layer, below `root` (`transform.dense`, `dense`).
    pub dense: &'static [&'static str],
    /// The layer norm, below `root` (`transform.LayerNorm`, `layer_norm`).
    pub layer_norm: &'static [&'static str],
}

/// A family's LM head names, as a type ([`LmHead`]'s parameter).
pub trait HeadNames {
    const NAMES: LmHeadNames;
    /// The generator plugin it is registered as, in errors.
    const PLUGIN: &'static str;
    /// The LayerNorm epsilon where the section sets none.
    const EPS: f64;
}

/// `BertForMaskedLM`'s names: `cls.predictions.{transform.dense,
/// transform.LayerNorm, bias}`.
pub struct BertHead;

impl HeadNames for BertHead {
    const NAMES: LmHeadNames = LmHeadNames {
        root: &["cls", "predictions"],
        dense: &["transform", "dense"],
        layer_norm: &["transform", "LayerNorm"],
    };
    const PLUGIN: &'static str = "mlm_head";
    const EPS: f64 = 1e-12;
}

/// `RobertaForMaskedLM`'s names: `lm_head.{dense, layer_norm, bias}`.
pub struct RobertaHead;

impl HeadNames for RobertaHead {
    const NAMES: LmHeadNames = LmHeadNames {
        root: &["lm_head"],
        dense: &["dense"],
        layer_norm: &["layer_norm"],
    };
    const PLUGIN: &'static str = "roberta_lm_head";
    /// `roberta-base`'s.
    const EPS: f64 = 1e-5;
}

/// A [`TiedLmHead`] under the names of `N`, as a generator.
pub struct LmHead<N> {
    head: TiedLmHead,
    names: PhantomData<fn() -> N>,
}

impl<N: HeadNames> LmHead<N> {
    /// Build under `p`; `word_embeddings` `[V, H]` is the tied decoder
    /// weight.
    pub fn new(p: &nn::Path, word_embeddings: Tensor, eps: f64, compute: Kind) -> Self {
        let root = path_at(p, N::NAMES.root);
        let head = TiedLmHead::new(
            &path_at(&root, N::NAMES.dense),
            &path_at(&root, N::NAMES.layer_norm),
            &root,
            word_embeddings,
            eps,
            compute,
        );
        LmHead {
            head,
            names: PhantomData,
        }
    }
}

impl<N> Generator for LmHead<N> {
    fn logits(&self, states: &Encoded, _train: bool) -> Result<Tensor> {
        Ok(self.head.logits(&states.hidden))
    }
}

/// Keys of `[model.generator]` for an LM head plugin.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmHeadSection {
    /// The head's LayerNorm epsilon: the text encoder's `layer_norm_eps`
    /// (default: the head's [`HeadNames::EPS`]).
    #[serde(default)]
    pub layer_norm_eps: Option<f64>,
}

/// The factory of the LM head plugin named as `N` ([`HeadNames::PLUGIN`]):
/// its section, then [`build_lm_head`].
pub fn lm_head<N: HeadNames + 'static>(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let cfg: LmHeadSection = ctx.params()?;
    build_lm_head::<N>(ctx, N::PLUGIN, cfg.layer_norm_eps.unwrap_or(N::EPS))
}

/// The factory of generator `plugin`: a head named as `N` with epsilon
/// `eps` (the section's `layer_norm_eps`), tied to the text encoder's word
/// embeddings.
pub fn build_lm_head<N: HeadNames + 'static>(
    ctx: &BuildContext<'_>,
    plugin: &str,
    eps: f64,
) -> Result<Rc<dyn Generator>> {
    vlmatch_registry::check::positive_f64(&format!("{}.layer_norm_eps", ctx.key), eps)?;
    let emb = ctx
        .text_encoder
        .as_ref()
        .and_then(|e| e.word_embeddings())
        .ok_or_else(|| {
            Error::plugin(
                plugin,
                "the text encoder exposes no word embeddings to tie to",
            )
        })?;
    Ok(Rc::new(LmHead::<N>::new(
        &ctx.path,
        emb,
        eps,
        ctx.env.compute,
    )))
}
