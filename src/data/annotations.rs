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
//!
//! Files are UTF-8 (a leading byte-order mark is allowed). A bad entry
//! (unparsable line, a line that is not UTF-8, missing field, missing image
//! file) is an error naming the file and line, or with [`OnError::Skip`] a
//! warning, and the entry is dropped. Invalid UTF-8 in a whole-file JSON
//! document (array or Karpathy) is an error naming its line and byte offset.

use super::{Dataset, ImageRef, OnError, Pair};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use vlmatch_core::{Error, Result};

pub(super) fn bad(path: &Path, line: Option<usize>, message: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// What one annotation entry may make the reader hold: a JSON line over
/// `line_bytes` (`data.max_line_bytes`, default 1 MiB) is not parsed, and an
/// entry listing more than `captions` captions (`data.max_captions_per_image`,
/// default 1000) is refused; each a bad entry naming the file and line (a
/// whole-file JSON document, which may be one line, is not cut by line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnotationLimits {
    pub line_bytes: usize,
    pub captions: usize,
}

impl Default for AnnotationLimits {
    fn default() -> Self {
        AnnotationLimits {
            line_bytes: 1 << 20,
            captions: 1000,
        }
    }
}

impl AnnotationLimits {
    /// The limits of a `[data]` section.
    pub fn from_config(data: &vlmatch_registry::config::DataConfig) -> Self {
        AnnotationLimits {
            line_bytes: data.max_line_bytes,
            captions: data.max_captions_per_image,
        }
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

/// [`load_split`] with a `data.on_error` policy.
pub fn load_checked(
    path: &Path,
    image_root: Option<&Path>,
    split: Option<&str>,
    on_error: OnError,
) -> Result<Dataset> {
    load_checked_within(
        path,
        image_root,
        split,
        on_error,
        AnnotationLimits::default(),
    )
}

/// [`load_checked`] under the config's `limits`.
pub fn load_checked_within(
    path: &Path,
    image_root: Option<&Path>,
    split: Option<&str>,
    on_error: OnError,
    limits: AnnotationLimits,
) -> Result<Dataset> {
    load_inner(path, image_root, "caption", None, split, on_error, limits).map(|(ds, _, _)| ds)
}

/// Entries whose text is in the field `text_key` instead of `caption` (e.g.
/// `question` for VQA, `label` for zero-shot classification), with each
/// pair's whole entry for the caller's own fields; under the run's
/// `limits` ([`AnnotationLimits::from_config`]).
pub fn load_entries(
    path: &Path,
    image_root: Option<&Path>,
    text_key: &str,
    on_error: OnError,
    limits: AnnotationLimits,
) -> Result<(Dataset, Vec<Value>)> {
    load_inner(path, image_root, text_key, None, None, on_error, limits)
        .map(|(ds, _, raw)| (ds, raw.into_iter().map(|l| l.entry).collect()))
}

/// A pair's whole entry and where it is in its file.
#[derive(Debug, Clone)]
pub struct Located {
    pub entry: Value,
    /// Its line, in a JSON-lines file.
    pub line: Option<usize>,
    /// Its position among the file's entries.
    pub index: usize,
}

impl Located {
    /// An error about this entry of `path`, naming its line (or entry).
    pub fn error(&self, path: &Path, message: String) -> Error {
        match self.line {
            Some(_) => bad(path, self.line, message),
            None => bad(path, None, format!("entry {}: {message}", self.index)),
        }
    }
}

/// [`load_with`], also returning each pair's entry and where it is, for the
/// caller's own optional fields (such as a matching file's `kind`).
pub fn load_with_located(
    path: &Path,
    image_root: Option<&Path>,
    extra: Option<&str>,
    split: Option<&str>,
) -> Result<(Dataset, Vec<String>, Vec<Located>)> {
    load_inner(
        path,
        image_root,
        "caption",
        extra,
        split,
        OnError::Fail,
        AnnotationLimits::default(),
    )
}

/// One entry: its line (JSON lines), its position, and the entry or why it
/// is unusable.
type Entry = (Option<usize>, Result<Value>);

/// The images of a Karpathy-format file in `split`, as ALBEF-style entries.
fn karpathy_entries(path: &Path, doc: &Value, split: Option<&str>) -> Result<Vec<Entry>> {
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
        let s = img["split"].as_str().unwrap_or("");
        if wanted.as_ref().is_some_and(|w| !w.contains(&s)) {
            continue;
        }
        out.push((None, karpathy_entry(path, n, img)));
    }
    if out.is_empty() {
        return Err(bad(path, None, format!("no images in split {split:?}")));
    }
    Ok(out)
}

fn karpathy_entry(path: &Path, n: usize, img: &Value) -> Result<Value> {
    let at = |m: &str| bad(path, None, format!("images[{n}]: {m}"));
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
    Ok(serde_json::json!({"image": image, "caption": captions, "image_id": id}))
}

/// [`load`], also returning each pair's string field `extra` (for example
/// `negative` in matching files), which is then required on every entry.
pub fn load_with(
    path: &Path,
    image_root: Option<&Path>,
    extra: Option<&str>,
    split: Option<&str>,
) -> Result<(Dataset, Vec<String>)> {
    let limits = AnnotationLimits::default();
    load_inner(
        path,
        image_root,
        "caption",
        extra,
        split,
        OnError::Fail,
        limits,
    )
    .map(|(ds, extras, _)| (ds, extras))
}

/// What one usable entry adds: its image path, captions, id and extra field.
pub(super) struct Parsed {
    pub image: String,
    pub captions: Vec<String>,
    pub image_id: Option<Value>,
    pub extra: Option<String>,
    pub raw: Value,
}

pub(super) fn parse_entry(
    entry: &Value,
    text_key: &str,
    extra: Option<&str>,
    max_captions: usize,
    at: &dyn Fn(String) -> Error,
) -> Result<Parsed> {
    let Some(image) = entry.get("image").and_then(Value::as_str) else {
        return Err(at(
            "expected a string field `image` (path relative to data.image_root)".into(),
        ));
    };
    let captions: Vec<String> = match entry.get(text_key) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(list)) if list.len() > max_captions => {
            return Err(at(format!(
                "`{text_key}` lists {} captions, over data.max_captions_per_image ({max_captions})",
                list.len()
            )))
        }
        Some(Value::Array(list)) => list
            .iter()
            .map(|c| c.as_str().map(str::to_string))
            .collect::<Option<_>>()
            .ok_or_else(|| at(format!("`{text_key}` list must hold strings")))?,
        _ => {
            return Err(at(format!(
                "expected `{text_key}`: a string or a list of strings"
            )))
        }
    };
    let image_id = entry.get("image_id").cloned();
    if !matches!(
        image_id,
        None | Some(Value::String(_)) | Some(Value::Number(_))
    ) || image_id
        .as_ref()
        .is_some_and(|v| v.is_number() && v.as_i64().is_none())
    {
        return Err(at("`image_id` must be an integer or a string".into()));
    }
    let extra = match extra {
        None => None,
        Some(field) => {
            let Some(v) = entry.get(field).and_then(Value::as_str) else {
                return Err(at(format!("expected a string field `{field}`")));
            };
            if captions.len() != 1 {
                return Err(at(format!(
                    "with `{field}`, `{text_key}` must be a single string"
                )));
            }
            Some(v.to_string())
        }
    };
    Ok(Parsed {
        image: image.to_string(),
        captions,
        image_id,
        extra,
        raw: entry.clone(),
    })
}

