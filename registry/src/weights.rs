//! Checkpoint layouts: what an encoder or head plugin registers next to its
//! factory so that the host can start it from a HuggingFace hub-layout
//! directory (`config.json` + `model.safetensors`) and export it back,
//! without knowing the plugin's types.
//!
//! A plugin registers a [`CheckpointLayout`] with
//! `register!(encoder "name" => build, layout = &LAYOUT)`. The layout says
//! which `model_type`s it loads, how a checkpoint's tensor names map onto
//! the plugin's parameters (prefixes, renames, what is new by design), how
//! to describe the checkpoint's architecture as a config section, and how to
//! write `config.json` and the weights for `transformers`. The host
//! (`src/pretrained.rs`, `src/export.rs`) finds the layout through the
//! [`crate::Registry`] by the role's plugin name and does the rest generically:
//! reading tensors, copying them, reporting what was applied, missing, new
//! or unused, writing files.
//!
//! Parameter names a layout deals in are relative to the plugin's path (a
//! text encoder's `embeddings.word_embeddings.weight`, not
//! `text_encoder.embeddings...`); the host adds the role's prefix
//! ([`role_prefix`]).

use serde_json::{Map, Value};
use std::collections::HashMap;
use std::path::Path;
use tch::Tensor;
use vlmatch_core::{Error, Result, SpecialTokens};

mod masked_lm;
pub use masked_lm::{build_masked_lm, plan_masked_lm, MaskedLmPlan};

/// How a plugin's parameters correspond to a HuggingFace checkpoint.
/// Only [`model_types`](Self::model_types) and
/// [`map_name`](Self::map_name) are required; the defaults load nothing new
/// by design, resize nothing, describe a checkpoint as `init = DIR`, and
/// export nothing.
pub trait CheckpointLayout: Sync {
    /// The `config.json` `model_type`s this plugin loads (`["bert"]`). A
    /// checkpoint of another type is an error naming both
    /// ([`check_model_type`]).
    fn model_types(&self) -> &'static [&'static str];

    /// The `transformers` classes (`architectures` in `config.json`) whose
    /// checkpoints this plugin loads, for documentation and messages.
    fn architectures(&self) -> &'static [&'static str] {
        &[]
    }

    /// The parameter (relative to the plugin's path) that the checkpoint
    /// tensor `name` (as stored, prefix included) initialises, or `None`
    /// when the tensor is not this plugin's (another tower, a pooler, a
    /// buffer, a tied copy). A name it maps to a parameter the model lacks
    /// is reported as unused.
    fn map_name(&self, ctx: &LoadContext<'_>, name: &str) -> Option<String>;

    /// Whether `param` (relative to the plugin's path) is new by design when
    /// the checkpoint lacks it (ALBEF's cross-attention in fusion layers
    /// started from BERT layers): reported as new, not as missing.
    fn is_new(&self, _param: &str) -> bool {
        false
    }

    /// A checkpoint tensor for `param` resized to the model's `target`
    /// shape (position embeddings interpolated to another resolution), or
    /// `None` to copy as is.
    fn resize(&self, _param: &str, _tensor: &Tensor, _target: &[i64]) -> Option<Tensor> {
        None
    }

    /// The checkpoint in `dir` as this plugin's config section, for
    /// building the plugin from the directory alone (a frozen fill model),
    /// with what the host needs to know before it builds it. `None`: the
    /// plugin cannot be built from a checkpoint alone (a fusion encoder
    /// that takes only some of a checkpoint's layers). The default: the
    /// section `init = DIR`, the plugin reading `config.json` itself.
    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        let mut section = Map::new();
        section.insert("init".into(), Value::String(dir.display().to_string()));
        Ok(Some(CheckpointArch {
            section,
            max_text_len: None,
            vocab_size: None,
        }))
    }

    /// `config.json`, the tensors and any other JSON files of this plugin
    /// in the hub layout, or `None` when `transformers` has no class for it
    /// (the host then says so).
    fn export(&self, _ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        Ok(None)
    }
}

/// What a layout sees while a checkpoint is mapped onto its plugin.
pub struct LoadContext<'a> {
    /// The plugin's config section key (`model.fusion`).
    pub key: &'a str,
    /// The plugin's section (its own keys, as in the config).
    pub section: &'a Value,
    /// Every parameter of the model, by full name (`text_encoder....`): a
    /// fusion encoder counts the text encoder's layers to know where its own
    /// start in a shared checkpoint.
    pub vars: &'a HashMap<String, Tensor>,
    /// The checkpoint's `config.json` `model_type`, if it has one.
    pub model_type: Option<&'a str>,
}

/// The architecture a checkpoint directory describes, as a layout reads it
/// ([`CheckpointLayout::read_arch`]).
#[derive(Debug, Clone)]
pub struct CheckpointArch {
    /// The plugin's config section that builds this architecture.
    pub section: Map<String, Value>,
    /// Text encoders: the longest input the position table holds.
    pub max_text_len: Option<i64>,
    /// Text encoders: the vocabulary size `config.json` states.
    pub vocab_size: Option<i64>,
}

/// What a layout gets to export its plugin ([`CheckpointLayout::export`]).
pub struct ExportContext<'a> {
    /// The plugin's config section key (`model.text`).
    pub key: &'a str,
    /// The plugin's section (its own keys, as in the run's config).
    pub section: &'a Value,
    /// The plugin's parameters, names relative to its path, on the CPU,
    /// sorted by name.
    pub tensors: &'a [(String, Tensor)],
    /// `data.image_size`, `data.mean`, `data.std`, `data.max_len`.
    pub image_size: i64,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub max_len: i64,
    /// The run's tokenizer: its size and special ids.
    pub vocab_size: i64,
    pub special: SpecialTokens,
}

