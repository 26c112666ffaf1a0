//! Applying HuggingFace hub-layout checkpoints (`model.safetensors`) to an
//! assembled model, with a report of what was applied, missing, unused and
//! mismatched.
//!
//! Roles and their name tables (checkpoint name, after dropping a `bert.`,
//! `roberta.` or `vit.` prefix and renaming old `LayerNorm.gamma/beta` to `weight/bias`):
//!
//! | config | checkpoint name | model parameter |
//! |---|---|---|
//! | `model.text.init` | `embeddings.*`, `encoder.layer.N.*` (N < text layers) | `text_encoder.*` |
//! | `model.text.init` | `cls.predictions.*` (MLM head) | `generator.cls.predictions.*` |
//! | `model.text.init` | RoBERTa: `lm_head.*` (MLM head) | `generator.lm_head.*` |
//! | `model.fusion.init` | `encoder.layer.N.*`, N >= `init_layer_offset` | `fusion.layer.(N - offset).*` |
//! | `model.image.init` | `embeddings.*`, `encoder.layer.N.*`, `layernorm.*` | `vision_encoder.*` |
//! | `model.image.init` | CLIP: `vision_model.*` (text tower, projections skipped) | `vision_encoder.*` |
//!
//! `cls.predictions.decoder.weight` is the word-embedding matrix the head is
//! tied to, so it is not loaded separately. ALBEF's fusion layers get their
//! self-attention and feed-forward from the upper BERT layers; their
//! `crossattention.*` is new and reported as such, not as missing.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::Tensor;
use vlmatch_core::{Error, Result};

#[derive(Debug, Default)]
pub struct LoadReport {
    pub role: String,
    pub source: PathBuf,
    pub applied: usize,
    /// Parameters of the role that the checkpoint did not provide.
    pub missing: Vec<String>,
    /// New by design (ALBEF's cross-attention), not an error.
    pub new: Vec<String>,
    /// Checkpoint tensors that matched no parameter.
    pub unused: Vec<String>,
    /// `(parameter, model shape, checkpoint shape)`.
    pub mismatched: Vec<(String, Vec<i64>, Vec<i64>)>,
    /// ViT position embeddings resized to the model's resolution.
    pub interpolated: Vec<String>,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} from {}: {} applied, {} missing, {} new, {} unused, {} shape mismatches",
            self.role,
            self.source.display(),
            self.applied,
            self.missing.len(),
            self.new.len(),
            self.unused.len(),
            self.mismatched.len()
        )?;
        let list = |v: &[String]| {
            let shown: Vec<&str> = v.iter().take(6).map(String::as_str).collect();
            let more = v.len().saturating_sub(6);
            format!(
                "{}{}",
                shown.join(", "),
                if more > 0 {
                    format!(", ... {more} more")
                } else {
                    String::new()
                }
            )
        };
        if !self.missing.is_empty() {
            write!(f, "\n  missing: {}", list(&self.missing))?;
        }
        if !self.unused.is_empty() {
            write!(f, "\n  unused: {}", list(&self.unused))?;
        }
        for i in &self.interpolated {
            write!(f, "\n  interpolated (bicubic): {i}")?;
        }
        for (name, ours, theirs) in &self.mismatched {
            write!(
                f,
                "\n  shape mismatch: {name}: model {ours:?}, checkpoint {theirs:?}"
            )?;
        }
        Ok(())
    }
}

