//! The index directory `vlmatch embed` writes and `search` reads: unit ITC
//! embeddings of images and of captions, their ids, paths and captions, and
//! the fingerprint of the model that made them, so that an index is never
//! compared with another model's embeddings.
//!
//! ```text
//! INDEX/manifest.json      format, version, model fingerprint, dtype, dim,
//!                          chunk rows, the source, item counts
//! INDEX/images.jsonl       one {"id", "path"} per image, in index order
//! INDEX/texts.jsonl        one {"id", "image_id", "caption"} per caption
//! INDEX/images/00000.bin   rows of chunk 0: [rows, dim] little-endian f16/f32
//! INDEX/texts/00000.bin    likewise for the captions
//! INDEX/progress.json      {"images": chunks done, "texts": chunks done}
//! ```
//!
//! Every file is written through [`crate::durable`]; chunk files are whole
//! or absent, so an embed killed at any point resumes from `progress.json`
//! to the same bytes.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Error, Result};

pub const FORMAT: &str = "vlmatch-index";
pub const VERSION: u32 = 1;

/// What identifies the model an index was embedded with: a hash of the
/// model's configuration and input preprocessing, and the checkpoint file
/// with its CRC-32.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// FNV-1a 64 of the `[model]` section and the image and text
    /// preprocessing (`data.image_size`, `mean`, `std`, `max_len`).
    pub config_hash: String,
    /// The checkpoint's file name (`step-00000004.safetensors`).
    pub checkpoint: String,
    /// CRC-32 and length of the checkpoint file (`"1a2b3c4d 1234"`).
    pub checkpoint_crc32: String,
}

/// FNV-1a, 64 bits: a stable hash of bytes (not a cryptographic one).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl Fingerprint {
    /// The fingerprint of a loaded run: its config and the checkpoint its
    /// weights came from.
    pub fn of(config: &vlmatch_registry::Config, checkpoint: &Path) -> Result<Fingerprint> {
        let d = &config.data;
        let what = serde_json::json!({
            "model": config.model,
            "image_size": d.image_size,
            "mean": d.mean,
            "std": d.std,
            "max_len": d.max_len,
        });
        let text = serde_json::to_string(&what).expect("the config serialises");
        Ok(Fingerprint {
            config_hash: format!("{:016x}", fnv1a64(text.as_bytes())),
            checkpoint: checkpoint
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            checkpoint_crc32: checkpoint_crc32(checkpoint)?,
        })
    }

    /// `Ok` when `self` (the index's) is `model`'s; otherwise an error that
    /// names both and says what to do.
    pub fn check(&self, index: &Path, model: &Fingerprint, run: &Path) -> Result<()> {
        if self == model {
            return Ok(());
        }
        let what = if self.config_hash != model.config_hash {
            format!(
                "its model config hash is {}, the run's {}",
                self.config_hash, model.config_hash
            )
        } else {
            format!(
                "it was embedded with checkpoint {} (CRC-32 {}), the run loads {} (CRC-32 {})",
                self.checkpoint, self.checkpoint_crc32, model.checkpoint, model.checkpoint_crc32
            )
        };
        Err(Error::Config(format!(
            "index {} does not belong to run {}: {what}; embed again with this run \
             (`vlmatch embed --checkpoint {}`) or search with the run that built it",
            index.display(),
            run.display(),
            run.display()
        )))
    }
}

/// `"CRC LEN"` of a checkpoint: its `.crc32` file (written and verified
/// with it), or computed where the file has none.
fn checkpoint_crc32(path: &Path) -> Result<String> {
    let mut check = path.as_os_str().to_owned();
    check.push(".crc32");
    if let Ok(text) = std::fs::read_to_string(PathBuf::from(check)) {
        return Ok(text.trim().to_string());
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(format!("{:08x} {}", crc32fast::hash(&bytes), bytes.len()))
}

/// How embeddings are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    F16,
    F32,
}

