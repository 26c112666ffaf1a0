//! An index over an ALBEF/BLIP annotation file (JSON lines, or a JSON
//! array), so that a file of millions of captions is not held in memory:
//! captions and image paths stay in the file and are read by offset; the
//! index holds, per caption, where its entry lies, which of the entry's
//! captions it is and its image, and per image, the entry naming it, its
//! line and its id (24 bytes each).
//!
//! The index is built once, by the same rules as
//! [`super::annotations::load_checked_within`] (the same entries skipped or
//! refused, the same image order and ids), and cached beside the file as
//! `.NAME.vlmatch-index`, or under the per-user cache
//! (`$XDG_CACHE_HOME/vlmatch/index`, else `~/.cache/vlmatch/index`) when
//! that directory cannot be written. A cached index is used only while its
//! key matches: the file's size, modification time and a hash of its first
//! and last 64 KiB, and the settings it was built under (image root, text
//! field, `data.on_error`, the annotation limits). It is memory-mapped
//! read-only, so ranks on one machine share its pages. Where neither place
//! can be written, the index is built in this process's memory (a warning
//! says so; 24 bytes per caption, not shared, built again at each start).
//!
//! Karpathy-format files (one JSON object) are not indexed: they are small
//! and loaded whole ([`AnnotationIndex::open_indexable`] says `None`).

mod build;

use super::annotations::{bad, AnnotationLimits};
use super::{resolve_under, Dataset, ImageRef, OnError, Pair, PairStore};
use build::{build, fnv, Place, ENDS, FNV0, HEADER, MAGIC, RECORD};
use serde_json::Value;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch_core::{Error, Result};

/// The file at `path`, open, and its cache key as it is now: size,
/// modification time, and the hash of its first and last 64 KiB.
fn file_key(path: &Path) -> Result<(File, [u64; 4])> {
    let file = File::open(path).map_err(|e| Error::io(path, e))?;
    let meta = file.metadata().map_err(|e| Error::io(path, e))?;
    let size = meta.len();
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let mut head = vec![0u8; size.min(ENDS) as usize];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| Error::io(path, e))?;
    let n = size.min(ENDS);
    let mut tail = vec![0u8; n as usize];
    file.read_exact_at(&mut tail, size - n)
        .map_err(|e| Error::io(path, e))?;
    let hash = fnv(fnv(FNV0, &head), &tail);
    let key = [size, mtime.as_secs(), u64::from(mtime.subsec_nanos()), hash];
    Ok((file, key))
}

/// The index's bytes: a read-only shared mapping of its cache file, or
/// built in memory where no cache could be written.
enum Bytes {
    Mapped(Mapped),
    Owned(Vec<u8>),
}

impl Bytes {
    fn bytes(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m.bytes(),
            Bytes::Owned(v) => v,
        }
    }
}

/// A read-only shared mapping of an index file.
struct Mapped {
    ptr: *const u8,
    len: usize,
}

// SAFETY: the mapping is read-only and lives until `Mapped` is dropped.
unsafe impl Send for Mapped {}
unsafe impl Sync for Mapped {}

impl Mapped {
    fn open(path: &Path) -> std::io::Result<Mapped> {
        use std::os::fd::AsRawFd;
        let file = File::open(path)?;
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(std::io::Error::other("empty index"));
        }
        // SAFETY: a fresh read-only mapping of a file we opened; the file
        // is replaced only by rename, never written in place.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapped {
            ptr: ptr as *const u8,
            len,
        })
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `ptr` maps `len` readable bytes while `self` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmapping what `open` mapped, once.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// An annotation file opened through its index.
pub struct AnnotationIndex {
    file: PathBuf,
    /// The annotation file, open for reading by offset (the file as it was
    /// opened, should it be replaced later).
    reader: File,
    root: PathBuf,
    text_key: String,
    lines: bool,
    map: Bytes,
    images: usize,
    pairs: usize,
    /// Entries dropped when the index was built (`data.on_error = "skip"`).
    pub skipped: usize,
    /// The index file used; `None` when no cache could be written and the
    /// index is held in memory.
    pub cache: Option<PathBuf>,
    /// Whether it was read from the cache rather than built now.
    pub cached: bool,
}

