//! The batch loader: a producer thread fills a bounded queue with ready
//! batches, each prepared by `workers` scoped threads (decode or render,
//! resize, normalise, tokenise). Batch `g` (counted from the start of
//! training) always holds the same pairs: epoch `g / batches_per_epoch` is a
//! permutation fixed by the seed and the epoch number. Resuming at batch `g`
//! therefore needs only `g`. A shard stream ([`Source::Shards`]) is
//! reproduced from the seed and the first `g` global batches of pairs skipped.
//!
//! In data-parallel training ([`LoaderConfig::shard`]) `batch_size` is one
//! rank's part: global batch `g` is drawn exactly as one process drawing
//! `world * batch_size` pairs would, and rank `r` keeps its rows
//! `r * batch_size..(r + 1) * batch_size` (`DistributedSampler`'s contract:
//! the ranks' parts are disjoint and their union is the global batch). Each
//! row's [`Batch::sample_keys`] is its place in the global order, so draws
//! keyed by it do not depend on the split.
//!
//! With `data.on_error = "skip"`, a pair whose image does not decode is
//! replaced by the next pair of the same batch (cyclically) that decodes, so
//! the batch keeps its size and resuming stays exact; the loader counts them.
//! (Under data parallelism the replacement comes from the rank's own part.)

use super::augment::{swap_left_right, AugKey, Augment};
pub use super::image::{
    decode_bytes_resized, decode_resized, decode_resized_within, set_max_image_pixels,
};
use super::stall::Reading;
use super::webdataset::{RankPlace, RankStream, Shards};
use super::{Dataset, ImageRef, OnError};
use crate::rng::{mix, Rng};
use crate::tokenizer::Tokenizer;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, CaptionPrep, Error, PositiveRule, Prepared, Result, TextBatch};

/// The samplers' per-caption CPU work that batches are prepared with
/// (`NegativeSampler::caption_prep`), one per key.
#[derive(Clone, Default)]
pub struct CaptionPreps(Vec<Arc<dyn CaptionPrep>>);

impl CaptionPreps {
    /// `preps` without repeated keys (equal keys compute the same thing).
    pub fn new(preps: impl IntoIterator<Item = Arc<dyn CaptionPrep>>) -> Self {
        let mut out: Vec<Arc<dyn CaptionPrep>> = Vec::new();
        for p in preps {
            if !out.iter().any(|q| q.key() == p.key()) {
                out.push(p);
            }
        }
        CaptionPreps(out)
    }