impl std::str::FromStr for Dtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Dtype, String> {
        match s {
            "f16" | "fp16" => Ok(Dtype::F16),
            "f32" | "fp32" => Ok(Dtype::F32),
            _ => Err(format!("`{s}`: expected f16 or f32")),
        }
    }
}

impl Dtype {
    pub fn kind(self) -> Kind {
        match self {
            Dtype::F16 => Kind::Half,
            Dtype::F32 => Kind::Float,
        }
    }
    pub fn bytes(self) -> usize {
        match self {
            Dtype::F16 => 2,
            Dtype::F32 => 4,
        }
    }
}

/// Where the index's items came from, as `embed` was told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceSpec {
    /// `folder`, `annotations`, `shards` or `captions` (a text file).
    pub kind: String,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_root: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub model: Fingerprint,
    pub dtype: Dtype,
    /// Embedding width.
    pub dim: usize,
    /// Rows per chunk file.
    pub chunk: usize,
    pub source: SourceSpec,
    pub images: usize,
    pub texts: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageItem {
    pub id: i64,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextItem {
    /// Position among the index's captions.
    pub id: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_id: Option<i64>,
    pub caption: String,
}

/// Chunks done per kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub images: usize,
    pub texts: usize,
}

/// The two kinds of items an index holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Items {
    Images,
    Texts,
}

impl Items {
    pub fn name(self) -> &'static str {
        match self {
            Items::Images => "images",
            Items::Texts => "texts",
        }
    }
}

/// Paths of an index directory.
pub fn manifest_path(dir: &Path) -> PathBuf {
    dir.join("manifest.json")
}
pub fn progress_path(dir: &Path) -> PathBuf {
    dir.join("progress.json")
}
pub fn items_path(dir: &Path, kind: Items) -> PathBuf {
    dir.join(format!("{}.jsonl", kind.name()))
}
pub fn chunk_path(dir: &Path, kind: Items, chunk: usize) -> PathBuf {
    dir.join(kind.name()).join(format!("{chunk:05}.bin"))
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: Some(e.line()),
        message: format!("not a vlmatch index file: {e}"),
    })
}

pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = manifest_path(dir);
    if !path.is_file() {
        return Err(Error::Config(format!(
            "{} is not an index: it has no manifest.json (make one with `vlmatch embed`)",
            dir.display()
        )));
    }
    let m: Manifest = read_json(&path)?;
    if m.format != FORMAT || m.version != VERSION {
        return Err(Error::Data {
            path,
            line: None,
            message: format!(
                "format `{}` version {}; this vlmatch reads `{FORMAT}` version {VERSION}",
                m.format, m.version
            ),
        });
    }
    Ok(m)
}

pub fn read_progress(dir: &Path) -> Result<Progress> {
    let path = progress_path(dir);
    if !path.is_file() {
        return Ok(Progress::default());
    }
    read_json(&path)
}

pub fn write_progress(dir: &Path, p: Progress) -> Result<()> {
    let text = serde_json::to_string(&p).expect("serialisable") + "\n";
    crate::durable::write(&progress_path(dir), text)
}

/// JSON lines of `items`.
pub fn jsonl<T: Serialize>(items: &[T]) -> String {
    let mut s = String::new();
    for it in items {
        s += &serde_json::to_string(it).expect("serialisable");
        s.push('\n');
    }
    s
}

fn read_items<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .map(|(n, l)| {
            serde_json::from_str(l).map_err(|e| Error::Data {
                path: path.to_path_buf(),
                line: Some(n + 1),
                message: format!("not an index item: {e}"),
            })
        })
        .collect()
}

/// Chunks of `n` rows at `chunk` rows each.
pub fn chunks(n: usize, chunk: usize) -> usize {
    n.div_ceil(chunk.max(1))
}

/// Unit embeddings `[rows, dim]` as the bytes of a chunk file.
pub fn to_bytes(embeds: &Tensor, dtype: Dtype) -> Result<Vec<u8>> {
    let t = embeds
        .to_device(Device::Cpu)
        .to_kind(dtype.kind())
        .contiguous()
        .view([-1])
        .view_dtype(Kind::Uint8);
    Ok(Vec::<u8>::try_from(t)?)
}

