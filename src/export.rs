//! `vlmatch export`: a trained run's image and text encoders in the
//! HuggingFace hub layout, so `transformers` loads them
//! (`ViTModel.from_pretrained(OUT/image)`, `BertModel.from_pretrained(OUT/text)`,
//! `BertTokenizer.from_pretrained(OUT/text)`).
//!
//! vlmatch's ViT and BERT plugins use the hub's parameter names below their
//! role prefixes (`vision_encoder.`, `text_encoder.`), so export strips the
//! prefix and writes `config.json` from the resolved plugin config. The
//! fusion encoder and heads have no `transformers` class and are not
//! exported (they stay in the run's checkpoint). Files are written to a
//! temporary directory and renamed into place.

use crate::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};
use vlmatch_core::{Error, Result};
use vlmatch_registry::LoadedConfig;

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub image: Option<PathBuf>,
    pub text: Option<PathBuf>,
    /// Roles not exported, and why.
    pub skipped: Vec<String>,
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

/// Write `files` into `dir` through a temporary sibling directory.
fn write_dir(dir: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = dir.with_extension("partial");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    write(&tmp)?;
    let _ = std::fs::remove_dir_all(dir);
    std::fs::rename(&tmp, dir).map_err(|e| Error::io(dir, e))
}

fn plugin_of(loaded: &LoadedConfig, role: &str) -> String {
    loaded
        .figment
        .extract_inner::<String>(&format!("model.{role}.plugin"))
        .unwrap_or_default()
}

pub fn export(
    loaded: &LoadedConfig,
    tok: &Tokenizer,
    vs: &tch::nn::VarStore,
    out: &Path,
) -> Result<Exported> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let mut done = Exported {
        image: None,
        text: None,
        skipped: vec![
            "fusion and heads: no transformers class (kept in the run's checkpoint)".into(),
        ],
    };
    let data = &loaded.config.data;

    match plugin_of(loaded, "image").as_str() {
        "vit" => {
            let sec: vit::VitSection = loaded.section("model.image")?;
            let c = sec.resolve("model.image")?;
            let config = json!({
                "model_type": "vit",
                "architectures": ["ViTModel"],
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "hidden_act": "gelu",
                "hidden_dropout_prob": c.hidden_dropout_prob,
                "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
                "layer_norm_eps": c.layer_norm_eps,
                "image_size": data.image_size,
                "patch_size": c.patch_size,
                "num_channels": 3,
                "qkv_bias": c.qkv_bias,
                "initializer_range": 0.02,
                "image_mean": data.mean,
                "image_std": data.std,
            });
            let tensors = tensors_under(vs, "vision_encoder.");
            let dir = out.join("image");
            write_dir(&dir, |tmp| {
                write_json(&tmp.join("config.json"), &config)?;
                write_json(
                    &tmp.join("preprocessor_config.json"),
                    &json!({
                        "image_processor_type": "ViTImageProcessor",
                        "do_resize": true,
                        "size": {"height": data.image_size, "width": data.image_size},
                        "resample": 3,
                        "do_rescale": true,
                        "rescale_factor": 1.0 / 255.0,
                        "do_normalize": true,
                        "image_mean": data.mean,
                        "image_std": data.std,
                    }),
                )?;
                Tensor::write_safetensors(&tensors, tmp.join("model.safetensors"))?;
                Ok(())
            })?;
            done.image = Some(dir);
        }
        other => done.skipped.push(format!(
            "image encoder `{other}`: only `vit` has a transformers layout"
        )),
    }

    match plugin_of(loaded, "text").as_str() {
        "bert" => {
            let sec: bert::BertSection = loaded.section("model.text")?;
            let c = sec.resolve("model.text")?;
            let config = json!({
                "model_type": "bert",
                "architectures": ["BertModel"],
                "vocab_size": tok.vocab_size(),
                "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "intermediate_size": c.intermediate_size,
                "hidden_act": "gelu",
                "hidden_dropout_prob": c.hidden_dropout_prob,
                "attention_probs_dropout_prob": c.attention_probs_dropout_prob,
                "layer_norm_eps": c.layer_norm_eps,
                "max_position_embeddings": c.max_position_embeddings,
                "type_vocab_size": c.type_vocab_size,
                "pad_token_id": tok.special.pad,
                "initializer_range": 0.02,
            });
            let tensors = tensors_under(vs, "text_encoder.");
            let vocab: String = (0..tok.vocab_size())
                .map(|i| format!("{}\n", tok.token(i)))
                .collect();
            let dir = out.join("text");
            write_dir(&dir, |tmp| {
                write_json(&tmp.join("config.json"), &config)?;
                let vocab_path = tmp.join("vocab.txt");
                std::fs::write(&vocab_path, &vocab).map_err(|e| Error::io(&vocab_path, e))?;
                // A run that started from a tokenizer.json exports that
                // tokenizer itself (BPE vocabularies have no vocab.txt form).
                if let Some(hf) = tok.hf() {
                    let path = tmp.join("tokenizer.json");
                    hf.save(&path, true).map_err(|e| Error::Data {
                        path: path.clone(),
                        line: None,
                        message: format!("cannot write the tokenizer: {e}"),
                    })?;
                }
                write_json(
                    &tmp.join("tokenizer_config.json"),
                    &json!({
                        "tokenizer_class": if tok.hf().is_some() { "PreTrainedTokenizerFast" } else { "BertTokenizer" },
                        "do_lower_case": data.lowercase,
                        "model_max_length": data.max_len,
                        "unk_token": tok.token(tok.special.unk), "sep_token": tok.token(tok.special.sep),
                        "pad_token": tok.token(tok.special.pad), "cls_token": tok.token(tok.special.cls),
                        "mask_token": tok.token(tok.special.mask),
                    }),
                )?;
                Tensor::write_safetensors(&tensors, tmp.join("model.safetensors"))?;
                Ok(())
            })?;
            done.text = Some(dir);
        }
        other => done.skipped.push(format!(
            "text encoder `{other}`: only `bert` has a transformers layout"
        )),
    }
    Ok(done)
}