/// A checkpoint tensor name without the model-class prefix, with old
/// LayerNorm names updated.
pub fn canonical(name: &str) -> String {
    let name = ["bert.", "roberta.", "vit."]
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

/// A ViT checkpoint's `embeddings.position_embeddings` `[1, 1 + g*g, D]`
/// resized to the model's `[1, 1 + h*h, D]`: the `[CLS]` position kept, the
/// patch grid resized bicubically (`align_corners = false`), as timm and
/// ALBEF do to fine-tune at another resolution. `None` if nothing to do.
/// CLIP's `embeddings.position_embedding.weight` `[1 + g*g, D]` likewise.
pub fn interpolate_position_embeddings(name: &str, t: &Tensor, target: &[i64]) -> Option<Tensor> {
    if name.ends_with("embeddings.position_embedding.weight") && t.dim() == 2 && target.len() == 2 {
        let target = [1, target[0], target[1]];
        return interpolate_position_embeddings(
            "embeddings.position_embeddings",
            &t.unsqueeze(0),
            &target,
        )
        .map(|t| t.squeeze_dim(0));
    }
    if !name.ends_with("embeddings.position_embeddings")
        || t.size() == target
        || t.dim() != 3
        || target.len() != 3
    {
        return None;
    }
    let (n_old, d) = (t.size()[1] - 1, t.size()[2]);
    let n_new = target[1] - 1;
    let side = |n: i64| (1..=n).find(|s| s * s == n);
    let (g, h) = (side(n_old)?, side(n_new)?);
    if target[2] != d || target[0] != 1 || t.size()[0] != 1 {
        return None;
    }
    let cls = t.narrow(1, 0, 1);
    let grid = t
        .narrow(1, 1, n_old)
        .reshape([1, g, g, d])
        .permute([0, 3, 1, 2]);
    let grid = grid
        .to_kind(tch::Kind::Float)
        .upsample_bicubic2d([h, h], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, h * h, d]);
    Some(Tensor::cat(&[cls.to_kind(tch::Kind::Float), grid], 1))
}

/// Read `DIR/model.safetensors` as canonical name -> tensor.
pub fn read_checkpoint(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = dir.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&file).map_err(|e| Error::Data {
        path: file.clone(),
        line: None,
        message: format!("cannot read safetensors: {e}"),
    })?;
    Ok(tensors
        .into_iter()
        .map(|(k, v)| (canonical(&k), v))
        .collect())
}

/// Copy checkpoint tensors into `vars` by `target` (canonical checkpoint
/// name -> model parameter name, `None` to skip). `role_prefix` selects the
/// parameters counted as missing; `is_new` marks those that are new by design.
pub fn apply(
    role: &str,
    source: &Path,
    checkpoint: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    role_prefix: &str,
    target: impl Fn(&str) -> Option<String>,
    is_new: impl Fn(&str) -> bool,
) -> LoadReport {
    let mut report = LoadReport {
        role: role.to_string(),
        source: source.to_path_buf(),
        ..Default::default()
    };
    let mut applied = std::collections::HashSet::new();
    tch::no_grad(|| {
        for (name, t) in checkpoint {
            let Some(local) = target(name) else { continue };
            let Some(var) = vars.get(&local) else {
                report.unused.push(name.clone());
                continue;
            };
            let t = match interpolate_position_embeddings(name, t, &var.size()) {
                Some(resized) => {
                    report
                        .interpolated
                        .push(format!("{name} {:?} -> {:?}", t.size(), var.size()));
                    resized
                }
                None => t.shallow_clone(),
            };
            if var.size() != t.size() {
                report.mismatched.push((local, var.size(), t.size()));
                continue;
            }
            var.shallow_clone()
                .copy_(&t.to_kind(var.kind()).to_device(var.device()));
            applied.insert(local);
        }
    });
    report.applied = applied.len();
    let mut locals: Vec<&String> = vars.keys().filter(|k| k.starts_with(role_prefix)).collect();
    locals.sort();
    for k in locals {
        if !applied.contains(k) && !report.mismatched.iter().any(|m| &m.0 == k) {
            if is_new(k) {
                report.new.push(k.clone());
            } else {
                report.missing.push(k.clone());
            }
        }
    }
    report
}

/// The checkpoint directories a config names, read from the figment.
fn init_dir(cfg: &vlmatch_registry::LoadedConfig, role: &str) -> Option<PathBuf> {
    cfg.figment
        .extract_inner::<PathBuf>(&format!("model.{role}.init"))
        .ok()
}

fn allow_partial(cfg: &vlmatch_registry::LoadedConfig, role: &str) -> bool {
    cfg.figment
        .extract_inner::<bool>(&format!("model.{role}.allow_partial_init"))
        .unwrap_or(false)
}

/// Number of `text_encoder.encoder.layer.N` blocks in `vars`.
fn text_layers(vars: &HashMap<String, Tensor>) -> i64 {
    vars.keys()
        .filter_map(|k| {
            k.strip_prefix("text_encoder.encoder.layer.")?
                .split('.')
                .next()?
                .parse::<i64>()
                .ok()
        })
        .map(|n| n + 1)
        .max()
        .unwrap_or(0)
}

