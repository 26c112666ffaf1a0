//! Building an annotation file's index: its entries found (JSON lines, or
//! the elements of a JSON array), each checked as the JSON loader checks it,
//! and the index bytes laid out (the header, then 24 bytes per image and per
//! caption).

use crate::data::annotations::{
    array_document, bad, document, json_line, parse_entry, AnnotationLimits,
};
use crate::data::{resolve_under, with_skip_hint, OnError};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use vlmatch_core::{Error, Result};

pub(super) const MAGIC: &[u8; 8] = b"VLMIDX02";
/// Magic, then ten u64: size, mtime seconds, mtime nanoseconds, the
/// head-and-tail hash, the settings hash, the format (0 lines, 1 array),
/// images, pairs, skipped entries, and a hash of the records (a cache that
/// does not match it, or whose records leave the file, is rebuilt).
pub(super) const HEADER: usize = 8 + 10 * 8;
pub(super) const RECORD: usize = 24;
/// Bytes hashed at each end of the file for the cache key.
pub(super) const ENDS: u64 = 64 << 10;

/// FNV-1a over `bytes`, continuing from `h`.
pub(super) fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
pub(super) const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// An entry's place: its byte range in the file and its line (JSON lines)
/// or entry number (JSON array).
#[derive(Clone, Copy)]
pub(super) struct Place {
    pub offset: u64,
    pub len: u32,
    pub number: u32,
}

/// Byte ranges of the elements of the top-level JSON array in `b`, which
/// starts (after white space) with `[` at `start`.
fn array_elements(b: &[u8], start: usize) -> std::result::Result<Vec<(usize, usize)>, String> {
    let mut out = Vec::new();
    let mut i = start + 1;
    let (mut depth, mut in_str, mut esc) = (0usize, false, false);
    let mut elem: Option<usize> = None;
    while i < b.len() {
        let c = b[i];
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, b'\\') => esc = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
        } else {
            match c {
                b'"' => in_str = true,
                b'[' | b'{' => depth += 1,
                b']' | b'}' if depth > 0 => depth -= 1,
                b',' | b']' if depth == 0 => {
                    if let Some(s) = elem.take() {
                        let e = s + b[s..i].trim_ascii_end().len();
                        out.push((s, e));
                    } else if c == b',' || !out.is_empty() {
                        return Err(format!("an empty element at byte {i}"));
                    }
                    if c == b']' {
                        if !b[i + 1..].trim_ascii().is_empty() {
                            return Err(format!("trailing characters after byte {i}"));
                        }
                        return Ok(out);
                    }
                    i += 1;
                    continue;
                }
                _ => {}
            }
        }
        if elem.is_none() && !c.is_ascii_whitespace() {
            elem = Some(i);
        }
        i += 1;
    }
    Err("the array is not closed".into())
}

/// What a build has gathered so far.
struct Builder<'a> {
    path: &'a Path,
    root: &'a Path,
    text_key: &'a str,
    on_error: OnError,
    limits: AnnotationLimits,
    /// Entries seen, blank lines not counted (the JSON loader's numbering).
    seen: usize,
    images: Vec<(Place, i64)>,
    pairs: Vec<(Place, u32, u32)>,
    skipped: u64,
    by_path: HashMap<String, usize>,
    named_ids: HashMap<String, i64>,
}

impl Builder<'_> {
    /// One entry at `offset..offset + len` of the file, on `line` (JSON
    /// lines), checked as the JSON loader checks it.
    fn add(
        &mut self,
        line: Option<usize>,
        offset: usize,
        len: usize,
        entry: Result<Value>,
    ) -> Result<()> {
        let (path, root, n) = (self.path, self.root, self.seen);
        self.seen += 1;
        let at = |m: String| match line {
            Some(_) => bad(path, line, m),
            None => bad(path, None, format!("entry {n}: {m}")),
        };
        let by_path = &self.by_path;
        let parsed = entry
            .and_then(|e| parse_entry(&e, self.text_key, None, self.limits.captions, &at))
            .and_then(|p| {
                let file = resolve_under(root, &p.image).map_err(&at)?;
                if !by_path.contains_key(&p.image) && !file.is_file() {
                    return Err(at(format!(
                        "image file {} not found (check data.image_root, now {})",
                        file.display(),
                        root.display()
                    )));
                }
                Ok(p)
            });
        let p = match (parsed, self.on_error) {
            (Ok(p), _) => p,
            (Err(e), OnError::Fail) => return Err(with_skip_hint(e, "drops such entries")),
            (Err(e), OnError::Skip) => {
                tracing::warn!("skipped: {e}");
                self.skipped += 1;
                return Ok(());
            }
        };
        let len = u32::try_from(len)
            .map_err(|_| at("an entry of 4 GiB or more cannot be indexed".into()))?;
        let place = Place {
            offset: offset as u64,
            len,
            number: line.unwrap_or(n) as u32,
        };
        let idx = match self.by_path.get(&p.image) {
            Some(&i) => i,
            None => {
                let next = self.named_ids.len() as i64;
                let id = match p.image_id {
                    Some(Value::String(s)) => *self.named_ids.entry(s).or_insert(next),
                    Some(num) => num.as_i64().expect("checked in parse_entry"),
                    None => *self.named_ids.entry(p.image.clone()).or_insert(next),
                };
                self.images.push((place, id));
                self.by_path.insert(p.image, self.images.len() - 1);
                self.images.len() - 1
            }
        };
        for k in 0..p.captions.len() {
            self.pairs.push((place, k as u32, idx as u32));
        }
        Ok(())
    }
}

