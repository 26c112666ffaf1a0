//! How `roberta` and `roberta_lm_head` map onto HuggingFace `RobertaModel`
//! and `RobertaForMaskedLM` checkpoints and back: the encoder's parameter
//! names are the hub's below the optional `roberta.` prefix, the head's are
//! `lm_head.*`.

use crate::{RobertaConfig, RobertaSection};
use serde_json::{json, Map, Value};
use std::path::Path;
use vlmatch_core::Result;
use vlmatch_registry::weights::{
    hub_name, CheckpointArch, CheckpointLayout, ExportContext, ExportFiles, LoadContext,
};

/// The checkpoint layout registered with encoder `roberta`.
pub struct RobertaLayout;

impl CheckpointLayout for RobertaLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["roberta"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["RobertaModel", "RobertaForMaskedLM"]
    }

    /// Everything below `roberta.` except the pooler, the LM head (the
    /// generator's) and the id buffers.
    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let n = hub_name(name, &["roberta."]);
        let skip = n.starts_with("lm_head.")
            || n.starts_with("pooler.")
            || n == "embeddings.position_ids"
            || n == "embeddings.token_type_ids";
        (!skip).then_some(n)
    }

    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let section = RobertaSection {
            init: Some(dir.to_path_buf()),
            ..Default::default()
        };
        let cfg = section.resolve("fill_model.text")?;
        let mut keys = Map::new();
        keys.insert("init".into(), Value::String(dir.display().to_string()));
        Ok(Some(CheckpointArch {
            section: keys,
            max_text_len: Some(cfg.max_len()),
            vocab_size: cfg.vocab_size,
        }))
    }

    /// A `RobertaModel` (`config.json` from the resolved section, weights
    /// by their own names).
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let c: RobertaConfig = ctx.params::<RobertaSection>()?.resolve(ctx.key)?;
        let config = json!({
            "model_type": "roberta",
            "architectures": ["RobertaModel"],
            "vocab_size": ctx.vocab_size,
            "hidden_size": c.hidden_size,
            "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads,
            "intermediate_size": c.intermediate_size,
            "hidden_act": c.hidden_act,
            "hidden_dropout_prob": c.hidden_dropout_prob,
            "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
            "layer_norm_eps": c.layer_norm_eps,
            "max_position_embeddings": c.max_position_embeddings,
            "type_vocab_size": c.type_vocab_size,
            "position_embedding_type": c.position_embedding_type,
            "pad_token_id": c.pad_token_id,
            "bos_token_id": ctx.special.cls,
            "eos_token_id": ctx.special.sep,
            "initializer_range": 0.02,
        });
        Ok(Some(ExportFiles {
            config,
            tensors: ctx.tensors_prefixed(""),
            files: vec![],
        }))
    }
}

/// The checkpoint layout registered with generator `roberta_lm_head`: a
/// `RobertaForMaskedLM`'s `lm_head.*` under the same names (the decoder
/// weight is the tied word-embedding matrix and is not loaded; its bias is
/// `lm_head.bias`).
pub struct RobertaLmHeadLayout;

impl CheckpointLayout for RobertaLmHeadLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["roberta"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["RobertaForMaskedLM"]
    }

    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let tail = name.strip_prefix("lm_head.")?;
        (tail != "decoder.weight" && tail != "decoder.bias").then(|| name.to_string())
    }

    /// The head's epsilon is the checkpoint's `layer_norm_eps`.
    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let section = RobertaSection {
            init: Some(dir.to_path_buf()),
            ..Default::default()
        };
        let cfg = section.resolve("fill_model.text")?;
        let mut keys = Map::new();
        keys.insert("layer_norm_eps".into(), cfg.layer_norm_eps.into());
        Ok(Some(CheckpointArch {
            section: keys,
            max_text_len: None,
            vocab_size: None,
        }))
    }
}
