//! Applying HuggingFace hub-layout checkpoints (`model.safetensors`) to an
//! assembled model, with a report of what was applied, missing, new, unused
//! and mismatched.
//!
//! The host knows no checkpoint layout itself: each role's plugin
//! registers a [`CheckpointLayout`] with its factory, and this module asks
//! the [`Registry`] for it by the role's plugin name.
//!
//! | config | plugin's layout | parameters |
//! |---|---|---|
//! | `model.image.init` | `model.image.plugin` (encoder) | `vision_encoder.*` |
//! | `model.text.init` | `model.text.plugin` (encoder) | `text_encoder.*` |
//! | `model.text.init` | `model.generator.plugin` (generator: the LM head) | `generator.*` |
//! | `model.fusion.init` | `model.fusion.plugin` (encoder) | `fusion.*` |
//!
//! A checkpoint whose `model_type` the layout does not load is an error
//! naming both. When two roles start from one directory (ALBEF's split of a
//! BERT into text and fusion layers), a tensor one role takes is not unused
//! in the other's report. A checkpoint without the generator's tensors (a
//! plain `BertModel`) leaves the head new.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use tch::Tensor;
use vlmatch_core::{Error, Result};
use vlmatch_registry::weights::{self, CheckpointLayout, LoadContext};
use vlmatch_registry::{Kind, LoadedConfig, Registry};

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
    /// Tensors the layout resized (position embeddings at another resolution).
    pub interpolated: Vec<String>,
    /// Checkpoint tensors applied, by their names in the file.
    pub used: HashSet<String>,
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

/// Read `DIR/model.safetensors` as name (as stored) -> tensor.
pub fn read_checkpoint(dir: &Path) -> Result<BTreeMap<String, Tensor>> {
    let file = dir.join("model.safetensors");
    let tensors = Tensor::read_safetensors(&file).map_err(|e| Error::Data {
        path: file.clone(),
        line: None,
        message: format!("cannot read safetensors: {e}"),
    })?;
    Ok(tensors.into_iter().collect())
}

