//! BERT text encoder (Devlin et al., NAACL 2019), laid out as HuggingFace
//! `transformers`' `BertModel` (embeddings, post-LN layers), parameter names
//! included, so its checkpoints load by name. In ALBEF's split this is `E_t`:
//! the lower layers, reading the text alone.
//!
//! Registered as encoder `bert`. The vocabulary size comes from the
//! tokenizer, the maximum length from `data.max_len`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::hf::resolve_arch;
use vlmatch_layers::{BertLayer, BertLayerConfig, LayerNorm};
use vlmatch_registry::BuildContext;

mod layout;
pub use layout::BertLayout;

vlmatch_registry::register!(encoder "bert" => build, layout = &BertLayout);

/// Keys of `[model.text]` for `plugin = "bert"`. Architecture keys follow
/// HuggingFace `BertConfig`; with `init = "DIR"` (a hub-layout directory)
/// they come from `DIR/config.json`, and a key set here must agree with it,
/// except `num_hidden_layers`, which may take only the first layers.
/// The weights of `DIR/model.safetensors` are applied by the trainer.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BertSection {
    #[serde(default, skip_serializing)]
    pub init: Option<PathBuf>,
    /// Let `init` leave parameters missing (they keep their random init).
    #[serde(default, skip_serializing)]
    pub allow_partial_init: bool,
    pub hidden_size: Option<i64>,
    pub num_hidden_layers: Option<i64>,
    pub num_attention_heads: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub hidden_dropout_prob: Option<f64>,
    pub attention_probs_dropout_prob: Option<f64>,
    pub layer_norm_eps: Option<f64>,
    pub max_position_embeddings: Option<i64>,
    pub type_vocab_size: Option<i64>,
}

/// A resolved BERT architecture (also read from HuggingFace `config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    #[serde(default)]
    pub hidden_dropout_prob: f64,
    #[serde(default)]
    pub attention_probs_dropout_prob: f64,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "max_pos")]
    pub max_position_embeddings: i64,
    #[serde(default = "type_vocab")]
    pub type_vocab_size: i64,
    /// From `config.json` only; checked against the tokenizer.
    #[serde(default)]
    pub vocab_size: Option<i64>,
    #[serde(default = "gelu")]
    pub hidden_act: String,
}

fn eps() -> f64 {
    1e-12
}
fn max_pos() -> i64 {
    512
}
fn type_vocab() -> i64 {
    2
}
fn gelu() -> String {
    "gelu".into()
}

impl BertSection {
    /// The architecture this section describes (see [`BertSection`]).
    pub fn resolve(&self, key: &str) -> Result<BertConfig> {
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
            "bert",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&BertLayout),
        )?;
        let mut keys = match serde_json::to_value(self).expect("serialisable") {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a struct serialises to an object"),
        };
        // With a checkpoint, fewer layers than it has is ALBEF's split: the
        // first layers are the text encoder, the rest may feed the fusion.
        let layers = if self.init.is_some() {
            keys.remove("num_hidden_layers").and_then(|v| v.as_i64())
        } else {
            None
        };
        let mut cfg: BertConfig = resolve_arch(key, self.init.as_deref(), keys)?;
        if let Some(n) = layers {
            if n > cfg.num_hidden_layers || n < 1 {
                return Err(Error::Config(format!(
                    "config key `{key}.num_hidden_layers` = {n}: the checkpoint has {} layers; \
                     use 1 to {} (the first layers are taken)",
                    cfg.num_hidden_layers, cfg.num_hidden_layers
                )));
            }
            cfg.num_hidden_layers = n;
        }
        cfg.check(key).map_err(|e| match &self.init {
            Some(dir) => Error::Config(format!("{e} (with init {})", dir.display())),
            None => e,
        })?;
        if cfg.hidden_act != "gelu" {
            return Err(Error::plugin(
                "bert",
                format!(
                    "hidden_act `{}` is not supported (only `gelu`)",
                    cfg.hidden_act
                ),
            ));
        }
        Ok(cfg)
    }
}

