//! How `bert` maps onto HuggingFace `BertModel` checkpoints and back: its
//! parameter names are the hub's below the optional `bert.` prefix.

use crate::{BertConfig, BertSection};
use serde_json::{json, Map, Value};
use std::path::Path;
use vlmatch_core::Result;
use vlmatch_registry::weights::{
    hub_name, CheckpointArch, CheckpointLayout, ExportContext, ExportFiles, LoadContext,
};

/// The checkpoint layout registered with encoder `bert`.
pub struct BertLayout;

impl CheckpointLayout for BertLayout {
    fn model_types(&self) -> &'static [&'static str] {
        &["bert"]
    }

    fn architectures(&self) -> &'static [&'static str] {
        &["BertModel", "BertForMaskedLM", "BertForPreTraining"]
    }

    /// Everything below `bert.` except the pooler, the heads (`cls.*`, the
    /// generator's) and the position and token-type id buffers.
    fn map_name(&self, _ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let n = hub_name(name, &["bert."]);
        let skip = n.starts_with("cls.")
            || n.starts_with("pooler.")
            || n == "embeddings.position_ids"
            || n == "embeddings.token_type_ids";
        (!skip).then_some(n)
    }

    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let section = BertSection {
            init: Some(dir.to_path_buf()),
            ..Default::default()
        };
        let cfg = section.resolve("fill_model.text")?;
        let mut keys = Map::new();
        keys.insert("init".into(), Value::String(dir.display().to_string()));
        Ok(Some(CheckpointArch {
            section: keys,
            max_text_len: Some(cfg.max_position_embeddings),
            vocab_size: cfg.vocab_size,
        }))
    }

    /// A `BertModel` (`config.json` from the resolved section, weights by
    /// their own names).
    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        let c: BertConfig = ctx.params::<BertSection>()?.resolve(ctx.key)?;
        let config = json!({
            "model_type": "bert",
            "architectures": ["BertModel"],
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
            "pad_token_id": ctx.special.pad,
            "initializer_range": 0.02,
        });
        Ok(Some(ExportFiles {
            config,
            tensors: ctx.tensors_prefixed(""),
            files: vec![],
        }))
    }
}
