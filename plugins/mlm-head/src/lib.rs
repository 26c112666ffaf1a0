//! BERT's masked-language-model head (`BertForMaskedLM`'s
//! `cls.predictions`): dense + GELU + LayerNorm, then a decoder whose weights
//! are the text encoder's word embeddings (tied) plus a bias. Parameter names
//! match HuggingFace so a checkpoint's MLM head loads by name.
//!
//! Registered as generator `mlm_head`. It serves MLM (on fused states),
//! VL-RTD's generator (on text-only states) and NegGen's mask filling.

use serde::Deserialize;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Error, Generator, Result};
use vlmatch_layers::TiedLmHead;
use vlmatch_registry::BuildContext;

vlmatch_registry::register!(generator "mlm_head" => build);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlmHeadConfig {
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn eps() -> f64 {
    1e-12
}

pub struct MlmHead(TiedLmHead);

impl MlmHead {
    /// `word_embeddings` `[V, H]`: the tied decoder weight.
    pub fn new(p: &nn::Path, word_embeddings: Tensor, eps: f64, compute: Kind) -> Self {
        let t = p / "cls" / "predictions";
        MlmHead(TiedLmHead::new(
            &(&t / "transform" / "dense"),
            &(&t / "transform" / "LayerNorm"),
            &t,
            word_embeddings,
            eps,
            compute,
        ))
    }
}

impl Generator for MlmHead {
    fn logits(&self, states: &Encoded, _train: bool) -> Result<Tensor> {
        Ok(self.0.logits(&states.hidden))
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let cfg: MlmHeadConfig = ctx.params()?;
    vlmatch_registry::check::positive_f64(
        &format!("{}.layer_norm_eps", ctx.key),
        cfg.layer_norm_eps,
    )?;
    let emb = ctx
        .text_encoder
        .as_ref()
        .and_then(|e| e.word_embeddings())
        .ok_or_else(|| {
            Error::plugin(
                "mlm_head",
                "the text encoder exposes no word embeddings to tie to",
            )
        })?;
    Ok(Rc::new(MlmHead::new(
        &ctx.path,
        emb,
        cfg.layer_norm_eps,
        ctx.env.compute,
    )))
}
