//! The batch loader: a producer thread fills a bounded queue with ready
//! batches, each prepared by `workers` scoped threads (decode or render,
//! resize, normalise, tokenise). Batch `g` (counted from the start of
//! training) always holds the same pairs: epoch `g / batches_per_epoch` is a
//! permutation fixed by the seed and the epoch number. Resuming at batch `g`
//! therefore needs only `g`.

use super::Dataset;
use crate::rng::{mix, Rng};
use crate::tokenizer::Tokenizer;
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch_core::{Batch, Error, Result, TextBatch};

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
        }
    }
}

/// Decode an image file and resize it to `size` x `size` RGB.
pub fn decode_resized(path: &Path, origin: &str, size: usize) -> Result<Vec<u8>> {
    let img = image::open(path).map_err(|e| Error::Data {
        path: path.to_path_buf(),
        line: None,
        message: format!("cannot decode image (named at {origin}): {e}"),
    })?;
    let rgb = img.to_rgb8();
    let resized = image::imageops::resize(
        &rgb,
        size as u32,
        size as u32,
        image::imageops::FilterType::CatmullRom,
    );
    Ok(resized.into_raw())
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

/// Build one batch from pair indices, using `workers` threads.
pub fn make_batch(
    ds: &Dataset,
    tok: &Tokenizer,
    cfg: &LoaderConfig,
    idx: &[usize],
) -> Result<Batch> {
    let s = cfg.image_size;
    let plane = 3 * s * s;
    let mut pixels = vec![0f32; idx.len() * plane];
    let workers = cfg.workers.max(1).min(idx.len().max(1));
    let per = idx.len().div_ceil(workers);
    std::thread::scope(|scope| -> Result<()> {
        let handles: Vec<_> = pixels
            .chunks_mut(per * plane)
            .zip(idx.chunks(per))
            .map(|(out, chunk)| {
                scope.spawn(move || -> Result<()> {
                    for (dst, &i) in out.chunks_mut(plane).zip(chunk) {
                        let img = ds.load_image(ds.pairs[i].image, s, cfg.mean, cfg.std)?;
                        dst.copy_from_slice(&img);
                    }
                    Ok(())
                })
            })
            .collect();
        for h in handles {
            h.join().expect("loader worker panicked")?;
        }
        Ok(())
    })?;
    let captions: Vec<String> = idx.iter().map(|&i| ds.pairs[i].caption.clone()).collect();
    let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
    let (ids, mask, l) = tok.encode_batch(&refs, cfg.max_len);
    let b = idx.len() as i64;
    let image_ids: Vec<i64> = idx
        .iter()
        .map(|&i| ds.image_ids[ds.pairs[i].image])
        .collect();
    Ok(Batch {
        images: Tensor::from_slice(&pixels).view([b, 3, s as i64, s as i64]),
        text: TextBatch::new(
            Tensor::from_slice(&ids).view([b, l as i64]),
            Tensor::from_slice(&mask).view([b, l as i64]),
        ),
        image_ids: Tensor::from_slice(&image_ids).to_kind(Kind::Int64),
        captions,
    })
}

/// Endless training batches (complete batches only), prepared ahead.
pub struct Loader {
    rx: Receiver<Result<Batch>>,
    pub batches_per_epoch: u64,
}

impl Loader {
    /// Start at global batch `start` (0 for a fresh run).
    pub fn new(
        ds: Arc<Dataset>,
        tok: Arc<Tokenizer>,
        cfg: LoaderConfig,
        start: u64,
    ) -> Result<Loader> {
        let bpe = (ds.len() / cfg.batch_size) as u64;
        if bpe == 0 {
            return Err(Error::Config(format!(
                "dataset {} has {} pairs, fewer than train.batch_size {}",
                ds.name,
                ds.len(),
                cfg.batch_size
            )));
        }
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        std::thread::Builder::new()
            .name("vlmatch-loader".into())
            .spawn(move || {
                let mut epoch = u64::MAX;
                let mut order = Vec::new();
                for g in start.. {
                    let e = g / bpe;
                    if e != epoch {
                        epoch = e;
                        order = epoch_order(ds.len(), cfg.shuffle_seed, e);
                    }
                    let idx = slice(&order, (g % bpe) as usize, cfg.batch_size);
                    let batch = make_batch(&ds, &tok, &cfg, idx);
                    let failed = batch.is_err();
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })
            .map_err(|e| Error::io("loader thread", e))?;
        Ok(Loader {
            rx,
            batches_per_epoch: bpe,
        })
    }

    pub fn next_batch(&mut self) -> Result<Batch> {
        self.rx
            .recv()
            .map_err(|_| Error::Config("the data loader stopped after an earlier error".into()))?
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