impl std::fmt::Debug for AnnotationIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnnotationIndex")
            .field("file", &self.file)
            .field("pairs", &self.pairs)
            .field("images", &self.images)
            .field("cache", &self.cache)
            .finish()
    }
}

/// Where a file's index is cached: beside it, and in the per-user cache.
fn cache_paths(file: &Path) -> Vec<PathBuf> {
    let name = file.file_name().unwrap_or_default().to_string_lossy();
    let mut out = vec![file.with_file_name(format!(".{name}.vlmatch-index"))];
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
    if let Some(base) = base {
        let full = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
        let h = fnv(FNV0, full.to_string_lossy().as_bytes());
        out.push(
            base.join("vlmatch")
                .join("index")
                .join(format!("{h:016x}-{name}.vlmatch-index")),
        );
    }
    out
}

impl AnnotationIndex {
    /// The index of the annotation file `path` (image paths under
    /// `image_root`, default the file's directory), from the cache when its
    /// key matches, else built and cached. A Karpathy-format file is an
    /// error (it is loaded whole).
    pub fn open(
        path: &Path,
        image_root: Option<&Path>,
        on_error: OnError,
        limits: AnnotationLimits,
    ) -> Result<AnnotationIndex> {
        Self::open_indexable(path, image_root, on_error, limits)?.ok_or_else(|| {
            bad(
                path,
                None,
                "a Karpathy-format file is not indexed; it is loaded whole".into(),
            )
        })
    }

