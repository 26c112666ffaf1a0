//! HuggingFace hub-layout directories (`config.json` + `model.safetensors`):
//! resolving an architecture from `config.json` against vlmatch's config.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::Path;
use vlmatch_core::{Error, Result};

/// The architecture `T` for the config section `key`: from `init`'s
/// `config.json` when given, with every key the section also sets required
/// to agree; otherwise from the section's keys alone. `section` holds the
/// section's architecture keys that were set (nulls are ignored).
pub fn resolve_arch<T: DeserializeOwned>(
    key: &str,
    init: Option<&Path>,
    section: Map<String, Value>,
) -> Result<T> {
    resolve_arch_nested(key, init, None, section)
}

/// [`resolve_arch`] where `config.json` may hold the architecture in an
/// object under `nested` (CLIP's `vision_config` in a `CLIPModel`
/// directory); without that object its top level is used.
pub fn resolve_arch_nested<T: DeserializeOwned>(
    key: &str,
    init: Option<&Path>,
    nested: Option<&str>,
    section: Map<String, Value>,
) -> Result<T> {
    let section: Map<String, Value> = section.into_iter().filter(|(_, v)| !v.is_null()).collect();
    let merged = match init {
        None => section,
        Some(dir) => {
            let file = dir.join("config.json");
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Error::Config(format!(
                    "config key `{key}.init`: cannot read {}: {e}",
                    file.display()
                ))
            })?;
            let mut base: Map<String, Value> =
                serde_json::from_str(&text).map_err(|e| Error::Data {
                    path: file.clone(),
                    line: Some(e.line()),
                    message: format!("invalid config.json: {e}"),
                })?;
            if let Some(Value::Object(inner)) = nested.and_then(|n| base.get(n)) {
                base = inner.clone();
            }
            for (k, v) in section {
                match base.get(&k) {
                    Some(b) if !same_number_or_value(b, &v) => {
                        return Err(Error::Config(format!(
                            "config key `{key}.{k}` = {v} contradicts {} ({k} = {b}); remove the key or the init",
                            file.display()
                        )))
                    }
                    _ => {
                        base.insert(k, v);
                    }
                }
            }
            base
        }
    };
    serde_json::from_value(Value::Object(merged)).map_err(|e| {
        let from = init
            .map(|d| format!(" with {}/config.json", d.display()))
            .unwrap_or_default();
        Error::Config(format!("config key `{key}`{from}: {e}"))
    })
}

fn same_number_or_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
        _ => a == b,
    }
}

/// [`resolve_arch`] for a config section struct whose set architecture keys
/// serialise as fields (unset ones as nulls, non-architecture ones skipped).
pub fn resolve_section<T: DeserializeOwned, S: serde::Serialize>(
    key: &str,
    init: Option<&Path>,
    section: &S,
) -> Result<T> {
    let Value::Object(keys) = serde_json::to_value(section).expect("a config section serialises")
    else {
        unreachable!("a struct serialises to an object")
    };
    resolve_arch(key, init, keys)
}

/// With `init`, its `config.json`'s `model_type` must be one that `plugin`
/// loads (`accepted`); one without a `model_type` is let through. The
/// error names both, e.g. a RoBERTa directory given to `bert`.
pub fn check_model_type(
    key: &str,
    plugin: &str,
    init: Option<&Path>,
    accepted: &[&str],
) -> Result<()> {
    let Some(dir) = init else { return Ok(()) };
    let model_type = std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v.get("model_type")?.as_str().map(str::to_string));
    match model_type {
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