/// Build the index bytes of `path`: header `want`, the images' records,
/// the pairs'; entries checked as the JSON loader checks them, one at a
/// time. `None` for a Karpathy-format file, which is not indexed.
pub(super) fn build(
    path: &Path,
    root: &Path,
    text_key: &str,
    on_error: OnError,
    limits: AnnotationLimits,
    want: &[u64; 5],
) -> Result<Option<Vec<u8>>> {
    let all = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bom = if all.starts_with(b"\xef\xbb\xbf") {
        3
    } else {
        0
    };
    let bytes = &all[bom..];
    let first = bytes.iter().position(|b| !b.is_ascii_whitespace());
    let lines = first.is_none_or(|f| bytes[f] != b'[');
    let mut b = Builder {
        path,
        root,
        text_key,
        on_error,
        limits,
        seen: 0,
        images: Vec::new(),
        pairs: Vec::new(),
        skipped: 0,
        by_path: HashMap::new(),
        named_ids: HashMap::new(),
    };
    if lines {
        if let Some(f) = first.filter(|&f| bytes[f] == b'{') {
            let mut de = serde_json::Deserializer::from_slice(&bytes[f..]).into_iter::<Value>();
            let karpathy = matches!(de.next(), Some(Ok(v)) if v.get("images").is_some())
                && de.next().is_none();
            if karpathy {
                return Ok(None);
            }
        }
        let mut at = bom;
        for (i, line) in bytes.split(|&c| c == b'\n').enumerate() {
            let len = line.strip_suffix(b"\r").unwrap_or(line).len();
            if let Some(v) = json_line(path, i + 1, line, limits.line_bytes) {
                b.add(Some(i + 1), at, len, v)?;
            }
            at += line.len() + 1;
        }
    } else {
        // Errors of the whole document are the JSON loader's own, naming
        // the line: the document is parsed whole only to find it.
        let text = document(path, bytes)?;
        let invalid = |m: String| {
            array_document(path, text)
                .err()
                .unwrap_or_else(|| bad(path, None, format!("invalid JSON: {m}")))
        };
        let ranges = array_elements(bytes, first.expect("an array")).map_err(invalid)?;
        for (s, e) in ranges {
            let v = serde_json::from_slice::<Value>(&bytes[s..e])
                .map_err(|err| invalid(err.to_string()))?;
            b.add(None, bom + s, e - s, Ok(v))?;
        }
    }
    if b.skipped > 0 {
        tracing::warn!(
            "{}: skipped {} bad entries (data.on_error = \"skip\")",
            path.display(),
            b.skipped
        );
    }
    if b.pairs.is_empty() {
        return Err(bad(path, None, "no image-caption pairs".into()));
    }
    let mut out = Vec::with_capacity(HEADER + RECORD * (b.images.len() + b.pairs.len()));
    out.extend_from_slice(MAGIC);
    let format = u64::from(!lines);
    let counts = [b.images.len() as u64, b.pairs.len() as u64, b.skipped, 0];
    for v in want.iter().chain([format].iter()).chain(counts.iter()) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    for (p, id) in &b.images {
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
        out.extend_from_slice(&p.number.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    for (p, k, image) in &b.pairs {
        out.extend_from_slice(&p.offset.to_le_bytes());
        out.extend_from_slice(&p.len.to_le_bytes());
        out.extend_from_slice(&k.to_le_bytes());
        out.extend_from_slice(&image.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
    }
    // The last header word: a hash of the records, checked on every open.
    let body = fnv(FNV0, &out[HEADER..]);
    out[HEADER - 8..HEADER].copy_from_slice(&body.to_le_bytes());
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn array_elements_are_found_with_strings_and_nesting() {
        let text = br#" [ {"a": "x,]y", "b": [1, {"c": 2}]} , "q\"]" ,3 ] "#;
        let got: Vec<&str> = array_elements(text, 1)
            .unwrap()
            .into_iter()
            .map(|(s, e)| std::str::from_utf8(&text[s..e]).unwrap())
            .collect();
        assert_eq!(
            got,
            [r#"{"a": "x,]y", "b": [1, {"c": 2}]}"#, r#""q\"]""#, "3"]
        );
        assert_eq!(array_elements(b"[]", 0).unwrap(), []);
        for bad in [&b"[1,,2]"[..], b"[1, 2", b"[1] x", b"[,]"] {
            assert!(array_elements(bad, 0).is_err(), "{bad:?}");
        }
    }
}