/// The entries of a JSON-lines file, each line decoded on its own: invalid
/// UTF-8 or JSON is an error of that line alone (which `data.on_error =
/// "skip"` drops), naming the line and the byte where the bad sequence starts.
/// A line over `max_line` bytes is such an error too, without being parsed.
fn json_lines(path: &Path, bytes: &[u8], max_line: usize) -> Vec<Entry> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter_map(|(i, line)| json_line(path, i + 1, line, max_line).map(|v| (Some(i + 1), v)))
        .collect()
}

/// Line `n` of a JSON-lines file: its entry, why it is unusable, or `None`
/// for a blank line.
pub(super) fn json_line(
    path: &Path,
    n: usize,
    line: &[u8],
    max_line: usize,
) -> Option<Result<Value>> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > max_line {
        let message = format!(
            "line is {} bytes, over data.max_line_bytes ({max_line})",
            line.len()
        );
        return Some(Err(bad(path, Some(n), message)));
    }
    match std::str::from_utf8(line) {
        Ok(text) if text.trim().is_empty() => None,
        Ok(text) => Some(
            serde_json::from_str::<Value>(text)
                .map_err(|e| bad(path, Some(n), format!("invalid JSON line: {e}"))),
        ),
        Err(e) => Some(Err(bad(
            path,
            Some(n),
            format!(
                "invalid UTF-8 at byte {} of the line (annotation files must be UTF-8)",
                e.valid_up_to() + 1
            ),
        ))),
    }
}

/// `bytes`, a whole-file JSON document (its byte-order mark removed), as
/// text; invalid UTF-8 is an error naming its line and byte.
pub(super) fn document<'a>(path: &Path, bytes: &'a [u8]) -> Result<&'a str> {
    std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        bad(
            path,
            Some(line),
            format!(
                "invalid UTF-8 at byte {} of the file; a JSON document must be UTF-8 \
                 throughout (re-encode it, e.g. `iconv -t utf-8`)",
                e.valid_up_to()
            ),
        )
    })
}

