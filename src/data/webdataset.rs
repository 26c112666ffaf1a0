//! WebDataset tar shards (`data.source = "webdataset"`).
//!
//! A shard is a POSIX tar file; a sample is a run of consecutive members
//! sharing a key (the member name up to the first dot of its file name,
//! directory included): an image `KEY.jpg`, `KEY.jpeg` or `KEY.png` and a
//! caption `KEY.txt` (the text) or `KEY.json` (an object with `caption`, a
//! string or a list of strings, or `text`; optionally `image_id`). Other
//! members are ignored. A sample gives one pair per caption; its image id is
//! the JSON `image_id`, else a stable hash of the key.
//!
//! Training streams the shards ([`PairStream`]): each epoch reads them one
//! after the other in an order drawn from the seed and the epoch, and emits
//! pairs through a shuffle buffer, so only the buffer is in memory. The
//! stream is a function of the seed; a resumed run replays it, skipping pairs
//! without reading their images. In data-parallel training every rank walks
//! the same stream and reads the images of its own part of each global batch
//! only ([`PairStream::next_part`]): exactly the pairs one process would
//! train on, each image read by one rank. (Splitting the shards between
//! ranks instead would read less but change the order, and with it what a
//! run computes, whenever the rank count changes.) [`load_shards`] reads a
//! (small) shard set into an in-memory [`Dataset`] for evaluation.

use super::tar::{read_at, Member, TarReader};
use super::{Dataset, ImageBytes, ImageRef, OnError, Pair};
use crate::rng::{mix, Rng};
use serde_json::Value;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use vlmatch_core::{Error, Result};

/// The most names one pattern may expand to.
const MAX_EXPANSION: usize = 1_000_000;

/// Expand brace expressions: ranges `{000..012}` (zero padding kept when a
/// bound has a leading zero), descending ranges `{3..1}`, and lists `{a,b}`;
/// several braces give every combination, in order.
pub fn expand_braces(pattern: &str) -> std::result::Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        if pattern.contains('}') {
            return Err("unmatched `}`".into());
        }
        return Ok(vec![pattern.to_string()]);
    };
    let head = &pattern[..open];
    if head.contains('}') {
        return Err("unmatched `}`".into());
    }
    let close = pattern[open..]
        .find('}')
        .map(|c| open + c)
        .ok_or("unmatched `{`")?;
    let body = &pattern[open + 1..close];
    if body.contains('{') {
        return Err("nested braces are not supported".into());
    }
    let alternatives = alternatives(body)?;
    let tails = expand_braces(&pattern[close + 1..])?;
    if alternatives.len().saturating_mul(tails.len()) > MAX_EXPANSION {
        return Err(format!("expands to more than {MAX_EXPANSION} names"));
    }
    let mut out = Vec::with_capacity(alternatives.len() * tails.len());
    for a in &alternatives {
        for t in &tails {
            out.push(format!("{head}{a}{t}"));
        }
    }
    Ok(out)
}

fn alternatives(body: &str) -> std::result::Result<Vec<String>, String> {
    if let Some((a, b)) = body.split_once("..") {
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return Err(format!(
                "`{{{body}}}`: a range needs two non-negative integers"
            ));
        }
        let (x, y): (u64, u64) = match (a.parse(), b.parse()) {
            (Ok(x), Ok(y)) => (x, y),
            _ => return Err(format!("`{{{body}}}`: bounds too large")),
        };
        if x.abs_diff(y) >= MAX_EXPANSION as u64 {
            return Err(format!(
                "`{{{body}}}` expands to more than {MAX_EXPANSION} names"
            ));
        }
        let padded = |s: &str| s.len() > 1 && s.starts_with('0');
        let width = if padded(a) || padded(b) {
            a.len().max(b.len())
        } else {
            0
        };
        let values: Vec<u64> = if x <= y {
            (x..=y).collect()
        } else {
            (y..=x).rev().collect()
        };
        return Ok(values.iter().map(|v| format!("{v:0width$}")).collect());
    }
    if body.contains(',') {
        return Ok(body.split(',').map(str::to_string).collect());
    }
    Err(format!(
        "`{{{body}}}` is neither a range `{{A..B}}` nor a list `{{a,b}}`"
    ))
}

/// What one shard sample may make a reader hold, each checked before the
/// data is read: a member over its cap, or a caption list over its length,
/// is a bad sample naming the shard, the member and the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLimits {
    /// `data.max_image_bytes`: the largest image member (default 64 MiB).
    pub image_bytes: u64,
    /// `data.max_text_bytes`: the largest `.txt` or `.json` member (default
    /// 1 MiB).
    pub text_bytes: u64,
    /// `data.max_captions_per_image`: the longest caption list (default 1000).
    pub captions: usize,
}

