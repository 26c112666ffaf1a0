//! `vlmatch export`: a trained run's image and text encoders in the
//! HuggingFace hub layout, so `transformers` loads them (for the built-in
//! plugins: `ViTModel` or `CLIPVisionModel` from `OUT/image`, `BertModel` or
//! `RobertaModel` from `OUT/text`, and the tokenizer from `OUT/text`).
//!
//! The host knows no model family: each role's plugin writes its own
//! `config.json` and tensors through the [`CheckpointLayout`] it registered
//! ([`CheckpointLayout::export`]), and the host writes them, plus the run's
//! tokenizer beside the text encoder. A plugin without an export (the
//! fusion encoders, third-party encoders without a `transformers` class)
//! is listed as skipped; heads stay in the run's checkpoint. Files are
//! written to a temporary directory and renamed into place.
//!
//! [`CheckpointLayout`]: vlmatch_registry::weights::CheckpointLayout
//! [`CheckpointLayout::export`]: vlmatch_registry::weights::CheckpointLayout::export

use crate::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};
use vlmatch_core::{Error, Result};
use vlmatch_registry::weights::{role_prefix, ExportContext, ExportFiles};
use vlmatch_registry::{Kind, LoadedConfig};

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub image: Option<PathBuf>,
    pub text: Option<PathBuf>,
    /// Roles not exported, and why.
    pub skipped: Vec<String>,
    /// The checkpoint exported and its step (set by `vlmatch export`).
    pub checkpoint: Option<(PathBuf, i64)>,
}

fn tensors_under(vs: &tch::nn::VarStore, prefix: &str) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix).map(|rest| {
                (
                    rest.to_string(),
                    v.detach().to_device(Device::Cpu).contiguous(),
                )
            })
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(v).expect("json"))
        .map_err(|e| Error::io(path, e))
}

/// The roles exported, each to `OUT/<role>`.
const ROLES: [(&str, &str); 2] = [("image", "image encoder"), ("text", "text encoder")];

pub fn export(
    loaded: &LoadedConfig,
    tok: &Tokenizer,
    vs: &tch::nn::VarStore,
    out: &Path,
) -> Result<Exported> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let registry = crate::libraries::registry(loaded)?;
    let mut done = Exported {
        image: None,
        text: None,
        skipped: vec![
            "fusion and heads: no transformers class (kept in the run's checkpoint)".into(),
        ],
        checkpoint: None,
    };
    let data = &loaded.config.data;
    for (role, what) in ROLES {
        let key = format!("model.{role}");
        let plugin: String = loaded
            .figment
            .extract_inner(&format!("{key}.plugin"))
            .unwrap_or_default();
        let section: Value = loaded.section(&key)?;
        let prefix = format!("{}.", role_prefix(role).expect("a model role"));
        let tensors = tensors_under(vs, &prefix);
        let ctx = ExportContext {
            key: &key,
            section: &section,
            tensors: &tensors,
            image_size: data.image_size,
            mean: data.mean,
            std: data.std,
            max_len: data.max_len,
            vocab_size: tok.vocab_size(),
            special: tok.special,
        };
        let files = match registry.layout(Kind::Encoder, &plugin) {
            Some(layout) => layout.export(&ctx)?,
            None => None,
        };
        let Some(files) = files else {
            done.skipped.push(format!(
                "{what} `{plugin}`: the plugin exports no transformers layout"
            ));
            continue;
        };
        let dir = out.join(role);
        crate::durable::replace_dir(&dir, |tmp| {
            write_files(tmp, &files)?;
            if role == "text" {
                write_tokenizer(tmp, tok, loaded)?;
            }
            Ok(())
        })?;
        match role {
            "image" => done.image = Some(dir),
            _ => done.text = Some(dir),
        }
    }
    Ok(done)
}

/// `config.json`, `model.safetensors` and the plugin's other files.
fn write_files(dir: &Path, files: &ExportFiles) -> Result<()> {
    write_json(&dir.join("config.json"), &files.config)?;
    for (name, value) in &files.files {
        write_json(&dir.join(name), value)?;
    }
    Tensor::write_safetensors(&files.tensors, dir.join("model.safetensors"))?;
    Ok(())
}

/// The run's tokenizer: its `vocab.txt`, the `tokenizer.json` it started
/// from (BPE vocabularies have no `vocab.txt` form), and
/// `tokenizer_config.json`.
fn write_tokenizer(dir: &Path, tok: &Tokenizer, loaded: &LoadedConfig) -> Result<()> {
    let data = &loaded.config.data;
    let vocab: String = (0..tok.vocab_size())
        .map(|i| format!("{}\n", tok.token(i)))
        .collect();
    let vocab_path = dir.join("vocab.txt");
    std::fs::write(&vocab_path, &vocab).map_err(|e| Error::io(&vocab_path, e))?;
    if let Some(hf) = tok.hf() {
        let path = dir.join("tokenizer.json");
        hf.save(&path, true).map_err(|e| Error::Data {
            path: path.clone(),
            line: None,
            message: format!("cannot write the tokenizer: {e}"),
        })?;
    }
    let class = if tok.hf().is_some() {
        "PreTrainedTokenizerFast"
    } else {
        "BertTokenizer"
    };
    write_json(
        &dir.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": class,
            "do_lower_case": data.lowercase,
            "model_max_length": data.max_len,
            "unk_token": tok.token(tok.special.unk), "sep_token": tok.token(tok.special.sep),
            "pad_token": tok.token(tok.special.pad), "cls_token": tok.token(tok.special.cls),
            "mask_token": tok.token(tok.special.mask),
        }),
    )
}
