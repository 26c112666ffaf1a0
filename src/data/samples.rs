//! The samples of one tar shard: members grouped by key into an image and
//! its captions (see [`super::webdataset`] for the format), read in
//! archive order, every byte read from the file counted into the reader's
//! total (the bytes a rank reads, which `data.shard_split = "disjoint"`
//! divides among ranks).

use super::shards::MemberLimits;
use super::tar::{read_at, Member, TarReader};
use serde_json::Value;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vlmatch_core::{Error, Result};

/// A member's data: read, or (an image) where to read it later.
#[derive(Clone)]
pub(super) enum ImageData {
    Bytes(Arc<Vec<u8>>),
    At { offset: u64, len: u64 },
}

/// Members of one key, as read.
pub(super) struct Raw {
    key: String,
    image: Option<(String, ImageData)>,
    txt: Option<(String, Arc<Vec<u8>>)>,
    json: Option<(String, Arc<Vec<u8>>)>,
    /// Why the sample is refused: a member over its size cap, not read.
    refused: Option<String>,
}

/// A complete sample.
pub(super) struct Sample {
    /// The image member's name.
    pub member: String,
    pub image: ImageData,
    pub captions: Vec<String>,
    pub image_id: i64,
}

enum Kind {
    Image,
    Txt,
    Json,
}

/// The key and kind of a member name, if it is one the samples use.
fn classify(name: &str) -> Option<(&str, Kind)> {
    let base = name.rfind('/').map_or(0, |i| i + 1);
    let dot = base + name[base..].find('.')?;
    let kind = match name[dot + 1..].to_ascii_lowercase().as_str() {
        "jpg" | "jpeg" | "png" => Kind::Image,
        "txt" => Kind::Txt,
        "json" => Kind::Json,
        _ => return None,
    };
    Some((&name[..dot], kind))
}

/// The image id of a sample without a JSON `image_id`, and of a string
/// `image_id`: a stable hash (FNV-1a, non-negative) of the key or string.
pub fn key_image_id(key: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h >> 1) as i64
}

pub(super) fn data_error(path: &Path, message: String) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line: None,
        message,
    }
}

impl Raw {
    fn new(key: String) -> Raw {
        Raw {
            key,
            image: None,
            txt: None,
            json: None,
            refused: None,
        }
    }

    pub(super) fn finish(self, shard: &Path, limits: &MemberLimits) -> Result<Sample> {
        let key = &self.key;
        if let Some(why) = self.refused {
            return Err(data_error(shard, why));
        }
        let Some((member, image)) = self.image else {
            return Err(data_error(
                shard,
                format!("sample `{key}` has no image member ({key}.jpg, .jpeg or .png)"),
            ));
        };
        let mut captions = Vec::new();
        let mut image_id = key_image_id(key);
        if let Some((name, bytes)) = &self.json {
            let bad = |m: &str| data_error(shard, format!("member {name}: {m}"));
            let v: Value =
                serde_json::from_slice(bytes).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
            if !v.is_object() {
                return Err(bad("expected a JSON object"));
            }
            match v.get("caption").or_else(|| v.get("text")) {
                None => {}
                Some(Value::String(s)) => captions.push(s.clone()),
                Some(Value::Array(list)) if list.len() > limits.captions => {
                    return Err(bad(&format!(
                        "{} captions, over data.max_captions_per_image ({})",
                        list.len(),
                        limits.captions
                    )))
                }
                Some(Value::Array(list)) => {
                    for c in list {
                        let s = c
                            .as_str()
                            .ok_or_else(|| bad("`caption` list must hold strings"))?;
                        captions.push(s.to_string());
                    }
                }
                Some(_) => return Err(bad("`caption` must be a string or a list of strings")),
            }
            image_id = match v.get("image_id") {
                None => image_id,
                Some(Value::String(s)) => key_image_id(s),
                Some(n) => n
                    .as_i64()
                    .ok_or_else(|| bad("`image_id` must be an integer or a string"))?,
            };
        }
        if captions.is_empty() {
            if let Some((name, bytes)) = &self.txt {
                let text = std::str::from_utf8(bytes).map_err(|e| {
                    data_error(
                        shard,
                        format!(
                            "member {name}: invalid UTF-8 at byte {} (captions must be UTF-8)",
                            e.valid_up_to() + 1
                        ),
                    )
                })?;
                captions.push(text.to_string());
            }
        }
        let captions: Vec<String> = captions
            .into_iter()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        if captions.is_empty() {
            return Err(data_error(
                shard,
                format!(
                    "sample `{key}` has no caption ({key}.txt, or {key}.json with `caption` or \
                     `text`)"
                ),
            ));
        }
        Ok(Sample {
            member,
            image,
            captions,
            image_id,
        })
    }
}

