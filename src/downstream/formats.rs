//! ALBEF's SNLI-VE and NLVR2 annotation files.
//!
//! - SNLI-VE (`ve_train.json`, ...): `{"image", "sentence", "label"}`, label
//!   `entailment`, `neutral` or `contradiction`. `image` is a path under the
//!   image root, or (as in ALBEF's files) a bare Flickr30K id to which
//!   `.jpg` is appended.
//! - NLVR2 (`nlvr_train.json`, ...): `{"images": [left, right], "sentence",
//!   "label"}`, label the strings `"True"`/`"False"` or a boolean.
//!
//! A file is a JSON array (ALBEF's) or JSON lines. A bad entry is an error
//! naming the file, the line the entry starts on and what was expected, or
//! with `data.on_error = "skip"` a warning, and the entry is dropped.

use super::task::{Items, Task};
use crate::data::{Dataset, ImageRef, OnError, Pair};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch_core::{Error, Result};

fn bad(path: &Path, line: Option<usize>, message: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        message,
    }
}

/// The 1-based line on which each top-level element of the JSON array
/// `text` starts (`text` must be one array; strings may hold brackets,
/// commas, escaped quotes and newlines).
pub fn array_element_lines(text: &str) -> Vec<usize> {
    let mut lines = Vec::new();
    let (mut line, mut depth) = (1usize, 0usize);
    let (mut in_string, mut escaped, mut expect_element) = (false, false, false);
    for c in text.chars() {
        if c == '\n' {
            line += 1;
        }
        if in_string {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
            continue;
        }
        if expect_element && depth == 1 && !c.is_whitespace() && c != ']' {
            lines.push(line);
            expect_element = false;
        }
        match c {
            '"' => in_string = true,
            '[' | '{' => {
                depth += 1;
                if depth == 1 {
                    expect_element = true;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            ',' if depth == 1 => expect_element = true,
            _ => {}
        }
    }
    lines
}

/// The entries of a JSON array or JSON-lines file, each with its line, or
/// why the line is unusable.
fn entries(path: &Path) -> Result<Vec<(usize, Result<Value>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = bytes[..e.valid_up_to()]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1;
        bad(
            path,
            Some(line),
            "invalid UTF-8; annotation files must be UTF-8".into(),
        )
    })?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> = serde_json::from_str(text).map_err(|e| {
            bad(
                path,
                Some(e.line()),
                format!("invalid JSON: {e}; expected an array of entries"),
            )
        })?;
        let lines = array_element_lines(text);
        return Ok(values
            .into_iter()
            .zip(lines)
            .map(|(v, l)| (l, Ok(v)))
            .collect());
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let v = serde_json::from_str::<Value>(l)
                .map_err(|e| bad(path, Some(i + 1), format!("invalid JSON line: {e}")));
            (i + 1, v)
        })
        .collect())
}

/// The label of an entry as an index into `task.classes()`.
fn label(task: Task, v: Option<&Value>) -> std::result::Result<i64, String> {
    let classes = task.classes();
    let expected = match task {
        Task::SnliVe => "`label`: \"entailment\", \"neutral\" or \"contradiction\"",
        Task::Nlvr2 => "`label`: \"True\", \"False\" or a boolean",
    };
    let found = match v {
        Some(Value::String(s)) => classes.iter().position(|c| c == s),
        Some(Value::Bool(b)) if task == Task::Nlvr2 => Some(*b as usize),
        _ => None,
    };
    found.map(|i| i as i64).ok_or_else(|| match v {
        None => format!("expected {expected}; the entry has none"),
        Some(v) => format!("expected {expected}, got {v}"),
    })
}

