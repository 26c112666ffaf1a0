//! RoBERTa text encoder (Liu et al., "RoBERTa: A Robustly Optimized BERT
//! Pretraining Approach", 2019), laid out as HuggingFace `transformers`'
//! `RobertaModel`, and its masked-LM head (`RobertaForMaskedLM`'s
//! `lm_head`). Parameter names match HuggingFace's below the `roberta.`
//! prefix, so checkpoints load by name.
//!
//! The layers are BERT's (post-LN, GELU); what differs is the embeddings:
//! position ids start past the padding index (`pad_token_id + 1 +` the
//! count of real tokens so far; padding itself sits at `pad_token_id`), and
//! there is one token type. Its tokenizer is the checkpoint's byte-level BPE
//! `tokenizer.json` (`<s>`, `</s>`, `<pad>`, `<mask>`), which the host reads.
//!
//! Registered as encoder `roberta` and generator `roberta_lm_head`.

use serde::Deserialize;
use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Generator, Modality, Result};
use vlmatch_layers::hf::ArchSource;
use vlmatch_layers::{hf_init, BertLayer, BertLayerConfig, LayerNorm, TiedLmHead};
use vlmatch_registry::{check, BuildContext};

mod layout;
pub use layout::{RobertaLayout, RobertaLmHeadLayout};