impl Default for MemberLimits {
    fn default() -> Self {
        MemberLimits {
            image_bytes: 64 << 20,
            text_bytes: 1 << 20,
            captions: 1000,
        }
    }
}

impl MemberLimits {
    /// The caps of a `[data]` section.
    pub fn from_config(data: &vlmatch_registry::config::DataConfig) -> Self {
        MemberLimits {
            image_bytes: data.max_image_bytes,
            text_bytes: data.max_text_bytes,
            captions: data.max_captions_per_image,
        }
    }
}

/// A resolved shard set and the stream's shuffle buffer size.
#[derive(Debug, Clone)]
pub struct Shards {
    pub pattern: String,
    pub paths: Vec<PathBuf>,
    /// Pairs held in the shuffle buffer (`data.shuffle_buffer`).
    pub shuffle_buffer: usize,
    /// Caps on members and caption lists ([`MemberLimits::default`] unless
    /// set with [`Shards::with_limits`]).
    pub limits: MemberLimits,
}

impl Shards {
    /// Expand `pattern` (relative to the working directory); every name must
    /// be a file. `what` names the input in errors, e.g. a config key.
    pub fn resolve(pattern: &str, what: &str, shuffle_buffer: usize) -> Result<Shards> {
        let names = expand_braces(pattern)
            .map_err(|m| Error::Config(format!("{what}: pattern `{pattern}`: {m}")))?;
        let paths: Vec<PathBuf> = names.into_iter().map(PathBuf::from).collect();
        if let Some(missing) = paths.iter().find(|p| !p.is_file()) {
            let cwd = std::env::current_dir().unwrap_or_default();
            return Err(Error::Config(format!(
                "{what}: pattern `{pattern}`: shard {} not found (paths are relative to the \
                 working directory, {})",
                missing.display(),
                cwd.display()
            )));
        }
        Ok(Shards {
            pattern: pattern.to_string(),
            paths,
            shuffle_buffer,
            limits: MemberLimits::default(),
        })
    }

    /// These shards read under `limits` (the config's
    /// [`MemberLimits::from_config`]).
    pub fn with_limits(mut self, limits: MemberLimits) -> Self {
        self.limits = limits;
        self
    }
}

/// A member's data: read, or (an image) where to read it later.
#[derive(Clone)]
enum ImageData {
    Bytes(Arc<Vec<u8>>),
    At { offset: u64, len: u64 },
}

/// Members of one key, as read.
struct Raw {
    key: String,
    image: Option<(String, ImageData)>,
    txt: Option<(String, Arc<Vec<u8>>)>,
    json: Option<(String, Arc<Vec<u8>>)>,
    /// Why the sample is refused: a member over its size cap, not read.
    refused: Option<String>,
}

