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

/// Learned position embeddings over a square patch grid, `[1, 1 + g*g, D]`
/// (ViT's `embeddings.position_embeddings`) or `[1 + g*g, D]` (CLIP's
/// `embeddings.position_embedding.weight`), resized to the model's `target`
/// shape of the same form: the `[CLS]` position kept, the grid resized
/// bicubically (`align_corners = false`), as timm and ALBEF do to fine-tune
/// at another resolution. `None` when the shapes already agree or are not
/// of that form.
pub fn interpolate_grid_positions(t: &tch::Tensor, target: &[i64]) -> Option<tch::Tensor> {
    use tch::{Kind, Tensor};
    if t.size() == target {
        return None;
    }
    if t.dim() == 2 && target.len() == 2 {
        let target = [1, target[0], target[1]];
        return interpolate_grid_positions(&t.unsqueeze(0), &target).map(|t| t.squeeze_dim(0));
    }
    if t.dim() != 3 || target.len() != 3 {
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
        .to_kind(Kind::Float)
        .upsample_bicubic2d([h, h], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, h * h, d]);
    Some(Tensor::cat(&[cls.to_kind(Kind::Float), grid], 1))
}