vlmatch_registry::register!(encoder "roberta" => build, layout = &RobertaLayout);
vlmatch_registry::register!(generator "roberta_lm_head" => build_head, layout = &RobertaLmHeadLayout);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.text]` for `plugin = "roberta"`. Architecture keys
    /// follow HuggingFace `RobertaConfig`; with `init = "DIR"` (a hub-layout
    /// `RobertaModel` or `RobertaForMaskedLM` directory) they come from
    /// `DIR/config.json`, and a key set here must agree with it, except
    /// `num_hidden_layers`, which may take only the first layers. The weights
    /// of `DIR/model.safetensors` are applied by the trainer, and its
    /// `tokenizer.json` is the run's tokenizer unless `data.vocab` is set.
    pub struct RobertaSection {
        #[serde(default, skip_serializing)]
        pub init: Option<PathBuf>,
        /// Let `init` leave parameters missing (they keep their random init).
        #[serde(default, skip_serializing)]
        pub allow_partial_init: bool,
    }
    /// A resolved RoBERTa architecture (also read from `config.json`).
    /// Defaults are `RobertaConfig`'s (`roberta-base`'s own `config.json` sets
    /// 514 positions, one token type and `layer_norm_eps` 1e-5).
    pub struct RobertaConfig {
        pub hidden_size: i64 = 768,
        pub num_hidden_layers: i64 = 12,
        pub num_attention_heads: i64 = 12,
        pub intermediate_size: i64 = 3072,
        pub hidden_dropout_prob: f64 = 0.1,
        pub attention_probs_dropout_prob: f64 = 0.1,
        pub layer_norm_eps: f64 = 1e-12,
        pub max_position_embeddings: i64 = 512,
        pub type_vocab_size: i64 = 2,
        pub pad_token_id: i64 = 1,
    }
    from_checkpoint {
        /// Checked against the tokenizer.
        pub vocab_size: Option<i64> = None,
        pub hidden_act: String = "gelu",
        pub position_embedding_type: String = "absolute",
    }
}

impl RobertaSection {
    /// The architecture this section describes (see [`RobertaSection`]).
    pub fn resolve(&self, key: &str) -> Result<RobertaConfig> {
        vlmatch_registry::weights::check_model_type(
            key,
            "roberta",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&RobertaLayout),
        )?;
        // With a checkpoint, fewer layers than it has takes the first ones.
        let source = ArchSource {
            init: self.init.as_deref(),
            nested: None,
            take_first_layers: true,
        };
        let cfg = self.resolve_arch(key, source)?;
        check::with_init(cfg.check(key), self.init.as_deref())?;
        Ok(cfg)
    }
}

impl RobertaConfig {
    /// The layer sizes ([`check::layer_sizes`]), room for the padding
    /// index, GELU and absolute positions; errors name `{key}.<field>`.
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
                dropouts: vec![
                    ("hidden_dropout_prob", self.hidden_dropout_prob),
                    (
                        "attention_probs_dropout_prob",
                        self.attention_probs_dropout_prob,
                    ),
                ],
            },
        )?;
        check::positive(&k("type_vocab_size"), self.type_vocab_size)?;
        check::at_least(&k("pad_token_id"), self.pad_token_id, 0)?;
        if self.max_position_embeddings < self.pad_token_id + 2 {
            return Err(check::invalid(
                &k("max_position_embeddings"),
                format!(
                    "{} leaves no position past pad_token_id {}",
                    self.max_position_embeddings, self.pad_token_id
                ),
            ));
        }
        if self.hidden_act != "gelu" {
            return Err(check::invalid(
                &k("hidden_act"),
                format!("`{}` is not supported (only `gelu`)", self.hidden_act),
            ));
        }
        if self.position_embedding_type != "absolute" {
            return Err(check::invalid(
                &k("position_embedding_type"),
                format!(
                    "`{}` is not supported (only `absolute`)",
                    self.position_embedding_type
                ),
            ));
        }
        Ok(())
    }

    /// The longest text the position table holds: positions run from
    /// `pad_token_id + 1`.
    pub fn max_len(&self) -> i64 {
        self.max_position_embeddings - self.pad_token_id - 1
    }
}

/// The RoBERTa encoder.
pub struct Roberta {
    cfg: RobertaConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_ln: LayerNorm,
    layers: Vec<BertLayer>,
}

impl Roberta {
    /// Build under `p` (`embeddings.*`, `encoder.layer.N.*`).
    pub fn new(
        p: &nn::Path,
        cfg: &RobertaConfig,
        vocab_size: i64,
        max_len: i64,
        compute: Kind,
    ) -> Result<Self> {
        cfg.check("roberta")?;
        if max_len > cfg.max_len() {
            return Err(Error::plugin(
                "roberta",
                format!(
                    "data.max_len {max_len} exceeds the {} positions past pad_token_id {} \
                     that max_position_embeddings {} leaves",
                    cfg.max_len(),
                    cfg.pad_token_id,
                    cfg.max_position_embeddings
                ),
            ));
        }
        let h = cfg.hidden_size;
        let emb = p / "embeddings";
        let layer_cfg = BertLayerConfig {
            hidden: h,
            heads: cfg.num_attention_heads,
            intermediate: cfg.intermediate_size,
            hidden_dropout: cfg.hidden_dropout_prob,
            attention_dropout: cfg.attention_probs_dropout_prob,
            layer_norm_eps: cfg.layer_norm_eps,
            cross_width: None,
            compute,
        };
        Ok(Roberta {
            cfg: cfg.clone(),
            word_embeddings: (&emb / "word_embeddings").var("weight", &[vocab_size, h], hf_init()),
            position_embeddings: (&emb / "position_embeddings").var(
                "weight",
                &[cfg.max_position_embeddings, h],
                hf_init(),
            ),
            token_type_embeddings: (&emb / "token_type_embeddings").var(
                "weight",
                &[cfg.type_vocab_size, h],
                hf_init(),
            ),
            embeddings_ln: LayerNorm::new(&(&emb / "LayerNorm"), h, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::new(&(p / "encoder" / "layer" / i), &layer_cfg))
                .collect(),
        })
    }

    /// Position ids `[B, L]`: `pad_token_id + cumsum(mask) * mask`, that is
    /// `pad_token_id + 1, + 2, ...` over real tokens and `pad_token_id` on
    /// padding (`transformers`' `create_position_ids_from_input_ids`, with
    /// the attention mask for "not padding").
    pub fn position_ids(&self, mask: &Tensor) -> Tensor {
        let mask = mask.to_kind(Kind::Int64);
        mask.cumsum(1, Kind::Int64) * &mask + self.cfg.pad_token_id
    }

    /// `ids`, `mask` `[B, L]` -> `[B, L, H]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let embed = |w: &Tensor, i: &Tensor| Tensor::embedding(w, i, -1, false, false);
        let xs = embed(&self.word_embeddings, ids)
            + embed(&self.position_embeddings, &self.position_ids(mask))
            + self.token_type_embeddings.get(0);
        let mut xs = self
            .embeddings_ln
            .forward(&xs)
            .dropout(self.cfg.hidden_dropout_prob, train);
        for layer in &self.layers {
            xs = layer.forward(&xs, mask, None, train);
        }
        xs
    }
}