/// A shard file that counts the bytes read from it into a reader's total.
struct Counted {
    file: File,
    bytes: Arc<AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

impl Seek for Counted {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(to)
    }
}

/// `len` bytes at `offset` of the shard at `path` (an image member read
/// after its sample was), counted into `bytes`.
pub(super) fn read_counted(
    path: &Path,
    offset: u64,
    len: u64,
    bytes: &AtomicU64,
) -> std::io::Result<Vec<u8>> {
    let data = read_at(path, offset, len)?;
    bytes.fetch_add(len, Ordering::Relaxed);
    Ok(data)
}

/// Samples of one shard, in archive order.
pub(super) struct ShardReader {
    path: PathBuf,
    tar: TarReader<BufReader<Counted>>,
    pending: Option<Raw>,
    limits: MemberLimits,
}

impl ShardReader {
    /// The shard at `path`, every byte read from it added to `bytes`.
    pub(super) fn open(
        path: &Path,
        limits: MemberLimits,
        bytes: &Arc<AtomicU64>,
    ) -> Result<ShardReader> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let file = Counted {
            file,
            bytes: bytes.clone(),
        };
        Ok(ShardReader {
            path: path.to_path_buf(),
            tar: TarReader::new(BufReader::with_capacity(1 << 16, file)),
            pending: None,
            limits,
        })
    }

    fn read(&mut self, m: &Member) -> Result<Vec<u8>> {
        self.tar
            .read_data(m)
            .map_err(|msg| data_error(&self.path, msg))
    }

    /// The next sample's members; images are read only when `load_images`
    /// (else their place is kept). A member over its size cap is not read
    /// (whether or not images are loaded, so both passes agree): its sample
    /// is refused.
    pub(super) fn next_raw(&mut self, load_images: bool) -> Result<Option<Raw>> {
        loop {
            let m = match self.tar.next_member() {
                Ok(Some(m)) => m,
                Ok(None) => return Ok(self.pending.take()),
                Err(msg) => {
                    // A header claiming more than the file holds: the
                    // refusal of its member says more than the truncation.
                    let refused = self.pending.take().and_then(|p| p.refused);
                    let message = match refused {
                        Some(why) => format!("{why}; the rest of the shard is unreadable ({msg})"),
                        None => format!("corrupt tar: {msg}"),
                    };
                    return Err(data_error(&self.path, message));
                }
            };
            let Some((key, kind)) = classify(&m.name) else {
                continue;
            };
            let finished = match &self.pending {
                Some(p) if p.key != key => self.pending.take(),
                _ => None,
            };
            let key = key.to_string();
            let cap = match kind {
                Kind::Image => (self.limits.image_bytes, "data.max_image_bytes"),
                Kind::Txt | Kind::Json => (self.limits.text_bytes, "data.max_text_bytes"),
            };
            if let Err(why) = m.check_size(cap.0, cap.1) {
                let raw = self.pending.get_or_insert_with(|| Raw::new(key));
                raw.refused.get_or_insert(why);
                if finished.is_some() {
                    return Ok(finished);
                }
                continue;
            }
            let data = match kind {
                Kind::Image if !load_images => ImageData::At {
                    offset: m.offset,
                    len: m.size,
                },
                _ => ImageData::Bytes(Arc::new(self.read(&m)?)),
            };
            let raw = self.pending.get_or_insert_with(|| Raw::new(key));
            match (kind, data) {
                (Kind::Image, image) => raw.image = Some((m.name, image)),
                (Kind::Txt, ImageData::Bytes(text)) => raw.txt = Some((m.name, text)),
                (Kind::Json, ImageData::Bytes(text)) => raw.json = Some((m.name, text)),
                _ => unreachable!("text members are read"),
            }
            if finished.is_some() {
                return Ok(finished);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_classify_by_the_first_dot_of_the_file_name() {
        let key = |n: &str| classify(n).map(|(k, _)| k.to_string());
        assert_eq!(key("d.x/0001.jpg").as_deref(), Some("d.x/0001"));
        assert_eq!(key("0001.JSON").as_deref(), Some("0001"));
        assert_eq!(key("0001.seg.png"), None);
        assert_eq!(key("0001.cls"), None);
        assert_eq!(key("README"), None);
    }
}
