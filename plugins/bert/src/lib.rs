//! BERT text encoder (Devlin et al., NAACL 2019), laid out as HuggingFace
//! `transformers`' `BertModel` (embeddings, post-LN layers), parameter names
//! included, so its checkpoints load by name. In ALBEF's split this is `E_t`:
//! the lower layers, reading the text alone.
//!
//! Registered as encoder `bert`. The vocabulary size comes from the
//! tokenizer, the maximum length from `data.max_len`.

use std::path::PathBuf;
use std::rc::Rc;
use tch::{nn, Kind, Tensor};
use vlmatch_core::{Encoded, Encoder, EncoderInput, Error, Modality, Result};
use vlmatch_layers::hf::ArchSource;
use vlmatch_layers::{BertLayer, BertLayerConfig, LayerNorm};
use vlmatch_registry::{check, BuildContext};

mod layout;
pub use layout::BertLayout;

vlmatch_registry::register!(encoder "bert" => build, layout = &BertLayout);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.text]` for `plugin = "bert"`. Architecture keys follow
    /// HuggingFace `BertConfig`; with `init = "DIR"` (a hub-layout directory)
    /// they come from `DIR/config.json`, and a key set here must agree with it,
    /// except `num_hidden_layers`, which may take only the first layers.
    /// The weights of `DIR/model.safetensors` are applied by the trainer.
    pub struct BertSection {
        #[serde(default, skip_serializing)]
        pub init: Option<PathBuf>,
        /// Let `init` leave parameters missing (they keep their random init).
        #[serde(default, skip_serializing)]
        pub allow_partial_init: bool,
    }
    /// A resolved BERT architecture (also read from HuggingFace `config.json`).
    pub struct BertConfig {
        pub hidden_size: i64,
        pub num_hidden_layers: i64,
        pub num_attention_heads: i64,
        pub intermediate_size: i64,
        pub hidden_dropout_prob: f64 = 0.0,
        pub attention_probs_dropout_prob: f64 = 0.0,
        pub layer_norm_eps: f64 = 1e-12,
        pub max_position_embeddings: i64 = 512,
        pub type_vocab_size: i64 = 2,
    }
    from_checkpoint {
        /// Checked against the tokenizer.
        pub vocab_size: Option<i64> = None,
        pub hidden_act: String = "gelu",
    }
}

impl BertSection {
    /// The architecture this section describes (see [`BertSection`]).
    pub fn resolve(&self, key: &str) -> Result<BertConfig> {
        vlmatch_registry::weights::check_model_type(
            key,
            "bert",
            self.init.as_deref(),
            vlmatch_registry::weights::CheckpointLayout::model_types(&BertLayout),
        )?;
        // With a checkpoint, fewer layers than it has is ALBEF's split: the
        // first layers are the text encoder, the rest may feed the fusion.
        let source = ArchSource {
            init: self.init.as_deref(),
            nested: None,
            take_first_layers: true,
        };
        let cfg = self.resolve_arch(key, source)?;
        check::with_init(cfg.check(key), self.init.as_deref())?;
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
    /// The layer sizes ([`check::layer_sizes`]) and a positive number of
    /// positions and token types; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        check::layer_sizes(key, &self.layer_sizes())?;
        check::positive(
            &format!("{key}.max_position_embeddings"),
            self.max_position_embeddings,
        )?;
        check::positive(&format!("{key}.type_vocab_size"), self.type_vocab_size)
    }

    fn layer_sizes(&self) -> check::LayerSizes {
        check::LayerSizes {
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
        }
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
        cfg.check("bert")?;
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