impl Encoder for Roberta {
    fn modality(&self) -> Modality {
        Modality::Text
    }
    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("roberta").entered();
        let EncoderInput::Text(text) = input else {
            return Err(Error::plugin("roberta", "a text encoder takes token ids"));
        };
        Ok(Encoded {
            hidden: self.forward(&text.ids, &text.mask, train),
            mask: text.mask.shallow_clone(),
        })
    }
    fn word_embeddings(&self) -> Option<Tensor> {
        Some(self.word_embeddings.shallow_clone())
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: RobertaSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    if ctx.env.max_text_len > cfg.max_len() {
        return Err(vlmatch_registry::check::invalid(
            &format!("{}.max_position_embeddings", ctx.key),
            format!(
                "{} positions past pad_token_id {} cannot hold data.max_len {} tokens; \
                 raise it or lower data.max_len",
                cfg.max_position_embeddings, cfg.pad_token_id, ctx.env.max_text_len
            ),
        ));
    }
    if let Some(v) = cfg.vocab_size.filter(|&v| v != ctx.env.vocab_size) {
        return Err(Error::Config(format!(
            "config key `{}.init`: the checkpoint's vocab_size {v} differs from the tokenizer's {}; \
             set data.vocab to the checkpoint's tokenizer.json",
            ctx.key, ctx.env.vocab_size
        )));
    }
    if section.init.is_some() && ctx.env.special.pad != cfg.pad_token_id {
        return Err(Error::Config(format!(
            "config key `{}.init`: the checkpoint's pad_token_id {} differs from the \
             tokenizer's pad id {}; set data.vocab to the checkpoint's tokenizer.json",
            ctx.key, cfg.pad_token_id, ctx.env.special.pad
        )));
    }
    Ok(Rc::new(Roberta::new(
        &ctx.path,
        &cfg,
        ctx.env.vocab_size,
        ctx.env.max_text_len,
        ctx.env.compute,
    )?))
}

/// Keys of `[model.generator]` for `plugin = "roberta_lm_head"`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmHeadSection {
    /// The head's LayerNorm epsilon: the text encoder's `layer_norm_eps`
    /// (`roberta-base`: 1e-5, the default).
    #[serde(default = "head_eps")]
    pub layer_norm_eps: f64,
}

fn head_eps() -> f64 {
    1e-5
}

/// `RobertaForMaskedLM`'s `lm_head`: dense + GELU + `layer_norm`, then a
/// decoder whose weight is the text encoder's word embeddings (tied, as
/// `lm_head.decoder.weight` is in the checkpoint) plus `lm_head.bias`.
pub struct RobertaLmHead(TiedLmHead);

impl RobertaLmHead {
    /// Build under `p` (`lm_head.*`); `word_embeddings` `[V, H]` is the
    /// tied decoder weight.
    pub fn new(p: &nn::Path, word_embeddings: Tensor, eps: f64, compute: Kind) -> Self {
        let head = p / "lm_head";
        RobertaLmHead(TiedLmHead::new(
            &(&head / "dense"),
            &(&head / "layer_norm"),
            &head,
            word_embeddings,
            eps,
            compute,
        ))
    }
}

impl Generator for RobertaLmHead {
    fn logits(&self, states: &Encoded, _train: bool) -> Result<Tensor> {
        Ok(self.0.logits(&states.hidden))
    }
}

fn build_head(ctx: &BuildContext<'_>) -> Result<Rc<dyn Generator>> {
    let cfg: LmHeadSection = ctx.params()?;
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
                "roberta_lm_head",
                "the text encoder exposes no word embeddings to tie to",
            )
        })?;
    Ok(Rc::new(RobertaLmHead::new(
        &ctx.path,
        emb,
        cfg.layer_norm_eps,
        ctx.env.compute,
    )))
}