impl BertConfig {
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
        check::dropout(&k("hidden_dropout_prob"), self.hidden_dropout_prob)?;
        check::dropout(
            &k("attention_probs_dropout_prob"),
            self.attention_probs_dropout_prob,
        )?;
        check::positive_f64(&k("layer_norm_eps"), self.layer_norm_eps)?;
        check::positive(&k("max_position_embeddings"), self.max_position_embeddings)?;
        check::positive(&k("type_vocab_size"), self.type_vocab_size)
    }
}

/// The BERT encoder.
pub struct Bert {
    cfg: BertConfig,
    word_embeddings: Tensor,
    position_embeddings: Tensor,
    token_type_embeddings: Tensor,
    embeddings_ln: LayerNorm,
    layers: Vec<BertLayer>,
}

impl Bert {
    pub fn new(
        p: &nn::Path,
        cfg: &BertConfig,
        vocab_size: i64,
        max_len: i64,
        compute: Kind,
    ) -> Result<Self> {
        if cfg.num_attention_heads <= 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            return Err(Error::plugin(
                "bert",
                format!(
                    "hidden_size {} is not divisible by num_attention_heads {}",
                    cfg.hidden_size, cfg.num_attention_heads
                ),
            ));
        }
        if max_len > cfg.max_position_embeddings {
            return Err(Error::plugin(
                "bert",
                format!(
                    "data.max_len {max_len} exceeds max_position_embeddings {}",
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
        Ok(Bert {
            cfg: cfg.clone(),
            word_embeddings: (&emb / "word_embeddings").var(
                "weight",
                &[vocab_size, h],
                vlmatch_layers::hf_init(),
            ),
            position_embeddings: (&emb / "position_embeddings").var(
                "weight",
                &[cfg.max_position_embeddings, h],
                vlmatch_layers::hf_init(),
            ),
            token_type_embeddings: (&emb / "token_type_embeddings").var(
                "weight",
                &[cfg.type_vocab_size, h],
                vlmatch_layers::hf_init(),
            ),
            embeddings_ln: LayerNorm::new(&(&emb / "LayerNorm"), h, cfg.layer_norm_eps),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| BertLayer::new(&(p / "encoder" / "layer" / i), &layer_cfg))
                .collect(),
        })
    }

    /// `ids`, `mask` `[B, L]` -> `[B, L, H]`.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor, train: bool) -> Tensor {
        let l = ids.size()[1];
        let positions = Tensor::arange(l, (Kind::Int64, ids.device()));
        let xs = ids.embedding(&self.word_embeddings)
            + positions.embedding(&self.position_embeddings).unsqueeze(0)
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

trait EmbeddingExt {
    fn embedding(&self, weight: &Tensor) -> Tensor;
}

impl EmbeddingExt for Tensor {
    fn embedding(&self, weight: &Tensor) -> Tensor {
        Tensor::embedding(weight, self, -1, false, false)
    }
}

impl Encoder for Bert {
    fn modality(&self) -> Modality {
        Modality::Text
    }
    fn hidden_size(&self) -> i64 {
        self.cfg.hidden_size
    }
    fn forward_t(&self, input: EncoderInput<'_>, train: bool) -> Result<Encoded> {
        let _span = tracing::trace_span!("bert").entered();
        let EncoderInput::Text(text) = input else {
            return Err(Error::plugin("bert", "a text encoder takes token ids"));
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
    let section: BertSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    if ctx.env.max_text_len > cfg.max_position_embeddings {
        return Err(vlmatch_registry::check::invalid(
            &format!("{}.max_position_embeddings", ctx.key),
            format!(
                "{} positions cannot hold data.max_len {} tokens; raise it or lower data.max_len",
                cfg.max_position_embeddings, ctx.env.max_text_len
            ),
        ));
    }
    if let Some(v) = cfg.vocab_size.filter(|&v| v != ctx.env.vocab_size) {
        return Err(Error::Config(format!(
            "config key `{}.init`: the checkpoint's vocab_size {v} differs from the tokenizer's {}; \
             set data.vocab to the checkpoint's vocab.txt",
            ctx.key, ctx.env.vocab_size
        )));
    }
    Ok(Rc::new(Bert::new(
        &ctx.path,
        &cfg,
        ctx.env.vocab_size,
        ctx.env.max_text_len,
        ctx.env.compute,
    )?))
}
