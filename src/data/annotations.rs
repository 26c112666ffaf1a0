//! Annotation files:
//!
//! - ALBEF/BLIP: a JSON array, or JSON lines, of `{"image": path relative to
//!   the image root, "caption": string or list of strings, "image_id":
//!   optional number or string}`. Pairs without an `image_id` share an id
//!   with the other pairs of the same image path.
//! - Karpathy splits of COCO and Flickr30K (`dataset_coco.json`): an object
//!   with `images[]`, each with `filename`, optional `filepath`, `split`
//!   (`train`, `restval`, `val`, `test`), `sentences[].raw` and `imgid`;
//!   `split` selects images (comma-separated, e.g. `train,restval`).

use super::{Dataset, ImageRef, Pair};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use vlmatch_core::{Error, Result};

fn bad(path: &Path, line: Option<usize>, message: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// Read `path`; image paths resolve against `image_root` (default: the
/// annotation file's directory). A missing image file is an error naming the
/// annotation line and the path looked for.
pub fn load(path: &Path, image_root: Option<&Path>) -> Result<Dataset> {
    load_with(path, image_root, None, None).map(|(ds, _)| ds)
}

/// [`load`] restricted to a Karpathy split (`None`: every image).
pub fn load_split(path: &Path, image_root: Option<&Path>, split: Option<&str>) -> Result<Dataset> {
    load_with(path, image_root, None, split).map(|(ds, _)| ds)
}

/// The images of a Karpathy-format file in `split`, as ALBEF-style entries.
fn karpathy_entries(
    path: &Path,
    doc: &Value,
    split: Option<&str>,
) -> Result<Vec<(Option<usize>, Value)>> {
    let images = doc["images"].as_array().ok_or_else(|| {
        bad(
            path,
            None,
            "expected `images` to be a list (Karpathy format)".into(),
        )
    })?;
    let wanted: Option<Vec<&str>> = split.map(|s| s.split(',').map(str::trim).collect());
    let mut out = Vec::new();
    for (n, img) in images.iter().enumerate() {
        let at = |m: &str| bad(path, None, format!("images[{n}]: {m}"));
        let s = img["split"].as_str().unwrap_or("");
        if wanted.as_ref().is_some_and(|w| !w.contains(&s)) {
            continue;
        }
        let file = img["filename"]
            .as_str()
            .ok_or_else(|| at("expected a string `filename`"))?;
        let image = match img["filepath"].as_str() {
            Some(dir) if !dir.is_empty() => format!("{dir}/{file}"),
            _ => file.to_string(),
        };
        let captions: Vec<Value> = img["sentences"]
            .as_array()
            .ok_or_else(|| at("expected `sentences`, a list"))?
            .iter()
            .map(|s| {
                s["raw"]
                    .as_str()
                    .map(|r| Value::from(r.trim()))
                    .ok_or_else(|| at("a sentence without `raw`"))
            })
            .collect::<Result<_>>()?;
        let id = img
            .get("imgid")
            .or_else(|| img.get("cocoid"))
            .cloned()
            .unwrap_or(Value::from(n as i64));
        out.push((
            None,
            serde_json::json!({"image": image, "caption": captions, "image_id": id}),
        ));
    }
    if out.is_empty() {
        return Err(bad(path, None, format!("no images in split {split:?}")));
    }
    Ok(out)
}

/// [`load`], also returning each pair's string field `extra` (for example
/// `negative` in matching files), which is then required on every entry.
pub fn load_with(
    path: &Path,
    image_root: Option<&Path>,
    extra: Option<&str>,
    split: Option<&str>,
) -> Result<(Dataset, Vec<String>)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let root = image_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let karpathy = text
        .trim_start()
        .starts_with('{')
        .then(|| serde_json::from_str::<Value>(&text).ok())
        .flatten()
        .filter(|v| v.get("images").is_some());
    if karpathy.is_none() && split.is_some() {
        return Err(bad(
            path,
            None,
            "a split was given, but this is not a Karpathy-format file (an object with `images`)"
                .into(),
        ));
    }
    let entries: Vec<(Option<usize>, Value)> = if let Some(doc) = &karpathy {
        karpathy_entries(path, doc, split)?
    } else if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(&text)
            .map_err(|e| bad(path, Some(e.line()), format!("invalid JSON: {e}")))?;
        values.into_iter().map(|v| (None, v)).collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .map_err(|e| bad(path, Some(i + 1), format!("invalid JSON line: {e}")))?;
            out.push((Some(i + 1), v));
        }
        out
    };
    let mut ds = Dataset {
        name: path.display().to_string(),
        images: Vec::new(),
        image_ids: Vec::new(),
        pairs: Vec::new(),
    };
    let mut extras = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    let mut named_ids: HashMap<String, i64> = HashMap::new();
    for (n, (line, entry)) in entries.iter().enumerate() {
        let at = |m: String| match line {
            Some(_) => bad(path, *line, m),
            None => bad(path, None, format!("entry {n}: {m}")),
        };
        let Some(image) = entry.get("image").and_then(Value::as_str) else {
            return Err(at(
                "expected a string field `image` (path relative to data.image_root)".into(),
            ));
        };
        let captions: Vec<String> = match entry.get("caption") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|c| c.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or_else(|| at("`caption` list must hold strings".into()))?,
            _ => {
                return Err(at(
                    "expected `caption`: a string or a list of strings".into()
                ))
            }
        };
        let idx = match by_path.get(image) {
            Some(&i) => i,
            None => {
                let file = root.join(image);
                if !file.is_file() {
                    return Err(at(format!(
                        "image file {} not found (check data.image_root, now {})",
                        file.display(),
                        root.display()
                    )));
                }
                let origin = match line {
                    Some(l) => format!("{}:{l}", path.display()),
                    None => format!("{} entry {n}", path.display()),
                };
                ds.images.push(ImageRef::File { path: file, origin });
                let next = named_ids.len() as i64;
                let id = match entry.get("image_id") {
                    Some(Value::Number(num)) => num
                        .as_i64()
                        .ok_or_else(|| at("`image_id` must be an integer or a string".into()))?,
                    Some(Value::String(s)) => *named_ids.entry(s.clone()).or_insert(next),
                    None => *named_ids.entry(image.to_string()).or_insert(next),
                    Some(_) => return Err(at("`image_id` must be an integer or a string".into())),
                };
                ds.image_ids.push(id);
                by_path.insert(image.to_string(), ds.images.len() - 1);
                ds.images.len() - 1
            }
        };
        if let Some(field) = extra {
            let Some(v) = entry.get(field).and_then(Value::as_str) else {
                return Err(at(format!("expected a string field `{field}`")));
            };
            if captions.len() != 1 {
                return Err(at(format!(
                    "with `{field}`, `caption` must be a single string"
                )));
            }
            extras.push(v.to_string());
        }
        for caption in captions {
            ds.pairs.push(Pair {
                image: idx,
                caption,
            });
        }
    }
    if ds.pairs.is_empty() {
        return Err(bad(path, None, "no image-caption pairs".into()));
    }
    Ok((ds, extras))
}