impl ExportContext<'_> {
    /// The plugin's section as its own config type.
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.section.clone())
            .map_err(|e| Error::Config(format!("config key `{}`: {e}", self.key)))
    }

    /// The tensors with `prefix` put before each name (`vision_model.`).
    pub fn tensors_prefixed(&self, prefix: &str) -> Vec<(String, Tensor)> {
        self.tensors
            .iter()
            .map(|(k, t)| (format!("{prefix}{k}"), t.shallow_clone()))
            .collect()
    }
}

/// The files of one exported plugin; the host writes them to a directory
/// (`config.json`, `model.safetensors`, then each of `files`).
pub struct ExportFiles {
    pub config: Value,
    pub tensors: Vec<(String, Tensor)>,
    /// Other JSON files by name (`preprocessor_config.json`).
    pub files: Vec<(String, Value)>,
}

/// The parameter prefix of a model role: `image` -> `vision_encoder`,
/// `text` -> `text_encoder`, `fusion` -> `fusion`, `generator` ->
/// `generator`.
pub fn role_prefix(role: &str) -> Option<&'static str> {
    match role {
        "image" => Some("vision_encoder"),
        "text" => Some("text_encoder"),
        "fusion" => Some("fusion"),
        "generator" => Some("generator"),
        _ => None,
    }
}

/// `dir/config.json`'s `model_type`; `None` without a readable one.
pub fn model_type(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string))
}

/// With `init`, its `config.json`'s `model_type` must be one that `plugin`
/// loads (`accepted`, its layout's [`CheckpointLayout::model_types`]); one
/// without a `model_type` is let through. The error names both, e.g. a
/// RoBERTa directory given to `bert`.
pub fn check_model_type(
    key: &str,
    plugin: &str,
    init: Option<&Path>,
    accepted: &[&str],
) -> Result<()> {
    let Some(dir) = init else { return Ok(()) };
    match model_type(dir) {
        Some(t) if !accepted.contains(&t.as_str()) => Err(Error::Config(format!(
            "config key `{key}.init`: {} holds a `{t}` checkpoint (model_type), which \
             plugin `{plugin}` does not load (it loads model_type {}); pick the plugin \
             for `{t}` or another checkpoint",
            dir.display(),
            accepted
                .iter()
                .map(|a| format!("`{a}`"))
                .collect::<Vec<_>>()
                .join(" or ")
        ))),
        _ => Ok(()),
    }
}

/// `name` without the first of `prefixes` it starts with (a model class
/// prefix such as `bert.`), with the LayerNorm names of old checkpoints
/// (`gamma`, `beta`) updated to `weight`, `bias`.
pub fn hub_name(name: &str, prefixes: &[&str]) -> String {
    let name = prefixes
        .iter()
        .find_map(|p| name.strip_prefix(p))
        .unwrap_or(name);
    if let Some(stem) = name.strip_suffix(".gamma") {
        format!("{stem}.weight")
    } else if let Some(stem) = name.strip_suffix(".beta") {
        format!("{stem}.bias")
    } else {
        name.to_string()
    }
}

/// `encoder.layer.N.rest` -> `(N, rest)`.
pub fn layer_index<'n>(name: &'n str, stem: &str) -> Option<(i64, &'n str)> {
    let (idx, rest) = name.strip_prefix(stem)?.split_once('.')?;
    Some((idx.parse().ok()?, rest))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_names_lose_the_class_prefix_and_old_layer_norm_names() {
        let p = ["bert.", "roberta."];
        assert_eq!(
            hub_name("bert.encoder.layer.0.output.LayerNorm.gamma", &p),
            "encoder.layer.0.output.LayerNorm.weight"
        );
        assert_eq!(
            hub_name("roberta.embeddings.LayerNorm.beta", &p),
            "embeddings.LayerNorm.bias"
        );
        // Only a leading prefix, only the listed ones.
        assert_eq!(
            hub_name("vit.embeddings.cls_token", &p),
            "vit.embeddings.cls_token"
        );
        assert_eq!(hub_name("cls.predictions.bias", &p), "cls.predictions.bias");
    }

    #[test]
    fn layer_index_splits_the_block_number() {
        assert_eq!(
            layer_index(
                "encoder.layer.11.attention.self.query.weight",
                "encoder.layer."
            ),
            Some((11, "attention.self.query.weight"))
        );
        assert_eq!(layer_index("encoder.layer.x.a", "encoder.layer."), None);
        assert_eq!(
            layer_index("embeddings.word_embeddings.weight", "encoder.layer."),
            None
        );
    }

    #[test]
    fn a_checkpoint_of_another_model_type_is_refused_naming_both() {
        let dir = std::env::temp_dir().join(format!("weights-mt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), r#"{"model_type": "roberta"}"#).unwrap();
        let e = check_model_type("model.text", "bert", Some(&dir), &["bert"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("config key `model.text.init`")
                && e.contains("`roberta` checkpoint")
                && e.contains("plugin `bert`")
                && e.contains("model_type `bert`"),
            "{e}"
        );
        assert!(check_model_type("model.text", "roberta", Some(&dir), &["roberta"]).is_ok());
        // Without a model_type (or without init) nothing is refused.
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        assert!(check_model_type("model.text", "bert", Some(&dir), &["bert"]).is_ok());
        assert!(check_model_type("model.text", "bert", None, &["bert"]).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