/// Apply every `model.<role>.init` of `cfg` to the model's variables.
/// Missing or mismatched tensors are an error unless the role sets
/// `allow_partial_init = true`.
pub fn apply_inits(
    cfg: &vlmatch_registry::LoadedConfig,
    vars: &HashMap<String, Tensor>,
) -> Result<Vec<LoadReport>> {
    let mut reports = Vec::new();
    if let Some(dir) = init_dir(cfg, "text") {
        let ckpt = read_checkpoint(&dir)?;
        // Upper layers may feed the fusion encoder instead (ALBEF): not unused then.
        let feeds_fusion = init_dir(cfg, "fusion").as_deref() == Some(dir.as_path());
        reports.extend(apply_text(
            &dir,
            &ckpt,
            vars,
            feeds_fusion,
            allow_partial(cfg, "text"),
            false,
        )?);
    }
    if let Some(dir) = init_dir(cfg, "fusion") {
        let ckpt = read_checkpoint(&dir)?;
        let offset = cfg
            .figment
            .extract_inner::<i64>("model.fusion.init_layer_offset")
            .unwrap_or_else(|_| text_layers(vars));
        let r = apply(
            "fusion encoder",
            &dir,
            &ckpt,
            vars,
            "fusion.",
            |n| {
                let rest = n.strip_prefix("encoder.layer.")?;
                let (idx, tail) = rest.split_once('.')?;
                let i = idx.parse::<i64>().ok()? - offset;
                (i >= 0).then(|| format!("fusion.layer.{i}.{tail}"))
            },
            |k| k.contains(".crossattention."),
        );
        check(&r, allow_partial(cfg, "fusion"))?;
        reports.push(r);
    }
    if let Some(dir) = init_dir(cfg, "image") {
        let ckpt = read_checkpoint(&dir)?;
        let r = apply(
            "image encoder",
            &dir,
            &ckpt,
            vars,
            "vision_encoder.",
            |n| {
                // A CLIP checkpoint: its vision tower, not its text tower,
                // projections or temperature.
                let n = n.strip_prefix("vision_model.").unwrap_or(n);
                let skip = [
                    "pooler.",
                    "classifier.",
                    "text_model.",
                    "text_projection",
                    "visual_projection",
                    "logit_scale",
                ];
                (!skip.iter().any(|s| n.starts_with(s)) && n != "embeddings.position_ids")
                    .then(|| format!("vision_encoder.{n}"))
            },
            |_| false,
        );
        check(&r, allow_partial(cfg, "image"))?;
        reports.push(r);
    }
    Ok(reports)
}

/// Apply a BERT checkpoint to `text_encoder.*` and, where the model has
/// one, its MLM head to `generator.cls.predictions.*`. A checkpoint without
/// an MLM head leaves the head new unless `head_required`.
fn apply_text(
    dir: &Path,
    ckpt: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    feeds_fusion: bool,
    allow_partial: bool,
    head_required: bool,
) -> Result<Vec<LoadReport>> {
    let mut r = apply(
        "text encoder",
        dir,
        ckpt,
        vars,
        "text_encoder.",
        |n| {
            let buffer = n == "embeddings.position_ids" || n == "embeddings.token_type_ids";
            let head = n.starts_with("cls.") || n.starts_with("lm_head.");
            (!head && !n.starts_with("pooler.") && !buffer).then(|| format!("text_encoder.{n}"))
        },
        |_| false,
    );
    if feeds_fusion {
        r.unused.retain(|n| !n.starts_with("encoder.layer."));
    }
    check(&r, allow_partial)?;
    let mut reports = vec![r];
    // The generator's layout: BERT's `cls.predictions.*` (mlm_head) or
    // RoBERTa's `lm_head.*` (roberta_lm_head); the decoder is tied.
    let layout = ["cls.predictions.", "lm_head."].into_iter().find(|p| {
        vars.keys()
            .any(|k| k.starts_with(&format!("generator.{p}")))
    });
    if let Some(layout) = layout {
        let r = apply(
            "MLM head",
            dir,
            ckpt,
            vars,
            "generator.",
            |n| {
                let tail = n.strip_prefix(layout)?;
                (tail != "decoder.weight" && tail != "decoder.bias")
                    .then(|| format!("generator.{n}"))
            },
            |_| false,
        );
        if r.applied == 0 && head_required {
            return Err(Error::Config(format!(
                "{} has no MLM head (`{layout}*`): a masked language model \
                 (BertForMaskedLM) is needed to fill masks",
                dir.join("model.safetensors").display()
            )));
        }
        // A checkpoint without an MLM head (plain BertModel) leaves it new.
        if r.applied > 0 {
            check(&r, allow_partial)?;
        }
        reports.push(r);
    }
    Ok(reports)
}