    /// Every prep over `captions`, split across `workers` threads.
    pub fn run(&self, captions: &[String], workers: usize) -> BTreeMap<String, Vec<Prepared>> {
        let mut out = BTreeMap::new();
        if self.0.is_empty() || captions.is_empty() {
            return out;
        }
        let per = captions.len().div_ceil(workers.max(1)).max(1);
        for prep in &self.0 {
            let prep = prep.as_ref();
            let results: Vec<Prepared> = std::thread::scope(|scope| {
                let handles: Vec<_> = captions
                    .chunks(per)
                    .map(|chunk| {
                        scope.spawn(move || {
                            chunk.iter().map(|c| prep.prepare(c)).collect::<Vec<_>>()
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .flat_map(|h| h.join().expect("caption prep panicked"))
                    .collect()
            });
            out.insert(prep.key(), results);
        }
        out
    }
}

impl std::fmt::Debug for CaptionPreps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|p| p.key()))
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct LoaderConfig {
    pub batch_size: usize,
    pub workers: usize,
    pub prefetch: usize,
    pub image_size: usize,
    pub max_len: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Shuffle seed; `None` keeps dataset order (evaluation).
    pub shuffle_seed: Option<u64>,
    /// `data.on_error`: whether an image that does not decode fails the batch.
    pub on_error: OnError,
    /// `data.positives`, carried by every batch.
    pub positive_rule: PositiveRule,
    /// Pairs replaced or dropped so far (shared by clones of this config).
    pub skipped: Arc<AtomicUsize>,
    /// Per-caption work for the samplers, done on the worker threads.
    pub preps: CaptionPreps,
    /// This rank's index and the number of ranks sharing each batch
    /// ([`LoaderConfig::shard`]); 0 and 1 on one process.
    pub rank: usize,
    pub world: usize,
    /// `[data.augment]` with the run's seed: set on training loaders only
    /// ([`LoaderConfig::augmented`]); evaluation never augments.
    pub augment: Option<Arc<Augment>>,
    /// What the loader's threads read now, for a stall's message.
    pub reading: Reading,
    /// `data.stall_timeout`: how long the training step waits on the
    /// loader without progress before warning (three times: failing).
    pub stall_timeout: std::time::Duration,
    /// The CUDA device whose page-locked memory the loader thread puts
    /// each batch in (`data.pin_memory` when training on CUDA).
    pub pin_memory: Option<tch::Device>,
}

impl LoaderConfig {
    /// The `[data]` settings with a batch size and an optional shuffle seed.
    pub fn new(
        data: &vlmatch_registry::config::DataConfig,
        batch_size: usize,
        shuffle_seed: Option<u64>,
    ) -> Self {
        LoaderConfig {
            batch_size,
            workers: data.workers,
            prefetch: data.prefetch,
            image_size: data.image_size as usize,
            max_len: data.max_len as usize,
            mean: data.mean,
            std: data.std,
            shuffle_seed,
            on_error: data.on_error,
            positive_rule: data.positives.into(),
            skipped: Arc::new(AtomicUsize::new(0)),
            preps: CaptionPreps::default(),
            rank: 0,
            world: 1,
            augment: None,
            reading: Reading::default(),
            stall_timeout: std::time::Duration::from_secs(data.stall_timeout.max(1)),
            pin_memory: None,
        }
    }

    /// The loader of rank `rank` of `world`: `batch_size` becomes the
    /// per-rank part of a global batch of `world * batch_size` pairs.
    pub fn shard(mut self, rank: usize, world: usize) -> Self {
        assert!(
            rank < world,
            "rank {rank} is not below the world size {world}"
        );
        self.rank = rank;
        self.world = world;
        self
    }

    /// A training loader: images augmented as `[data.augment]` says, each
    /// draw keyed by `seed`, the sample and the epoch.
    pub fn augmented(
        mut self,
        augment: &vlmatch_registry::config::AugmentConfig,
        seed: u64,
    ) -> Self {
        self.augment = Augment::new(augment, seed).map(Arc::new);
        self
    }

    /// Pairs per global batch: every rank's part together.
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.world
    }

    /// This rank's rows of a global batch.
    fn part(&self) -> std::ops::Range<usize> {
        self.rank * self.batch_size..(self.rank + 1) * self.batch_size
    }
}

/// Image `i` of `ds` decoded at full size (a scene rendered at `size`),
/// augmented for `key` and normalised into `out`, in a worker's reused
/// buffers ([`super::image::with_scratch`]).
fn load_augmented(
    ds: &Dataset,
    i: usize,
    cfg: &LoaderConfig,
    aug: &Augment,
    key: AugKey,
    out: &mut [f32],
) -> Result<()> {
    let size = cfg.image_size;
    let image = ds.image_ref(i)?;
    super::image::with_scratch(|s| {
        match &*image {
            ImageRef::Scene(scene) => s.set_rgb(&scene.render(size), size),
            ImageRef::File {
                path,
                origin,
                bytes: None,
            } => s.decode_file(path, origin)?,
            ImageRef::File {
                path,
                origin,
                bytes: Some(bytes),
            } => s.decode_member(&bytes.0, path, origin)?,
        };
        s.augment_into(aug, key, size, (cfg.mean, cfg.std), out);
        Ok(())
    })
}

/// Pair `i`'s image, normalised into `out`: augmented for `key` by a
/// training loader that augments, else resized.
fn pair_image(
    ds: &Dataset,
    cfg: &LoaderConfig,
    i: usize,
    key: Option<AugKey>,
    out: &mut [f32],
) -> Result<()> {
    let image = ds.pair_image(i);
    match (&cfg.augment, key) {
        (Some(aug), Some(key)) => load_augmented(ds, image, cfg, aug, key, out),
        _ => {
            out.copy_from_slice(&ds.load_image(image, cfg.image_size, cfg.mean, cfg.std)?);
            Ok(())
        }
    }
}

/// Pair `i`'s caption, "left" and "right" swapped when its image was
/// flipped and `data.augment.flip_swap_left_right` asks for it.
fn pair_caption(ds: &Dataset, cfg: &LoaderConfig, i: usize, key: Option<AugKey>) -> Result<String> {
    let caption = ds.caption(i)?;
    Ok(match (&cfg.augment, key) {
        (Some(aug), Some(key)) if aug.config.flip_swap_left_right && aug.flips(key) => {
            swap_left_right(&caption)
        }
        _ => caption.into_owned(),
    })
}

/// A hash of a decoded, normalised image: equal for identical pixels.
pub fn image_content_key(pixels: &[f32]) -> i64 {
    vlmatch_core::positives::content_key(pixels.iter().map(|x| x.to_bits()))
}

/// Pair indices of batch `k` of an epoch, given that epoch's order.
fn slice(order: &[usize], k: usize, bs: usize) -> &[usize] {
    &order[k * bs..((k + 1) * bs).min(order.len())]
}

/// The pair order of `epoch`.
pub fn epoch_order(len: usize, seed: Option<u64>, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if let Some(seed) = seed {
        Rng::new(mix(&[seed, epoch, 0xDA7A])).shuffle(&mut order);
    }
    order
}

/// Build one batch from pair indices, using `workers` threads. An image
/// that does not decode fails the batch, or with [`OnError::Skip`] its pair
/// is replaced by the next pair of the batch that decodes.
pub fn make_batch(
    ds: &Dataset,
    tok: &Tokenizer,
    cfg: &LoaderConfig,
    idx: &[usize],
) -> Result<Batch> {
    make_batch_keyed(ds, tok, cfg, idx, None)
}

/// [`make_batch`] with each pair's augmentation key (`keys[k]` for
/// `idx[k]`): a loader with [`LoaderConfig::augment`] augments the images
/// (and swaps "left"/"right" in flipped images' captions if asked to).
pub fn make_batch_keyed(
    ds: &Dataset,
    tok: &Tokenizer,
    cfg: &LoaderConfig,
    idx: &[usize],
    keys: Option<&[AugKey]>,
) -> Result<Batch> {
    let mut aug_keys: Vec<Option<AugKey>> = match keys {
        Some(keys) => keys.iter().copied().map(Some).collect(),
        None => vec![None; idx.len()],
    };
    assert_eq!(aug_keys.len(), idx.len(), "one augmentation key per pair");
    let s = cfg.image_size;
    let plane = 3 * s * s;
    // Written by the workers straight into the batch's tensor.
    let mut pixels = super::image::TensorBuf::zeros(idx.len() * plane);
    let workers = cfg.workers.max(1).min(idx.len().max(1));
    let per = idx.len().div_ceil(workers).max(1);
    // Each image's content hash, so identical images under different ids
    // are positives of each other (`vlmatch_core::positives`).
    let mut image_keys = vec![0i64; idx.len()];
    let mut failed: Vec<(usize, Error)> = std::thread::scope(|scope| {
        let handles: Vec<_> = pixels
            .chunks_mut(per * plane)
            .zip(image_keys.chunks_mut(per))
            .zip(idx.chunks(per))
            .zip(aug_keys.chunks(per))
            .enumerate()
            .map(|(c, (((out, keys), chunk), augs))| {
                scope.spawn(move || {
                    let mut failed = Vec::new();
                    for (k, (((dst, key), &i), &aug)) in out
                        .chunks_mut(plane)
                        .zip(keys)
                        .zip(chunk)
                        .zip(augs)
                        .enumerate()
                    {
                        ds.report_image(ds.pair_image(i), &cfg.reading);
                        match pair_image(ds, cfg, i, aug, dst) {
                            Ok(()) => *key = image_content_key(dst),
                            Err(e) if cfg.on_error == OnError::Skip => {
                                failed.push((c * per + k, e))
                            }
                            Err(e) => return vec![(c * per + k, e)],
                        }
                    }
                    failed
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("loader worker panicked"))
            .collect()
    });
    // Which pair each slot finally holds.
    let mut source: Vec<usize> = idx.to_vec();
    if !failed.is_empty() {
        if cfg.on_error == OnError::Fail {
            return Err(super::with_skip_hint(
                failed.swap_remove(0).1,
                "replaces such pairs",
            ));
        }
        let mut ok = vec![true; idx.len()];
        for (k, _) in &failed {
            ok[*k] = false;
        }
        for (k, e) in failed {
            let Some(j) = (1..idx.len()).map(|d| (k + d) % idx.len()).find(|&j| ok[j]) else {
                return Err(Error::Config(format!(
                    "no image of a batch of {} decodes; the first error: {e}",
                    idx.len()
                )));
            };
            tracing::warn!("skipped (replaced by another pair of the batch): {e}");
            cfg.skipped.fetch_add(1, Ordering::Relaxed);
            pixels.copy_within(j * plane..(j + 1) * plane, k * plane);
            image_keys[k] = image_keys[j];
            aug_keys[k] = aug_keys[j];
            source[k] = idx[j];
        }
    }
    let captions: Vec<String> = source
        .iter()
        .zip(&aug_keys)
        .map(|(&i, &key)| {
            // Cut to `data.max_caption_bytes` here, so the samplers' preps
            // (NegGen's tagging) see no more than the tokenizer does.
            let mut c = pair_caption(ds, cfg, i, key)?;
            c.truncate(tok.caption_prefix(&c, cfg.max_len).len());
            Ok(c)
        })
        .collect::<Result<_>>()?;
    let prepared = cfg.preps.run(&captions, cfg.workers);
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (ids, mask, l) = tok.encode_batch(&refs, cfg.max_len);
    let b = idx.len() as i64;
    let image_ids: Vec<i64> = source
        .iter()
        .map(|&i| ds.image_id(ds.pair_image(i)))
        .collect();
    let keys: Vec<i64> = source.iter().map(|&i| i as i64).collect();
    Ok(Batch {
        images: pixels.into_tensor().view([b, 3, s as i64, s as i64]),
        text: TextBatch::new(
            Tensor::from_slice(&ids).view([b, l as i64]),
            Tensor::from_slice(&mask).view([b, l as i64]),
        ),
        image_ids: Tensor::from_slice(&image_ids).to_kind(Kind::Int64),
        image_keys: Tensor::from_slice(&image_keys),
        positive_rule: cfg.positive_rule,
        // The dataset's pair indices; a training loader replaces them with
        // global sample positions (`with_sample_keys`).
        sample_keys: Tensor::from_slice(&keys),
        sample_keys_host: keys,
        captions,
        pairs: source,
        prepared,
    })
}

/// `batch` with sample keys `first..first + B`: its rows' places in the
/// run's global sample order (random draws are keyed by them).
fn with_sample_keys(mut batch: Batch, first: u64) -> Batch {
    let b = batch.len();
    batch.sample_keys_host = (0..b).map(|k| k + first as i64).collect();
    batch.sample_keys = Tensor::from_slice(&batch.sample_keys_host);
    batch
}

/// What a training [`Loader`] reads: pairs in memory, or a shard stream.
pub enum Source {
    Pairs(Arc<Dataset>),
    Shards(Shards),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Pairs(ds) => write!(f, "{} ({} pairs)", ds.name, ds.len()),
            Source::Shards(sh) => write!(f, "{} ({} shards)", sh.pattern, sh.paths.len()),
        }
    }
}

/// Endless training batches (complete batches only), prepared ahead.
pub struct Loader {
    /// Each batch with the pairs skipped while preparing it.
    rx: Receiver<(Result<Batch>, usize)>,
    reading: Reading,
    stall_timeout: std::time::Duration,
    /// Complete batches per epoch; 0 for a shard stream (not known ahead).
    pub batches_per_epoch: u64,
    skipped: usize,
    /// Bytes this rank has read from shard files (a shard stream).
    shard_bytes: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Prepare one batch with `make`, and count what it skipped.
fn counted(cfg: &LoaderConfig, make: impl FnOnce() -> Result<Batch>) -> (Result<Batch>, usize) {
    let before = cfg.skipped.load(Ordering::Relaxed);
    let batch = make();
    (batch, cfg.skipped.load(Ordering::Relaxed) - before)
}

/// On a loader thread: for `g` from `start`, this rank's part of global
/// batch `g` (`make(g)`, with its sample keys and the pairs skipped making
/// it) sent to `tx`, until a batch fails or the receiver is gone.
fn send_batches(
    tx: &SyncSender<(Result<Batch>, usize)>,
    cfg: &LoaderConfig,
    start: u64,
    mut make: impl FnMut(u64) -> Result<Batch>,
) {
    let global = cfg.global_batch() as u64;
    for g in start.. {
        let batch = counted(cfg, || {
            let batch = make(g)?;
            let batch = with_sample_keys(batch, g * global + cfg.part().start as u64);
            match cfg.pin_memory {
                Some(device) => batch
                    .pinned(device)
                    .map_err(|e| Error::Config(format!("data.pin_memory: {e}"))),
                None => Ok(batch),
            }
        });
        let failed = batch.0.is_err();
        if tx.send(batch).is_err() || failed {
            return;
        }
    }
}

impl Loader {
    /// Batches from `source`, starting at global batch `start`.
    pub fn from_source(
        source: Source,
        tok: Arc<Tokenizer>,
        cfg: LoaderConfig,
        start: u64,
    ) -> Result<Loader> {
        match source {
            Source::Pairs(ds) => {
                if cfg.augment.is_some() && matches!(ds.images.first(), Some(ImageRef::Scene(_))) {
                    tracing::warn!(
                        "data.augment is on over the built-in scenes, whose captions name \
                         positions and counts that crops and flips change (docs/data.md)"
                    );
                }
                Loader::new(ds, tok, cfg, start)
            }
            Source::Shards(shards) => Loader::stream(shards, tok, cfg, start),
        }
    }

    /// Pairs skipped in the batches handed out so far: bad shard samples
    /// and images replaced because they did not decode
    /// (`data.on_error = "skip"`).
    pub fn skipped(&self) -> usize {
        self.skipped
    }

    /// Bytes this rank's loader has read from shard files so far (read
    /// ahead of the batches handed out); 0 for pairs in memory.
    pub fn shard_bytes_read(&self) -> u64 {
        self.shard_bytes
            .as_ref()
            .map_or(0, |b| b.load(Ordering::Relaxed))
    }

    /// Batches of the shard stream, decoded on the worker threads: under
    /// `data.shard_split = "exact"` pairs `g * global_batch..` of the stream
    /// that `shards` and the seed fix (every rank walks the whole stream, tar
    /// headers and captions, and reads the images of its own part only);
    /// under `"disjoint"` this rank's workers' own shards ([`RankStream`]).
    fn stream(
        shards: Shards,
        tok: Arc<Tokenizer>,
        cfg: LoaderConfig,
        start: u64,
    ) -> Result<Loader> {
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let (reading, stall_timeout) = (cfg.reading.clone(), cfg.stall_timeout);
        let place = RankPlace {
            rank: cfg.rank,
            ranks: cfg.world,
            workers: cfg.workers,
            batch_size: cfg.batch_size,
        };
        let mut stream = RankStream::new(
            shards,
            cfg.shuffle_seed,
            cfg.on_error,
            cfg.skipped.clone(),
            place,
        )?
        .reporting_to(cfg.reading.clone());
        let shard_bytes = Some(stream.bytes_read());
        std::thread::Builder::new()
            .name("vlmatch-loader".into())
            .spawn(move || {
                let bs = cfg.batch_size;
                if let Err(e) = stream.skip_batches(start) {
                    let _ = tx.send((Err(e), 0));
                    return;
                }
                let idx: Vec<usize> = (0..bs).collect();
                send_batches(&tx, &cfg, start, |g| {
                    let ds = stream.next_batch()?;
                    // A stream's pairs are keyed by their place in it (the
                    // batch's sample keys), which no epoch repeats.
                    let first = g * cfg.global_batch() as u64 + cfg.part().start as u64;
                    let keys: Vec<AugKey> = (first..first + bs as u64)
                        .map(|sample| AugKey { sample, epoch: 0 })
                        .collect();
                    make_batch_keyed(&ds, &tok, &cfg, &idx, Some(&keys))
                });
            })
            .map_err(|e| Error::io("loader thread", e))?;
        Ok(Loader {
            rx,
            reading,
            stall_timeout,
            batches_per_epoch: 0,
            skipped: 0,
            shard_bytes,
        })
    }

    /// Start at global batch `start` (0 for a fresh run).
    pub fn new(
        ds: Arc<Dataset>,
        tok: Arc<Tokenizer>,
        cfg: LoaderConfig,
        start: u64,
    ) -> Result<Loader> {
        let global = cfg.global_batch();
        let bpe = (ds.len() / global) as u64;
        if bpe == 0 {
            return Err(Error::Config(if cfg.world > 1 {
                format!(
                    "dataset {} has {} pairs, fewer than one global batch of {} ranks x \
                     train.batch_size {} = {global}",
                    ds.name,
                    ds.len(),
                    cfg.world,
                    cfg.batch_size
                )
            } else {
                format!(
                    "dataset {} has {} pairs, fewer than train.batch_size {}",
                    ds.name,
                    ds.len(),
                    cfg.batch_size
                )
            }));
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let (reading, stall_timeout) = (cfg.reading.clone(), cfg.stall_timeout);
        std::thread::Builder::new()
            .name("vlmatch-loader".into())
            .spawn(move || {
                crate::panics::test_point("loader");
                let mut epoch = u64::MAX;
                let mut order = Vec::new();
                send_batches(&tx, &cfg, start, |g| {
                    let e = g / bpe;
                    if e != epoch {
                        epoch = e;
                        order = epoch_order(ds.len(), cfg.shuffle_seed, e);
                    }
                    let idx = &slice(&order, (g % bpe) as usize, global)[cfg.part()];
                    // Pairs in memory are keyed by their index and the epoch.
                    let keys: Vec<AugKey> = idx
                        .iter()
                        .map(|&i| AugKey {
                            sample: i as u64,
                            epoch: e,
                        })
                        .collect();
                    make_batch_keyed(&ds, &tok, &cfg, idx, Some(&keys))
                });
            })
            .map_err(|e| Error::io("loader thread", e))?;
        Ok(Loader {
            rx,
            reading,
            stall_timeout,
            batches_per_epoch: bpe,
            skipped: 0,
            shard_bytes: None,
        })
    }

    /// The next batch; a loader that makes no progress for
    /// `data.stall_timeout` is named in a warning, and after three times
    /// that fails the step ([`super::stall::receive`]).
    pub fn next_batch(&mut self) -> Result<Batch> {
        let (batch, skipped) = super::stall::receive(&self.rx, self.stall_timeout, &self.reading)?
            .ok_or_else(|| {
                Error::Config("the data loader stopped after an earlier error".into())
            })?;
        self.skipped += skipped;
        batch
    }
}

/// Batches over `idx` in order, for evaluation.
pub fn batches<'a>(
    ds: &'a Dataset,
    tok: &'a Tokenizer,
    cfg: &'a LoaderConfig,
    idx: &'a [usize],
) -> impl Iterator<Item = Result<Batch>> + 'a {
    idx.chunks(cfg.batch_size.max(1))
        .map(move |c| make_batch(ds, tok, cfg, c))
}