    /// [`AnnotationIndex::open`], or `None` for a Karpathy-format file.
    pub fn open_indexable(
        path: &Path,
        image_root: Option<&Path>,
        on_error: OnError,
        limits: AnnotationLimits,
    ) -> Result<Option<AnnotationIndex>> {
        let root = image_root
            .map(Path::to_path_buf)
            .unwrap_or_else(|| path.parent().map(Path::to_path_buf).unwrap_or_default());
        let text_key = "caption";
        let settings = fnv(
            FNV0,
            format!(
                "{}\0{text_key}\0{on_error:?}\0{}\0{}",
                root.display(),
                limits.line_bytes,
                limits.captions
            )
            .as_bytes(),
        );
        let (reader, key) = file_key(path)?;
        let want = [key[0], key[1], key[2], key[3], settings];
        let places = cache_paths(path);
        let open = |bytes: Bytes, cache: Option<&Path>, reader: File| {
            Self::from_map(bytes, &want, path, &root, text_key, cache, reader)
        };
        for cache in &places {
            if let Ok(map) = Mapped::open(cache) {
                let reader = reader.try_clone().map_err(|e| Error::io(path, e))?;
                if let Some(ix) = open(Bytes::Mapped(map), Some(cache), reader) {
                    return Ok(Some(ix));
                }
            }
        }
        let Some(bytes) = build(path, &root, text_key, on_error, limits, &want)? else {
            return Ok(None);
        };
        let unreadable = |what: &str| {
            Error::Config(format!(
                "{}: the index just built is unreadable ({what})",
                path.display()
            ))
        };
        for cache in &places {
            if let Some(dir) = cache.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            if crate::durable::write(cache, &bytes).is_ok() {
                let map = Mapped::open(cache).map_err(|e| Error::io(cache, e))?;
                let reader = reader.try_clone().map_err(|e| Error::io(path, e))?;
                let mut ix = open(Bytes::Mapped(map), Some(cache), reader)
                    .ok_or_else(|| unreadable(&cache.display().to_string()))?;
                ix.cached = false;
                return Ok(Some(ix));
            }
        }
        tracing::warn!(
            "{}: could not write its index beside it or under the per-user cache ({}); \
             it is held in memory (24 bytes per caption, built again at each start, not \
             shared between ranks)",
            path.display(),
            places
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut ix =
            open(Bytes::Owned(bytes), None, reader).ok_or_else(|| unreadable("in memory"))?;
        ix.cached = false;
        Ok(Some(ix))
    }

    /// The index in `map` if its header matches `want` and its size its
    /// counts.
    fn from_map(
        map: Bytes,
        want: &[u64; 5],
        file: &Path,
        root: &Path,
        text_key: &str,
        cache: Option<&Path>,
        reader: File,
    ) -> Option<AnnotationIndex> {
        let b = map.bytes();
        if b.len() < HEADER || &b[..8] != MAGIC {
            return None;
        }
        let h: Vec<u64> = (0..10).map(|i| u64_at(b, 8 + 8 * i)).collect();
        if h[..5] != want[..] {
            return None;
        }
        // Nothing in the cache is believed: its counts must fit its size
        // (checked arithmetic), and every record must lie in the file
        // indexed (whose size is `want[0]`) and name an image it has.
        let (images, pairs) = (usize::try_from(h[6]).ok()?, usize::try_from(h[7]).ok()?);
        let records = images.checked_add(pairs)?;
        if b.len() != RECORD.checked_mul(records)?.checked_add(HEADER)? {
            return None;
        }
        if fnv(FNV0, &b[HEADER..]) != h[9] {
            return None;
        }
        let size = want[0];
        let within = |r: &[u8]| {
            let place = Self::place(r);
            place
                .offset
                .checked_add(u64::from(place.len))
                .is_some_and(|end| end <= size)
        };
        let record = |i: usize| &b[HEADER + RECORD * i..HEADER + RECORD * (i + 1)];
        let images_ok = (0..images).all(|i| within(record(i)));
        let pairs_ok = (images..records)
            .all(|i| within(record(i)) && (u32_at(record(i), 16) as usize) < images);
        if !(images_ok && pairs_ok) {
            return None;
        }
        Some(AnnotationIndex {
            file: file.to_path_buf(),
            reader,
            root: root.to_path_buf(),
            text_key: text_key.to_string(),
            lines: h[5] == 0,
            images,
            pairs,
            skipped: h[8] as usize,
            map,
            cache: cache.map(Path::to_path_buf),
            cached: true,
        })
    }

    /// Captions indexed (pairs).
    pub fn len(&self) -> usize {
        self.pairs
    }

    pub fn is_empty(&self) -> bool {
        self.pairs == 0
    }

    /// Distinct images.
    pub fn image_count(&self) -> usize {
        self.images
    }

    fn record(&self, i: usize) -> &[u8] {
        let at = HEADER + RECORD * i;
        &self.map.bytes()[at..at + RECORD]
    }

    fn place(r: &[u8]) -> Place {
        Place {
            offset: u64_at(r, 0),
            len: u32_at(r, 8),
            number: u32_at(r, 12),
        }
    }

    /// Image `image`'s id.
    pub fn image_id(&self, image: usize) -> i64 {
        u64_at(self.record(image), 16) as i64
    }

    /// The image of pair `i`.
    pub fn pair_image(&self, i: usize) -> usize {
        u32_at(self.record(self.images + i), 16) as usize
    }

    /// The entry at `place`, read from the file.
    fn entry(&self, place: Place) -> Result<Value> {
        let mut buf = vec![0u8; place.len as usize];
        self.reader
            .read_exact_at(&mut buf, place.offset)
            .map_err(|e| Error::io(&self.file, e))?;
        serde_json::from_slice(&buf).map_err(|e| {
            bad(
                &self.file,
                self.lines.then_some(place.number as usize),
                format!("changed since it was indexed: {e}"),
            )
        })
    }

    /// Pair `i`'s caption, read from the file.
    pub fn caption(&self, i: usize) -> Result<String> {
        let r = self.record(self.images + i);
        let k = u32_at(r, 12) as usize;
        let place = Place {
            number: 0,
            ..Self::place(r)
        };
        let v = self.entry(place)?;
        let text = match v.get(&self.text_key) {
            Some(Value::String(s)) if k == 0 => Some(s.clone()),
            Some(Value::Array(list)) => list.get(k).and_then(Value::as_str).map(String::from),
            _ => None,
        };
        text.ok_or_else(|| {
            bad(
                &self.file,
                None,
                format!("changed since it was indexed (caption {k} of pair {i})"),
            )
        })
    }

    /// Image `image`'s file, and where it was named (`FILE:LINE` or `FILE
    /// entry N`).
    pub fn image(&self, image: usize) -> Result<(PathBuf, String)> {
        let place = Self::place(self.record(image));
        let v = self.entry(place)?;
        let rel = v.get("image").and_then(Value::as_str).ok_or_else(|| {
            bad(
                &self.file,
                None,
                format!("changed since it was indexed (image {image})"),
            )
        })?;
        let path = resolve_under(&self.root, rel).map_err(|m| bad(&self.file, None, m))?;
        Ok((path, origin(&self.file, self.lines, place.number)))
    }

    /// The whole file as a [`Dataset`], pairs and images in the index's
    /// order: what [`super::annotations::load_checked_within`] returns.
    pub fn to_dataset(&self) -> Result<Dataset> {
        let mut ds = Dataset {
            name: self.file.display().to_string(),
            images: Vec::with_capacity(self.images),
            image_ids: Vec::with_capacity(self.images),
            pairs: Vec::with_capacity(self.pairs),
            skipped: self.skipped,
            store: None,
        };
        for i in 0..self.images {
            let (path, origin) = self.image(i)?;
            ds.images.push(ImageRef::File {
                path,
                origin,
                bytes: None,
            });
            ds.image_ids.push(self.image_id(i));
        }
        for i in 0..self.pairs {
            ds.pairs.push(Pair {
                image: self.pair_image(i),
                caption: self.caption(i)?,
            });
        }
        Ok(ds)
    }
}

impl PairStore for AnnotationIndex {
    fn len(&self) -> usize {
        self.pairs
    }
    fn image_count(&self) -> usize {
        self.images
    }
    fn pair_image(&self, pair: usize) -> usize {
        AnnotationIndex::pair_image(self, pair)
    }
    fn image_id(&self, image: usize) -> i64 {
        AnnotationIndex::image_id(self, image)
    }
    fn caption(&self, pair: usize) -> Result<String> {
        AnnotationIndex::caption(self, pair)
    }
    fn image(&self, image: usize) -> Result<ImageRef> {
        let (path, origin) = AnnotationIndex::image(self, image)?;
        Ok(ImageRef::File {
            path,
            origin,
            bytes: None,
        })
    }
}

/// The annotation file `path` as a [`Dataset`] read through its index
/// (pairs and images read from the file on demand), with the same pairs,
/// images, ids and skipped entries as
/// [`super::annotations::load_checked_within`]; `None` for a
/// Karpathy-format file, which is loaded whole.
pub fn open_dataset(
    path: &Path,
    image_root: Option<&Path>,
    on_error: OnError,
    limits: AnnotationLimits,
) -> Result<Option<Dataset>> {
    let Some(ix) = AnnotationIndex::open_indexable(path, image_root, on_error, limits)? else {
        return Ok(None);
    };
    let skipped = ix.skipped;
    if skipped > 0 && ix.cached {
        tracing::warn!(
            "{}: skipped {skipped} bad entries (data.on_error = \"skip\"; counted when \
             its index was built)",
            path.display()
        );
    }
    let name = path.display().to_string();
    Ok(Some(Dataset::stored(name, Arc::new(ix), skipped)))
}

fn origin(file: &Path, lines: bool, number: u32) -> String {
    if lines {
        format!("{}:{number}", file.display())
    } else {
        format!("{} entry {number}", file.display())
    }
}
