//! BERT text encoder (Devlin et al., NAACL 2019), laid out as HuggingFace
//! `transformers`' `BertModel` (embeddings, post-LN layers), parameter names
//! included, so its checkpoints load by name. In ALBEF's split this is `E_t`:
//! the lower layers, reading the text alone.
//!
//! Registered as encoder `bert`. The vocabulary size comes from the
//! tokenizer, the maximum length from `data.max_len`.

use vlmatch_core::Result;
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::bert::{text_encoder, TextArch, TextEncoder};
use vlmatch_layers::hf::Resolve;

mod layout;
pub use layout::BERT_LAYOUT;

vlmatch_registry::register!(encoder "bert" => text_encoder::<BertSection>, layout = &BERT_LAYOUT);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.text]` for `plugin = "bert"`. Architecture keys follow
    /// HuggingFace `BertConfig`; with `init = "DIR"` (a hub-layout directory)
    /// they come from `DIR/config.json`, and a key set here must agree with it,
    /// except `num_hidden_layers`, which may take only the first layers.
    /// The weights of `DIR/model.safetensors` are applied by the trainer.
    pub struct BertSection: init {}
    // With a checkpoint, fewer layers than it has is ALBEF's split: the
    // first layers are the text encoder, the rest may feed the fusion.
    resolve = Resolve::new("bert", &BERT_LAYOUT).first_layers().only_gelu();
    /// A resolved BERT architecture (also read from HuggingFace `config.json`).
    pub struct BertConfig {
        layer_sizes,
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

impl BertConfig {
    /// The layer sizes ([`LayerKeys::check`]) and a positive number of
    /// positions and token types; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        let positive = [
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ];
        LayerKeys::of(self).check(key, &positive)
    }
}

/// The BERT encoder: a [`TextEncoder`] with absolute positions.
pub type Bert = TextEncoder;

impl TextArch for BertConfig {
    const PLUGIN: &'static str = "bert";
    const VOCAB_FILE: &'static str = "vocab.txt";
    const SPAN: fn() -> tracing::Span = || tracing::trace_span!("bert");
}