/// A complete sample.
struct Sample {
    /// The image member's name.
    member: String,
    image: ImageData,
    captions: Vec<String>,
    image_id: i64,
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

fn data_error(path: &Path, message: String) -> Error {
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

    fn finish(self, shard: &Path, limits: &MemberLimits) -> Result<Sample> {
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

/// Samples of one shard, in archive order.
struct ShardReader {
    path: PathBuf,
    tar: TarReader<BufReader<File>>,
    pending: Option<Raw>,
    limits: MemberLimits,
}

impl ShardReader {
    fn open(path: &Path, limits: MemberLimits) -> Result<ShardReader> {
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
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
    fn next_raw(&mut self, load_images: bool) -> Result<Option<Raw>> {
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

/// Read every shard of `pattern` (relative to the working directory) in
/// order into memory, for evaluation. Bad samples fail, or are skipped with a
/// warning under [`OnError::Skip`].
pub fn load_shards(pattern: &str, on_error: OnError) -> Result<Dataset> {
    load_shards_with(pattern, on_error, MemberLimits::default())
}

/// [`load_shards`] under the config's member `limits`.
pub fn load_shards_with(pattern: &str, on_error: OnError, limits: MemberLimits) -> Result<Dataset> {
    let shards = Shards::resolve(pattern, "shards", 1)?.with_limits(limits);
    let mut ds = Dataset {
        name: pattern.to_string(),
        images: Vec::new(),
        image_ids: Vec::new(),
        pairs: Vec::new(),
        skipped: 0,
    };
    for path in &shards.paths {
        let mut reader = ShardReader::open(path, limits)?;
        loop {
            // An unreadable archive ends the shard; a bad sample only itself.
            let (sample, end) = match reader.next_raw(true) {
                Ok(None) => break,
                Ok(Some(raw)) => (raw.finish(path, &limits), false),
                Err(e) => (Err(e), true),
            };
            let sample = match (sample, on_error) {
                (Ok(s), _) => s,
                (Err(e), OnError::Fail) => {
                    return Err(super::with_skip_hint(e, "skips such samples"))
                }
                (Err(e), OnError::Skip) => {
                    tracing::warn!("skipped: {e}");
                    ds.skipped += 1;
                    if end {
                        break;
                    }
                    continue;
                }
            };
            let ImageData::Bytes(bytes) = sample.image else {
                unreachable!("images are read when loading");
            };
            ds.images.push(ImageRef::File {
                path: path.join(&sample.member),
                origin: path.display().to_string(),
                bytes: Some(ImageBytes(bytes)),
            });
            ds.image_ids.push(sample.image_id);
            let image = ds.images.len() - 1;
            for caption in sample.captions {
                ds.pairs.push(Pair { image, caption });
            }
        }
    }
    if ds.skipped > 0 {
        tracing::warn!(
            "{pattern}: skipped {} bad samples (data.on_error = \"skip\")",
            ds.skipped
        );
    }
    if ds.pairs.is_empty() {
        return Err(Error::Config(format!(
            "shards `{pattern}`: no image-caption samples"
        )));
    }
    Ok(ds)
}

/// One pair of the stream.
struct StreamPair {
    shard: usize,
    member: String,
    image: ImageData,
    caption: String,
    image_id: i64,
}

/// One epoch's reading state.
struct Epoch {
    order: Vec<usize>,
    next_shard: usize,
    reader: Option<(usize, ShardReader)>,
    buffer: Vec<StreamPair>,
    /// All shards read: the buffer drains.
    exhausted: bool,
    rng: Rng,
    emitted: u64,
}

/// The endless pair stream of a shard set: epoch after epoch, each a shard
/// order and a shuffle-buffer order drawn from the seed and the epoch.
pub struct PairStream {
    shards: Shards,
    seed: Option<u64>,
    on_error: OnError,
    skipped: Arc<AtomicUsize>,
    epoch: u64,
    /// Pairs in an epoch, once one has been read through.
    epoch_len: Option<u64>,
    state: Option<Epoch>,
}

impl PairStream {
    /// The stream of `shards`; `seed` `None` reads shards and samples in
    /// order. Skipped samples are counted in `skipped`.
    pub fn new(
        shards: Shards,
        seed: Option<u64>,
        on_error: OnError,
        skipped: Arc<AtomicUsize>,
    ) -> Self {
        PairStream {
            shards,
            seed,
            on_error,
            skipped,
            epoch: 0,
            epoch_len: None,
            state: None,
        }
    }

    fn start_epoch(&self) -> Epoch {
        let mut order: Vec<usize> = (0..self.shards.paths.len()).collect();
        let seed = self.seed.unwrap_or(0);
        if self.seed.is_some() {
            Rng::new(mix(&[seed, self.epoch, 0x5_4A2D])).shuffle(&mut order);
        }
        Epoch {
            order,
            next_shard: 0,
            reader: None,
            buffer: Vec::new(),
            exhausted: false,
            rng: Rng::new(mix(&[seed, self.epoch, 0xB_0FFE])),
            emitted: 0,
        }
    }

    /// A bad sample or shard: an error, or (skipping) a warning and a count.
    fn bad(&self, e: Error, report: bool) -> Result<()> {
        match self.on_error {
            OnError::Fail => Err(super::with_skip_hint(e, "skips such samples")),
            OnError::Skip => {
                if report {
                    tracing::warn!("skipped: {e}");
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            }
        }
    }

    /// Read the next sample of the epoch into the buffer; false when every
    /// shard has been read.
    fn fill(&mut self, load_images: bool) -> Result<bool> {
        loop {
            let st = self.state.as_mut().expect("epoch started");
            if st.reader.is_none() {
                let Some(&shard) = st.order.get(st.next_shard) else {
                    return Ok(false);
                };
                st.next_shard += 1;
                match ShardReader::open(&self.shards.paths[shard], self.shards.limits) {
                    Ok(r) => st.reader = Some((shard, r)),
                    Err(e) => self.bad(e, load_images)?,
                }
                continue;
            }
            let (shard, reader) = st.reader.as_mut().expect("checked");
            let shard = *shard;
            let sample = match reader.next_raw(load_images) {
                Ok(None) => {
                    st.reader = None;
                    continue;
                }
                Ok(Some(raw)) => raw.finish(&self.shards.paths[shard], &self.shards.limits),
                Err(e) => {
                    // The rest of a corrupt shard is unreadable.
                    st.reader = None;
                    Err(e)
                }
            };
            match sample {
                Ok(s) => {
                    for caption in s.captions {
                        st.buffer.push(StreamPair {
                            shard,
                            member: s.member.clone(),
                            image: s.image.clone(),
                            caption,
                            image_id: s.image_id,
                        });
                    }
                    return Ok(true);
                }
                Err(e) => self.bad(e, load_images)?,
            }
        }
    }

    /// The next pair; its image is read when `load_images`.
    fn next_pair(&mut self, load_images: bool) -> Result<StreamPair> {
        let cap = match self.seed {
            Some(_) => self.shards.shuffle_buffer.max(1),
            None => 1,
        };
        loop {
            if self.state.is_none() {
                self.state = Some(self.start_epoch());
            }
            let st = self.state.as_mut().expect("just started");
            if !st.buffer.is_empty() && (st.exhausted || st.buffer.len() >= cap) {
                let j = st.rng.below(st.buffer.len());
                let mut pair = st.buffer.swap_remove(j);
                st.emitted += 1;
                if let (true, ImageData::At { offset, len }) = (load_images, &pair.image) {
                    let path = &self.shards.paths[pair.shard];
                    let bytes = read_at(path, *offset, *len)
                        .map_err(|e| data_error(path, format!("member {}: {e}", pair.member)))?;
                    pair.image = ImageData::Bytes(Arc::new(bytes));
                }
                return Ok(pair);
            }
            if st.exhausted {
                if st.emitted == 0 {
                    return Err(Error::Config(format!(
                        "config key `data.shards`: `{}` holds no image-caption samples",
                        self.shards.pattern
                    )));
                }
                self.epoch_len = Some(st.emitted);
                self.epoch += 1;
                self.state = None;
                continue;
            }
            if !self.fill(load_images)? {
                self.state.as_mut().expect("started").exhausted = true;
            }
        }
    }

    /// Pass over the next `n` pairs without reading their images (whole
    /// epochs at once once an epoch's length is known).
    pub fn skip(&mut self, mut n: u64) -> Result<()> {
        while n > 0 {
            match self.epoch_len {
                Some(len) if self.state.is_none() && n >= len => {
                    n -= len;
                    self.epoch += 1;
                }
                _ => {
                    self.next_pair(false)?;
                    n -= 1;
                }
            }
        }
        Ok(())
    }

    /// The next `n` pairs as a dataset of `n` images (not yet decoded).
    pub fn next_dataset(&mut self, n: usize) -> Result<Dataset> {
        self.next_part(n, 0..n)
    }

    /// The next `n` pairs, of which `keep` (a range of `0..n`) become a
    /// dataset of `keep.len()` images (not yet decoded); the images of the
    /// others are not read. Data-parallel ranks each keep their part of a
    /// global batch, so together they read every image of the stream once
    /// and the stream is the one a single process reads.
    pub fn next_part(&mut self, n: usize, keep: std::ops::Range<usize>) -> Result<Dataset> {
        let mut ds = Dataset {
            name: self.shards.pattern.clone(),
            images: Vec::with_capacity(keep.len()),
            image_ids: Vec::with_capacity(keep.len()),
            pairs: Vec::with_capacity(keep.len()),
            skipped: 0,
        };
        for k in 0..n {
            if !keep.contains(&k) {
                self.next_pair(false)?;
                continue;
            }
            let p = self.next_pair(true)?;
            let ImageData::Bytes(bytes) = p.image else {
                unreachable!("read by next_pair");
            };
            let shard = &self.shards.paths[p.shard];
            let image = ds.images.len();
            ds.images.push(ImageRef::File {
                path: shard.join(&p.member),
                origin: shard.display().to_string(),
                bytes: Some(ImageBytes(bytes)),
            });
            ds.image_ids.push(p.image_id);
            ds.pairs.push(Pair {
                image,
                caption: p.caption,
            });
        }
        Ok(ds)
    }

    /// The next `n` pairs' (key-derived) image ids and captions, without
    /// reading images: the stream's order, for tests and inspection.
    pub fn peek_order(&mut self, n: usize) -> Result<Vec<(i64, String)>> {
        (0..n)
            .map(|_| self.next_pair(false).map(|p| (p.image_id, p.caption)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn braces_expand_ranges_lists_and_products() {
        assert_eq!(expand_braces("a.tar").unwrap(), ["a.tar"]);
        assert_eq!(
            expand_braces("s/train-{000008..000011}.tar").unwrap(),
            [
                "s/train-000008.tar",
                "s/train-000009.tar",
                "s/train-000010.tar",
                "s/train-000011.tar"
            ]
        );
        assert_eq!(expand_braces("{8..10}").unwrap(), ["8", "9", "10"]);
        assert_eq!(expand_braces("{3..1}").unwrap(), ["3", "2", "1"]);
        assert_eq!(
            expand_braces("{a,b}-{0..1}.tar").unwrap(),
            ["a-0.tar", "a-1.tar", "b-0.tar", "b-1.tar"]
        );
        for bad in ["{", "}", "a{1..}", "{x}", "{{1..2}}", "a}{"] {
            assert!(expand_braces(bad).is_err(), "{bad}");
        }
    }

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
