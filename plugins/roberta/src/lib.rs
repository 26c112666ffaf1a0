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

use vlmatch_core::Result;
use vlmatch_layers::arch::LayerKeys;
use vlmatch_layers::bert::{text_encoder, PositionIds, TextArch, TextEncoder};
use vlmatch_layers::hf::Resolve;
use vlmatch_layers::lm_head::{lm_head, LmHead, RobertaHead};
use vlmatch_registry::check;

mod layout;
pub use layout::{ROBERTA_LAYOUT, ROBERTA_LM_HEAD_LAYOUT};

vlmatch_registry::register!(encoder "roberta" => text_encoder::<RobertaSection>, layout = &ROBERTA_LAYOUT);
vlmatch_registry::register!(generator "roberta_lm_head" => lm_head::<RobertaHead>, layout = &ROBERTA_LM_HEAD_LAYOUT);

vlmatch_layers::hf_arch! {
    /// Keys of `[model.text]` for `plugin = "roberta"`. Architecture keys
    /// follow HuggingFace `RobertaConfig`; with `init = "DIR"` (a hub-layout
    /// `RobertaModel` or `RobertaForMaskedLM` directory) they come from
    /// `DIR/config.json`, and a key set here must agree with it, except
    /// `num_hidden_layers`, which may take only the first layers. The weights
    /// of `DIR/model.safetensors` are applied by the trainer, and its
    /// `tokenizer.json` is the run's tokenizer unless `data.vocab` is set.
    pub struct RobertaSection: init {}
    // With a checkpoint, fewer layers than it has takes the first ones.
    resolve = Resolve::new("roberta", &ROBERTA_LAYOUT).first_layers();
    /// A resolved RoBERTa architecture (also read from `config.json`).
    /// Defaults are `RobertaConfig`'s (`roberta-base`'s own `config.json` sets
    /// 514 positions, one token type and `layer_norm_eps` 1e-5).
    pub struct RobertaConfig {
        layer_sizes(768, 12, 12, 3072),
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

impl RobertaConfig {
    /// The layer sizes ([`LayerKeys::check`]), room for the padding
    /// index, GELU and absolute positions; errors name `{key}.<field>`.
    pub fn check(&self, key: &str) -> Result<()> {
        let k = |field: &str| format!("{key}.{field}");
        LayerKeys::of(self).check(key, &[("type_vocab_size", self.type_vocab_size)])?;
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
        self.positions().max_len(self.max_position_embeddings)
    }
}

/// The RoBERTa encoder: a [`TextEncoder`] whose positions start past the
/// padding index.
pub type Roberta = TextEncoder;

impl TextArch for RobertaConfig {
    const PLUGIN: &'static str = "roberta";
    const VOCAB_FILE: &'static str = "tokenizer.json";
    const SPAN: fn() -> tracing::Span = || tracing::trace_span!("roberta");
    fn positions(&self) -> PositionIds {
        PositionIds::PaddingOffset {
            padding_idx: self.pad_token_id,
        }
    }
}

/// `RobertaForMaskedLM`'s `lm_head`: dense + GELU + `layer_norm`, then a
/// decoder whose weight is the text encoder's word embeddings (tied, as
/// `lm_head.decoder.weight` is in the checkpoint) plus `lm_head.bias`. Its
/// section is an [`LmHeadSection`](vlmatch_layers::lm_head::LmHeadSection)
/// whose `layer_norm_eps` is the text encoder's (`roberta-base`: 1e-5, the
/// default).
pub type RobertaLmHead = LmHead<RobertaHead>;