/// The elements of the JSON array `text`; invalid JSON is an error naming
/// its line.
pub(super) fn array_document(path: &Path, text: &str) -> Result<Vec<Value>> {
    serde_json::from_str(text).map_err(|e| bad(path, Some(e.line()), format!("invalid JSON: {e}")))
}

/// The dataset, the `extra` field of each entry, and each pair's entry.
type Loaded = (Dataset, Vec<String>, Vec<Located>);

fn load_inner(
    path: &Path,
    image_root: Option<&Path>,
    text_key: &str,
    extra: Option<&str>,
    split: Option<&str>,
    on_error: OnError,
    limits: AnnotationLimits,
) -> Result<Loaded> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let root = image_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace());
    // A whole-file JSON document must be UTF-8 throughout; JSON lines are
    // decoded line by line below, so one bad line is one bad entry.
    let document = || document(path, bytes);
    let karpathy = (first == Some(b'{'))
        .then(|| document().ok())
        .flatten()
        .and_then(|text| serde_json::from_str::<Value>(text).ok())
        .filter(|v| v.get("images").is_some());
    if karpathy.is_none() && split.is_some() {
        return Err(bad(
            path,
            None,
            "a split was given, but this is not a Karpathy-format file (an object with `images`)"
                .into(),
        ));
    }
    let entries: Vec<Entry> = if let Some(doc) = &karpathy {
        karpathy_entries(path, doc, split)?
    } else if first == Some(b'[') {
        let values = array_document(path, document()?)?;
        values.into_iter().map(|v| (None, Ok(v))).collect()
    } else {
        json_lines(path, bytes, limits.line_bytes)
    };
    let mut ds = Dataset {
        name: path.display().to_string(),
        images: Vec::new(),
        image_ids: Vec::new(),
        pairs: Vec::new(),
        skipped: 0,
        store: None,
    };
    let mut extras = Vec::new();
    let mut raws = Vec::new();
    let mut by_path: HashMap<String, usize> = HashMap::new();
    let mut named_ids: HashMap<String, i64> = HashMap::new();
    for (n, (line, entry)) in entries.into_iter().enumerate() {
        let at = |m: String| match line {
            Some(_) => bad(path, line, m),
            None => bad(path, None, format!("entry {n}: {m}")),
        };
        let parsed = entry
            .and_then(|e| parse_entry(&e, text_key, extra, limits.captions, &at))
            .and_then(|p| {
                let file = super::resolve_under(&root, &p.image).map_err(&at)?;
                if !by_path.contains_key(&p.image) && !file.is_file() {
                    return Err(at(format!(
                        "image file {} not found (check data.image_root, now {})",
                        file.display(),
                        root.display()
                    )));
                }
                Ok((p, file))
            });
        let (p, file) = match (parsed, on_error) {
            (Ok(p), _) => p,
            (Err(e), OnError::Fail) => return Err(super::with_skip_hint(e, "drops such entries")),
            (Err(e), OnError::Skip) => {
                tracing::warn!("skipped: {e}");
                ds.skipped += 1;
                continue;
            }
        };
        let idx = match by_path.get(&p.image) {
            Some(&i) => i,
            None => {
                let origin = match line {
                    Some(l) => format!("{}:{l}", path.display()),
                    None => format!("{} entry {n}", path.display()),
                };
                ds.images.push(ImageRef::File {
                    path: file,
                    origin,
                    bytes: None,
                });
                let next = named_ids.len() as i64;
                let id = match p.image_id {
                    Some(Value::String(s)) => *named_ids.entry(s).or_insert(next),
                    Some(num) => num.as_i64().expect("checked in parse_entry"),
                    None => *named_ids.entry(p.image.clone()).or_insert(next),
                };
                ds.image_ids.push(id);
                by_path.insert(p.image, ds.images.len() - 1);
                ds.images.len() - 1
            }
        };
        extras.extend(p.extra);
        for caption in p.captions {
            ds.pairs.push(Pair {
                image: idx,
                caption,
            });
            raws.push(Located {
                entry: p.raw.clone(),
                line,
                index: n,
            });
        }
    }
    if ds.skipped > 0 {
        tracing::warn!(
            "{}: skipped {} bad entries (data.on_error = \"skip\")",
            path.display(),
            ds.skipped
        );
    }
    if ds.pairs.is_empty() {
        return Err(bad(path, None, "no image-caption pairs".into()));
    }
    Ok((ds, extras, raws))
}
