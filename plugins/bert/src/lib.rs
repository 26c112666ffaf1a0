//! BERT text encoder (Devlin et al., NAACL 2019), laid out as HuggingFace
//! `transformers`' `BertModel` (embeddings, post-LN layers), parameter names
//! included, so its checkpoints load by name. In ALBEF's split this is `E_t`:
//! the lower layers, reading the text alone.
//!
//! Registered as encoder `bert`. The vocabulary size comes from the
//! tokenizer, the maximum length from `data.max_len`.

use std::path::PathBuf;
use std::rc::Rc;
use vlmatch_core::{Encoder, Error, Result};
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::bert::{build_text, PositionIds, TextArch, TextEncoder};
use vlmatch_layers::hf::ArchSource;
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
    /// The layer sizes ([`LayerKeys::check`]) and a positive number of
    /// positions and token types; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        LayerKeys::of(self).check(key)?;
        check::positive(
            &format!("{key}.max_position_embeddings"),
            self.max_position_embeddings,
        )?;
        check::positive(&format!("{key}.type_vocab_size"), self.type_vocab_size)
    }
}

/// The BERT encoder: a [`TextEncoder`] with absolute positions.
pub type Bert = TextEncoder;

impl TextArch for BertConfig {
    const PLUGIN: &'static str = "bert";
    const VOCAB_FILE: &'static str = "vocab.txt";
    fn span() -> tracing::Span {
        tracing::trace_span!("bert")
    }
    fn check(&self, key: &str) -> Result<()> {
        BertConfig::check(self, key)
    }
    fn positions(&self) -> PositionIds {
        PositionIds::Absolute
    }
    fn vocab_size(&self) -> Option<i64> {
        self.vocab_size
    }
}

fn build(ctx: &BuildContext<'_>) -> Result<Rc<dyn Encoder>> {
    let section: BertSection = ctx.params()?;
    let cfg = section.resolve(&ctx.key)?;
    build_text(ctx, &cfg, section.init.as_deref())
}