/// An image named by an entry: `root/name`, or for SNLI-VE's bare ids
/// `root/name.jpg`.
fn image_file(root: &Path, name: &str, task: Task) -> std::result::Result<PathBuf, String> {
    let file = crate::data::resolve_under(root, name)?;
    if file.is_file() {
        return Ok(file);
    }
    if task == Task::SnliVe {
        let jpg = crate::data::resolve_under(root, &format!("{name}.jpg"))?;
        if jpg.is_file() {
            return Ok(jpg);
        }
        return Err(format!(
            "image {name:?} not found as {} nor {} (check --image-root, now {})",
            file.display(),
            jpg.display(),
            root.display()
        ));
    }
    Err(format!(
        "image file {} not found (check --image-root, now {})",
        file.display(),
        root.display()
    ))
}

/// One entry's image names, sentence and label.
fn parse(task: Task, e: &Value) -> std::result::Result<(Vec<String>, String, i64), String> {
    if !e.is_object() {
        return Err(format!("expected an object, got {e}"));
    }
    let images: Vec<String> = match task {
        Task::SnliVe => match e.get("image") {
            Some(Value::String(s)) => vec![s.clone()],
            // ALBEF's files name Flickr30K images by their number.
            Some(Value::Number(n)) if n.is_u64() => vec![n.to_string()],
            _ => return Err("expected `image`: a path or a Flickr30K id (string)".into()),
        },
        Task::Nlvr2 => match e.get("images").and_then(Value::as_array) {
            Some(list) if list.len() == 2 && list.iter().all(Value::is_string) => list
                .iter()
                .map(|v| v.as_str().expect("checked").to_string())
                .collect(),
            _ => return Err("expected `images`: a list of two image paths, [left, right]".into()),
        },
    };
    let sentence = e
        .get("sentence")
        .and_then(Value::as_str)
        .ok_or("expected `sentence`: a string")?;
    Ok((images, sentence.to_string(), label(task, e.get("label"))?))
}

/// A `task` file, images under `image_root` (default: the file's folder).
pub fn load(
    task: Task,
    path: &Path,
    image_root: Option<&Path>,
    on_error: OnError,
) -> Result<Items> {
    let root = image_root
        .map(Path::to_path_buf)
        .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
    let mut ds = Dataset {
        name: path.display().to_string(),
        images: Vec::new(),
        image_ids: Vec::new(),
        pairs: Vec::new(),
        skipped: 0,
        store: None,
    };
    let mut labels = Vec::new();
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (line, entry) in entries(path)? {
        let parsed = entry.and_then(|e| {
            let (names, sentence, label) = parse(task, &e).map_err(|m| bad(path, Some(line), m))?;
            let files = names
                .iter()
                .map(|n| match by_name.get(n) {
                    Some(_) => Ok(None),
                    None => image_file(&root, n, task).map(Some),
                })
                .collect::<std::result::Result<Vec<_>, String>>()
                .map_err(|m| bad(path, Some(line), m))?;
            Ok((names, files, sentence, label))
        });
        let (names, files, sentence, label) = match (parsed, on_error) {
            (Ok(p), _) => p,
            (Err(e), OnError::Fail) => {
                return Err(crate::data::with_skip_hint(e, "drops such entries"))
            }
            (Err(e), OnError::Skip) => {
                tracing::warn!("skipped: {e}");
                ds.skipped += 1;
                continue;
            }
        };
        for (name, file) in names.into_iter().zip(files) {
            let image = match (by_name.get(&name), file) {
                (Some(&i), _) => i,
                (None, file) => {
                    ds.images.push(ImageRef::File {
                        path: file.expect("looked up above"),
                        origin: format!("{}:{line}", path.display()),
                        bytes: None,
                    });
                    ds.image_ids.push(ds.images.len() as i64 - 1);
                    by_name.insert(name, ds.images.len() - 1);
                    ds.images.len() - 1
                }
            };
            ds.pairs.push(Pair {
                image,
                caption: sentence.clone(),
            });
        }
        labels.push(label);
    }
    if labels.is_empty() {
        return Err(bad(path, None, format!("no {} entries", task.name())));
    }
    Ok(Items {
        kinds: vec![None; labels.len()],
        ds: Arc::new(ds),
        per_item: task.images(),
        labels,
    })
}