/// Copy checkpoint tensors into `vars` by `target` (checkpoint name ->
/// model parameter name, `None` to skip), resizing with `resize`
/// (parameter, tensor, model shape) where it returns a tensor. `role_prefix`
/// selects the parameters counted as missing; `is_new` marks those that are
/// new by design.
#[allow(clippy::too_many_arguments)]
pub fn apply(
    role: &str,
    source: &Path,
    checkpoint: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    role_prefix: &str,
    target: impl Fn(&str) -> Option<String>,
    resize: impl Fn(&str, &Tensor, &[i64]) -> Option<Tensor>,
    is_new: impl Fn(&str) -> bool,
) -> LoadReport {
    let mut report = LoadReport {
        role: role.to_string(),
        source: source.to_path_buf(),
        ..Default::default()
    };
    let mut applied = HashSet::new();
    tch::no_grad(|| {
        for (name, t) in checkpoint {
            let Some(local) = target(name) else { continue };
            let Some(var) = vars.get(&local) else {
                report.unused.push(name.clone());
                continue;
            };
            let t = match resize(&local, t, &var.size()) {
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
            report.used.insert(name.clone());
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

/// [`apply`] through a plugin's registered layout: checkpoint names mapped
/// by it and put under `prefix` (`text_encoder.`, or `""` for a model built
/// at the root), its resizing and its new-by-design parameters. `key` and
/// `section` are the plugin's config section.
#[allow(clippy::too_many_arguments)]
pub fn apply_layout(
    role: &str,
    source: &Path,
    checkpoint: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    prefix: &str,
    layout: &dyn CheckpointLayout,
    key: &str,
    section: &serde_json::Value,
) -> LoadReport {
    let model_type = weights::model_type(source);
    let ctx = LoadContext {
        key,
        section,
        vars,
        model_type: model_type.as_deref(),
    };
    apply(
        role,
        source,
        checkpoint,
        vars,
        prefix,
        |n| layout.map_name(&ctx, n).map(|p| format!("{prefix}{p}")),
        |p, t, shape| layout.resize(p.strip_prefix(prefix)?, t, shape),
        |p| p.strip_prefix(prefix).is_some_and(|p| layout.is_new(p)),
    )
}

/// The registry of the plugins linked into this binary.
fn registry() -> Result<Registry> {
    Registry::from_inventory().map_err(|e| Error::Config(e.to_string()))
}

fn plugin_of(cfg: &LoadedConfig, key: &str) -> Option<String> {
    cfg.figment
        .extract_inner::<String>(&format!("{key}.plugin"))
        .ok()
}

/// Where each role's report is named, in the order roles are loaded.
const ROLES: [(&str, &str); 3] = [
    ("text", "text encoder"),
    ("fusion", "fusion encoder"),
    ("image", "image encoder"),
];

/// Apply every `model.<role>.init` of `cfg` to the model's variables
/// through the role plugins' layouts (and, from `model.text.init`, the
/// generator's). Missing or mismatched tensors are an error unless the role
/// sets `allow_partial_init = true`.
pub fn apply_inits(cfg: &LoadedConfig, vars: &HashMap<String, Tensor>) -> Result<Vec<LoadReport>> {
    let registry = crate::libraries::registry(cfg)?;
    let mut reports: Vec<(LoadReport, bool)> = Vec::new();
    let mut checkpoints: BTreeMap<PathBuf, BTreeMap<String, Tensor>> = BTreeMap::new();
    for (role, what) in ROLES {
        let key = format!("model.{role}");
        let Ok(dir) = cfg.figment.extract_inner::<PathBuf>(&format!("{key}.init")) else {
            continue;
        };
        let allow_partial = cfg
            .figment
            .extract_inner::<bool>(&format!("{key}.allow_partial_init"))
            .unwrap_or(false);
        let plugin = plugin_of(cfg, &key).unwrap_or_default();
        let layout = registry.layout(Kind::Encoder, &plugin).ok_or_else(|| {
            Error::Config(format!(
                "config key `{key}.init`: plugin `{plugin}` registers no checkpoint layout,                  so it cannot start from {}; remove `init` or pick a plugin that loads                  checkpoints (model types: {})",
                dir.display(),
                registry.loadable(Kind::Encoder).join(", ")
            ))
        })?;
        weights::check_model_type(&key, &plugin, Some(&dir), layout.model_types())?;
        if !checkpoints.contains_key(&dir) {
            checkpoints.insert(dir.clone(), read_checkpoint(&dir)?);
        }
        let ckpt = &checkpoints[&dir];
        let section: serde_json::Value = cfg.section(&key)?;
        let prefix = format!("{}.", weights::role_prefix(role).expect("a model role"));
        let r = apply_layout(what, &dir, ckpt, vars, &prefix, layout, &key, &section);
        reports.push((r, allow_partial));
        if role == "text" {
            if let Some(head) = generator_report(cfg, &registry, &dir, ckpt, vars, false)? {
                reports.push((head, allow_partial));
            }
        }
    }
    // A tensor another role took from the same directory is not unused.
    let mut used: HashMap<PathBuf, HashSet<String>> = HashMap::new();
    for (r, _) in &reports {
        used.entry(r.source.clone())
            .or_default()
            .extend(r.used.iter().cloned());
    }
    let mut out = Vec::new();
    for (mut r, allow_partial) in reports {
        let taken = &used[&r.source];
        r.unused.retain(|n| !taken.contains(n));
        // A checkpoint without the generator's tensors leaves the head new.
        if r.role != "MLM head" || r.applied > 0 {
            check(&r, allow_partial)?;
        }
        out.push(r);
    }
    Ok(out)
}

/// The generator's (LM head's) report from the text checkpoint `dir`, if
/// the model has a generator with a layout; with `required`, a checkpoint
/// without its tensors is an error.
fn generator_report(
    cfg: &LoadedConfig,
    registry: &Registry,
    dir: &Path,
    ckpt: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    required: bool,
) -> Result<Option<LoadReport>> {
    let Some(plugin) = plugin_of(cfg, "model.generator") else {
        return Ok(None);
    };
    let Some(layout) = registry.layout(Kind::Generator, &plugin) else {
        return Ok(None);
    };
    let section: serde_json::Value = cfg.section("model.generator")?;
    head_report(
        registry,
        &plugin,
        layout,
        "model.generator",
        &section,
        dir,
        ckpt,
        vars,
        required,
    )
    .map(Some)
}

/// Apply an LM head's layout (`generator.*`) from the text checkpoint `dir`.
#[allow(clippy::too_many_arguments)]
fn head_report(
    registry: &Registry,
    plugin: &str,
    layout: &dyn CheckpointLayout,
    key: &str,
    section: &serde_json::Value,
    dir: &Path,
    ckpt: &BTreeMap<String, Tensor>,
    vars: &HashMap<String, Tensor>,
    required: bool,
) -> Result<LoadReport> {
    if let Some(t) = weights::model_type(dir) {
        if !layout.model_types().contains(&t.as_str()) {
            let loading: Vec<&str> = registry
                .loading(Kind::Generator, &t)
                .into_iter()
                .map(|(n, _)| n)
                .collect();
            return Err(Error::Config(format!(
                "config key `{key}.plugin`: generator `{plugin}` does not load the LM head of \
                 {}, a `{t}` checkpoint (model.text.init); it loads model_type {}; for `{t}` use \
                 {}",
                dir.display(),
                layout.model_types().join(" or "),
                if loading.is_empty() {
                    "no registered generator".to_string()
                } else {
                    loading
                        .iter()
                        .map(|n| format!("`{n}`"))
                        .collect::<Vec<_>>()
                        .join(" or ")
                }
            )));
        }
    }
    let r = apply_layout(
        "MLM head",
        dir,
        ckpt,
        vars,
        "generator.",
        layout,
        key,
        section,
    );
    if r.applied == 0 && required {
        return Err(Error::Config(format!(
            "{} has no MLM head (no tensor that generator `{plugin}` loads): a masked \
             language model ({}) is needed to fill masks",
            dir.join("model.safetensors").display(),
            layout.architectures().join(" or ")
        )));
    }
    Ok(r)
}

/// A HuggingFace masked-LM directory (`config.json`, `model.safetensors`
/// with the LM head, and `tokenizer.json` or `vocab.txt`) as a frozen
/// [`vlmatch_registry::MaskedLm`]: NegGen's `fill_model`. The text encoder
/// and LM head are the plugins whose layouts load the directory's
/// `model_type` (`bert`: `bert` + `mlm_head`; `roberta`: `roberta` +
/// `roberta_lm_head`). A `vocab.txt` is lowercased unless
/// `tokenizer_config.json` says `"do_lower_case": false`. Every tensor must
/// load.
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
                      tokenizer.json or vocab.txt (a HuggingFace masked LM such as \
                      BertForMaskedLM)"
                .into(),
        });
    }
    let registry = registry()?;
    let plan = weights::plan_masked_lm(&registry, dir)?;
    let lowercase = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("do_lower_case").and_then(serde_json::Value::as_bool))
        .unwrap_or(true);
    let tok = std::sync::Arc::new(crate::tokenizer::Tokenizer::from_path(dir, lowercase)?);
    if let Some(v) = plan
        .encoder_arch
        .vocab_size
        .filter(|&v| v != tok.vocab_size())
    {
        return Err(Error::Config(format!(
            "{}: vocab_size {v} differs from its tokenizer's {} ({})",
            dir.join("config.json").display(),
            tok.vocab_size(),
            tok.origin()
        )));
    }
    let max_len = plan.encoder_arch.max_text_len.unwrap_or(512);
    let codec = std::rc::Rc::new(crate::tokenizer::Codec {
        tokenizer: tok.clone(),
        max_len: max_len as usize,
    });
    let env = vlmatch_registry::ModelEnv {
        vocab_size: tok.vocab_size(),
        special: tok.special,
        text: codec.clone(),
        image_size: 0,
        max_text_len: max_len,
        device,
        compute,
        masked_lm: None,
        checkpointer: None,
    };
    let mut store = tch::nn::VarStore::new(device);
    let (encoder, head) = weights::build_masked_lm(&registry, &plan, &env, &store.root())?;
    let ckpt = read_checkpoint(dir)?;
    let vars = store.variables();
    let encoder_layout = registry
        .layout(Kind::Encoder, &plan.encoder)
        .expect("planned from its layout");
    let section = serde_json::Value::Object(plan.encoder_arch.section.clone());
    let text = apply_layout(
        "text encoder",
        dir,
        &ckpt,
        &vars,
        "text_encoder.",
        encoder_layout,
        "fill_model.text",
        &section,
    );
    check(&text, false)?;
    let head_layout = registry
        .layout(Kind::Generator, &plan.generator)
        .expect("planned from its layout");
    let head_section = serde_json::Value::Object(plan.generator_arch.section.clone());
    let head_r = head_report(
        &registry,
        &plan.generator,
        head_layout,
        "fill_model.generator",
        &head_section,
        dir,
        &ckpt,
        &vars,
        true,
    )?;
    check(&head_r, false)?;
    store.freeze();
    Ok(vlmatch_registry::MaskedLm {
        encoder,
        head,
        codec,
        max_len: max_len as usize,
        report: format!("{text}\n{head_r}"),
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