/// A HuggingFace `BertForMaskedLM` directory (`config.json`,
/// `model.safetensors` with `cls.predictions.*`, and `tokenizer.json` or
/// `vocab.txt`) as a frozen [`vlmatch_registry::MaskedLm`]: NegGen's
/// `fill_model`. A
/// `vocab.txt` is lowercased unless `tokenizer_config.json` says
/// `"do_lower_case": false`. Every tensor must load.
pub fn load_masked_lm(
    dir: &Path,
    device: tch::Device,
    compute: tch::Kind,
) -> Result<vlmatch_registry::MaskedLm> {
    if !dir.is_dir() {
        return Err(Error::Data {
            path: dir.into(),
            line: None,
            message: "expected a directory with config.json, model.safetensors and \
                      tokenizer.json or vocab.txt (a HuggingFace BertForMaskedLM)"
                .into(),
        });
    }
    let model_type = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
    if let Some(t) = model_type.filter(|t| t != "bert") {
        return Err(Error::Data {
            path: dir.join("config.json"),
            line: None,
            message: format!(
                "model_type `{t}`: a fill model must be a BERT masked LM (model_type `bert`)"
            ),
        });
    }
    let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(serde_json::Value::as_bool))
        .unwrap_or(true);
    let tok = std::sync::Arc::new(crate::tokenizer::Tokenizer::from_path(dir, lowercase)?);
    let section = bert::BertSection {
        init: Some(dir.to_path_buf()),
        ..Default::default()
    };
    let arch = section.resolve(&format!("fill model {}", dir.display()))?;
    if let Some(v) = arch.vocab_size.filter(|&v| v != tok.vocab_size()) {
        return Err(Error::Config(format!(
            "{}: vocab_size {v} differs from its tokenizer's {} ({})",
            dir.join("config.json").display(),
            tok.vocab_size(),
            tok.origin()
        )));
    }
    let max_len = arch.max_position_embeddings;
    let mut store = tch::nn::VarStore::new(device);
    let root = store.root();
    let encoder = std::rc::Rc::new(bert::Bert::new(
        &(&root / "text_encoder"),
        &arch,
        tok.vocab_size(),
        max_len,
        compute,
    )?);
    let emb = vlmatch_core::Encoder::word_embeddings(encoder.as_ref())
        .expect("BERT exposes its word embeddings");
    let head = std::rc::Rc::new(mlm_head::MlmHead::new(
        &(&root / "generator"),
        emb,
        arch.layer_norm_eps,
        compute,
    ));
    let ckpt = read_checkpoint(dir)?;
    let reports = apply_text(dir, &ckpt, &store.variables(), false, false, true)?;
    store.freeze();
    Ok(vlmatch_registry::MaskedLm {
        encoder,
        head,
        codec: std::rc::Rc::new(crate::tokenizer::Codec {
            tokenizer: tok,
            max_len: max_len as usize,
        }),
        max_len: max_len as usize,
        report: reports
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        store,
    })
}

fn check(r: &LoadReport, allow_partial: bool) -> Result<()> {
    if (!r.missing.is_empty() || !r.mismatched.is_empty()) && !allow_partial {
        let first = r
            .mismatched
            .first()
            .map(|(n, a, b)| format!("`{n}` is {a:?} in the model but {b:?} in the checkpoint"))
            .or_else(|| {
                r.missing
                    .first()
                    .map(|n| format!("`{n}` is not in the checkpoint"))
            })
            .unwrap_or_default();
        return Err(Error::Config(format!(
            "loading the {} from {}: {} missing and {} mismatched tensors ({first}); \
             fix the config or set allow_partial_init = true",
            r.role,
            r.source.display(),
            r.missing.len(),
            r.mismatched.len()
        )));
    }
    Ok(())
}