/// A complete index, read back.
pub struct Index {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub images: Vec<ImageItem>,
    pub texts: Vec<TextItem>,
}

impl Index {
    /// Open a complete index (every chunk written); an unfinished one is an
    /// error that says to finish it with `vlmatch embed`.
    pub fn open(dir: &Path) -> Result<Index> {
        if cfg!(target_endian = "big") {
            return Err(Error::Config(
                "indexes store little-endian numbers; this machine is big-endian".into(),
            ));
        }
        let manifest = read_manifest(dir)?;
        let progress = read_progress(dir)?;
        let want = Progress {
            images: chunks(manifest.images, manifest.chunk),
            texts: chunks(manifest.texts, manifest.chunk),
        };
        if progress != want {
            return Err(Error::Config(format!(
                "index {} is unfinished ({} of {} image chunks, {} of {} caption chunks); \
                 run the same `vlmatch embed` again to finish it",
                dir.display(),
                progress.images,
                want.images,
                progress.texts,
                want.texts
            )));
        }
        let images: Vec<ImageItem> = if manifest.images > 0 {
            read_items(&items_path(dir, Items::Images))?
        } else {
            Vec::new()
        };
        let texts: Vec<TextItem> = if manifest.texts > 0 {
            read_items(&items_path(dir, Items::Texts))?
        } else {
            Vec::new()
        };
        for (kind, got, want) in [
            (Items::Images, images.len(), manifest.images),
            (Items::Texts, texts.len(), manifest.texts),
        ] {
            if got != want {
                return Err(Error::Data {
                    path: items_path(dir, kind),
                    line: None,
                    message: format!("{got} items, but manifest.json says {want}"),
                });
            }
        }
        Ok(Index {
            dir: dir.to_path_buf(),
            manifest,
            images,
            texts,
        })
    }

    /// The embeddings of `kind` as `[n, dim]` f32 on the CPU (stored f16
    /// widened exactly).
    pub fn embeddings(&self, kind: Items) -> Result<Tensor> {
        let m = &self.manifest;
        let n = match kind {
            Items::Images => m.images,
            Items::Texts => m.texts,
        };
        let mut bytes = Vec::with_capacity(n * m.dim * m.dtype.bytes());
        for c in 0..chunks(n, m.chunk) {
            let path = chunk_path(&self.dir, kind, c);
            let b = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let rows = m.chunk.min(n - c * m.chunk);
            let want = rows * m.dim * m.dtype.bytes();
            if b.len() != want {
                return Err(Error::Data {
                    path,
                    line: None,
                    message: format!(
                        "{} bytes, expected {want} ({rows} rows of {} {:?} values)",
                        b.len(),
                        m.dim,
                        m.dtype
                    ),
                });
            }
            bytes.extend_from_slice(&b);
        }
        if n == 0 {
            return Ok(Tensor::zeros([0, m.dim as i64], (Kind::Float, Device::Cpu)));
        }
        Ok(Tensor::from_slice(&bytes)
            .view_dtype(m.dtype.kind())
            .view([n as i64, m.dim as i64])
            .to_kind(Kind::Float))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn chunk_bytes_round_trip_through_both_dtypes() {
        let t = Tensor::from_slice(&[0.5f32, -0.25, 1.0, 0.125, 3.0, -2.0]).view([2, 3]);
        for dtype in [Dtype::F16, Dtype::F32] {
            let b = to_bytes(&t, dtype).unwrap();
            assert_eq!(b.len(), 6 * dtype.bytes());
            let back = Tensor::from_slice(&b)
                .view_dtype(dtype.kind())
                .view([2, 3])
                .to_kind(Kind::Float);
            assert_eq!(
                Vec::<f32>::try_from(back.view([-1])).unwrap(),
                [0.5, -0.25, 1.0, 0.125, 3.0, -2.0]
            );
        }
    }
}
