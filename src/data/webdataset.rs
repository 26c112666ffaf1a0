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
//! without reading their images. How ranks divide it is `data.shard_split`
//! ([`RankStream`]): under `exact` every rank walks the same stream and
//! reads the images of its own part of each global batch only
//! ([`PairStream::next_part`]): exactly the pairs one process would train
//! on, each image read by one rank, at the cost of every rank reading every
//! tar header and caption. Under `disjoint` each rank's loader workers each
//! stream their own shards ([`super::shards::epoch_shards`]): each byte is
//! read by one reader, and what a run computes depends on its ranks x
//! workers, so it resumes only on the same. [`load_shards`] reads a (small)
//! shard set into an in-memory [`Dataset`] for evaluation. Members become
//! samples in [`super::samples`]; which shards a reader reads is
//! [`super::shards`].

pub use super::samples::key_image_id;
use super::samples::{data_error, read_counted, ImageData, ShardReader};
use super::shards::{check_slots, epoch_shards, Slot};
pub use super::shards::{expand_braces, MemberLimits, Shards};
use super::{Dataset, ImageBytes, ImageRef, OnError, Pair};
use crate::rng::{mix, Rng};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::ShardSplit;

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
        store: None,
    };
    let bytes = Arc::new(AtomicU64::new(0));
    for path in &shards.paths {
        let mut reader = ShardReader::open(path, limits, &bytes)?;
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

/// The endless pair stream of a shard set, or of one reader's shards of it
/// ([`PairStream::with_slot`]): epoch after epoch, each a shard order and a
/// shuffle-buffer order drawn from the seed and the epoch.
pub struct PairStream {
    shards: Shards,
    seed: Option<u64>,
    on_error: OnError,
    skipped: Arc<AtomicUsize>,
    /// Bytes read from the shard files (shared by a rank's readers).
    bytes: Arc<AtomicU64>,
    slot: Slot,
    epoch: u64,
    /// Pairs in an epoch, once one has been read through (the whole
    /// stream's; a slot's epochs differ).
    epoch_len: Option<u64>,
    /// The shards a slot has read since it last read a pair (all of them:
    /// the set holds nothing this reader can use).
    empty: Vec<bool>,
    state: Option<Epoch>,
    /// Told of each shard opened (a stalled loader names it).
    reading: super::stall::Reading,
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
            bytes: Arc::new(AtomicU64::new(0)),
            slot: Slot::WHOLE,
            epoch: 0,
            epoch_len: None,
            empty: Vec::new(),
            state: None,
            reading: super::stall::Reading::default(),
        }
    }

    /// Reports each shard it opens to `reading` (the loader's stall watch).
    pub fn reporting_to(mut self, reading: super::stall::Reading) -> Self {
        self.reading = reading;
        self
    }

    /// The stream of reader `slot` alone: each epoch only its shards
    /// ([`epoch_shards`]), with a shuffle buffer of its own.
    pub fn with_slot(mut self, slot: Slot) -> Self {
        self.slot = slot;
        self
    }

    /// Bytes read from the shard files counted into `bytes`.
    pub fn with_bytes(mut self, bytes: Arc<AtomicU64>) -> Self {
        self.bytes = bytes;
        self
    }

    /// Bytes read from the shard files so far (into this stream's counter).
    pub fn bytes_read(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn start_epoch(&self) -> Epoch {
        let order = epoch_shards(self.shards.paths.len(), self.seed, self.epoch, self.slot);
        let seed = self.seed.unwrap_or(0);
        let key = if self.slot == Slot::WHOLE {
            mix(&[seed, self.epoch, 0xB_0FFE])
        } else {
            mix(&[seed, self.epoch, 0xB_0FFE, self.slot.index as u64])
        };
        Epoch {
            order,
            next_shard: 0,
            reader: None,
            buffer: Vec::new(),
            exhausted: false,
            rng: Rng::new(key),
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
                let path = &self.shards.paths[shard];
                self.reading.path(path);
                match ShardReader::open(path, self.shards.limits, &self.bytes) {
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

    /// The epoch read through: the next one starts at the next pair. An
    /// epoch of the whole stream without a pair is an error; a slot's (its
    /// shards of the epoch may all be empty or bad) only once it has read
    /// every shard of the set since it last read a pair.
    fn end_epoch(&mut self, emitted: u64) -> Result<()> {
        tracing::debug!(
            reader = self.slot.index,
            readers = self.slot.count,
            epoch = self.epoch,
            pairs = emitted,
            bytes_read = self.bytes_read(),
            "shard stream: epoch read"
        );
        let n = self.shards.paths.len();
        if emitted > 0 {
            self.empty.clear();
        } else {
            self.empty.resize(n, false);
            for &shard in &self.state.as_ref().expect("epoch started").order {
                self.empty[shard] = true;
            }
        }
        if emitted == 0 && (self.slot == Slot::WHOLE || self.empty.iter().all(|&e| e)) {
            return Err(Error::Config(format!(
                "config key `data.shards`: `{}` holds no image-caption samples",
                self.shards.pattern
            )));
        }
        if self.slot == Slot::WHOLE {
            self.epoch_len = Some(emitted);
        }
        self.epoch += 1;
        self.state = None;
        Ok(())
    }

    /// The next pair of the current epoch, `None` once it is read through
    /// (the next call starts the next epoch); its image is read when
    /// `load_images`.
    fn next_in_epoch(&mut self, load_images: bool) -> Result<Option<StreamPair>> {
        let cap = match self.seed {
            Some(_) => self.shards.shuffle_buffer.max(1),
            None => 1,
        };
        if self.state.is_none() {
            self.state = Some(self.start_epoch());
        }
        loop {
            let st = self.state.as_mut().expect("just started");
            if !st.buffer.is_empty() && (st.exhausted || st.buffer.len() >= cap) {
                let j = st.rng.below(st.buffer.len());
                let mut pair = st.buffer.swap_remove(j);
                st.emitted += 1;
                if let (true, ImageData::At { offset, len }) = (load_images, &pair.image) {
                    let path = &self.shards.paths[pair.shard];
                    let bytes = read_counted(path, *offset, *len, &self.bytes)
                        .map_err(|e| data_error(path, format!("member {}: {e}", pair.member)))?;
                    pair.image = ImageData::Bytes(Arc::new(bytes));
                }
                return Ok(Some(pair));
            }
            if st.exhausted {
                let emitted = st.emitted;
                self.end_epoch(emitted)?;
                return Ok(None);
            }
            if !self.fill(load_images)? {
                self.state.as_mut().expect("started").exhausted = true;
            }
        }
    }

    /// The next pair; its image is read when `load_images`.
    fn next_pair(&mut self, load_images: bool) -> Result<StreamPair> {
        loop {
            if let Some(pair) = self.next_in_epoch(load_images)? {
                return Ok(pair);
            }
        }
    }

    /// Pass over the next `n` pairs without reading their images (whole
    /// epochs at once once the whole stream's epoch length is known).
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
    pub fn next_part(&mut self, n: usize, keep: Range<usize>) -> Result<Dataset> {
        let mut ds = Dataset {
            name: self.shards.pattern.clone(),
            images: Vec::with_capacity(keep.len()),
            image_ids: Vec::with_capacity(keep.len()),
            pairs: Vec::with_capacity(keep.len()),
            skipped: 0,
            store: None,
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

    /// The rest of the current epoch's pairs (image ids and captions,
    /// images not read); the stream then stands at the next epoch's start.
    pub fn rest_of_epoch(&mut self) -> Result<Vec<(i64, String)>> {
        let mut out = Vec::new();
        while let Some(p) = self.next_in_epoch(false)? {
            out.push((p.image_id, p.caption));
        }
        Ok(out)
    }
}

/// Where a rank's loader stands among the readers of a stream.
#[derive(Debug, Clone, Copy)]
pub struct RankPlace {
    pub rank: usize,
    pub ranks: usize,
    /// Loader workers per rank (`data.workers`).
    pub workers: usize,
    /// Pairs per batch of this rank.
    pub batch_size: usize,
}

impl RankPlace {
    /// The reader that this rank's loader worker `worker` is under
    /// `disjoint`: slot `rank * workers + worker` of `ranks * workers`.
    pub fn slot(&self, worker: usize) -> Slot {
        let workers = self.workers.max(1);
        Slot {
            index: self.rank * workers + worker,
            count: self.ranks * workers,
        }
    }
}

enum Readers {
    /// `exact`: the whole stream, of which this rank keeps rows `part` of
    /// each global batch of `global` pairs.
    Whole {
        stream: Box<PairStream>,
        global: usize,
        part: Range<usize>,
    },
    /// `disjoint`: one stream per loader worker over its own shards; the
    /// rank's batch `k` comes from worker `k % workers`.
    Own {
        streams: Vec<PairStream>,
        batch: usize,
        next: usize,
    },
}

/// One rank's batches of a shard stream, as `data.shard_split` divides it,
/// with the bytes its readers read.
pub struct RankStream {
    readers: Readers,
    bytes: Arc<AtomicU64>,
}

impl RankStream {
    /// The stream of `shards` (split as `shards.split` says) for the rank at
    /// `place`. Under `disjoint`, more readers (ranks x workers) than
    /// shards is an error.
    pub fn new(
        shards: Shards,
        seed: Option<u64>,
        on_error: OnError,
        skipped: Arc<AtomicUsize>,
        place: RankPlace,
    ) -> Result<RankStream> {
        let bytes = Arc::new(AtomicU64::new(0));
        let readers = match shards.split {
            ShardSplit::Exact => Readers::Whole {
                stream: Box::new(
                    PairStream::new(shards, seed, on_error, skipped).with_bytes(bytes.clone()),
                ),
                global: place.batch_size * place.ranks,
                part: place.rank * place.batch_size..(place.rank + 1) * place.batch_size,
            },
            ShardSplit::Disjoint => {
                let workers = place.workers.max(1);
                check_slots(shards.paths.len(), place.ranks, workers, &shards.pattern)?;
                let streams = (0..workers)
                    .map(|w| {
                        PairStream::new(shards.clone(), seed, on_error, skipped.clone())
                            .with_slot(place.slot(w))
                            .with_bytes(bytes.clone())
                    })
                    .collect();
                Readers::Own {
                    streams,
                    batch: place.batch_size,
                    next: 0,
                }
            }
        };
        Ok(RankStream { readers, bytes })
    }

    /// Reports each shard its readers open to `reading` (the loader's stall
    /// watch).
    pub fn reporting_to(mut self, reading: super::stall::Reading) -> Self {
        self.readers = match self.readers {
            Readers::Whole {
                stream,
                global,
                part,
            } => Readers::Whole {
                stream: Box::new(stream.reporting_to(reading)),
                global,
                part,
            },
            Readers::Own {
                streams,
                batch,
                next,
            } => Readers::Own {
                streams: streams
                    .into_iter()
                    .map(|s| s.reporting_to(reading.clone()))
                    .collect(),
                batch,
                next,
            },
        };
        self
    }

    /// The bytes this rank's readers have read from shard files (a counter
    /// that goes on counting).
    pub fn bytes_read(&self) -> Arc<AtomicU64> {
        self.bytes.clone()
    }

    /// Pass over this rank's first `batches` batches, without reading their
    /// images: where a resumed run continues.
    pub fn skip_batches(&mut self, batches: u64) -> Result<()> {
        match &mut self.readers {
            Readers::Whole { stream, global, .. } => stream.skip(batches * *global as u64),
            Readers::Own {
                streams,
                batch,
                next,
            } => {
                let w = streams.len() as u64;
                for (i, s) in streams.iter_mut().enumerate() {
                    let taken = batches / w + u64::from((i as u64) < batches % w);
                    s.skip(taken * *batch as u64)?;
                }
                *next = (batches % w) as usize;
                Ok(())
            }
        }
    }

    /// This rank's next batch of pairs (images read, not decoded).
    pub fn next_batch(&mut self) -> Result<Dataset> {
        match &mut self.readers {
            Readers::Whole {
                stream,
                global,
                part,
            } => stream.next_part(*global, part.clone()),
            Readers::Own {
                streams,
                batch,
                next,
            } => {
                let ds = streams[*next].next_dataset(*batch)?;
                *next = (*next + 1) % streams.len();
                Ok(ds)
            }
        }
    }
}
