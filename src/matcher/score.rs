//! `vlmatch score`: every image-caption pair of a dataset with its ITC
//! similarity, ITM match probability and, on request, the VL-RTD
//! discriminator's per-word mismatch probabilities; one JSON line per pair,
//! streamed as batches finish.
//!
//! Written to a file, scoring is resumable: after each block of pairs the
//! lines are appended and synced, then `OUT.progress.json` (durable)
//! records how many pairs and bytes are done. A killed run cuts `OUT` back
//! to the recorded bytes and goes on from the next pair, so it ends with the
//! file an uninterrupted run writes.

use super::embed::Embedder;
use super::index::Fingerprint;
use crate::data::{Dataset, ImageRef, OnError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use vlmatch_core::{Encoded, Error, Result, TextBatch};

/// A caption word and the discriminator's probability that it does not
/// match the image (the highest of its word pieces', as `vlmatch explain`
/// reports it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WordScore {
    pub word: String,
    pub mismatch: f64,
}

/// One scored pair, one line of `vlmatch score`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PairScore {
    /// The pair's position in the dataset.
    pub pair: usize,
    /// The image as the source names it (relative to the image root for
    /// annotation files; `SHARD/MEMBER` for shards).
    pub image: String,
    pub image_id: i64,
    pub caption: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itc: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub itm: Option<f64>,
    /// Per word: the probability that it does not match the image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<WordScore>>,
    /// Why the pair has no scores (`data.on_error = "skip"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Whether a run's config trains the VL-RTD discriminator (an enabled
/// objective of plugin `rtd`); without it the token head is untrained.
pub fn has_discriminator(config: &vlmatch_registry::Config) -> bool {
    config
        .objectives
        .iter()
        .any(|(name, o)| o.enabled && o.plugin.as_deref().unwrap_or(name) == "rtd")
}

/// How the pairs' image paths are written: relative to `root` where they
/// lie under it.
fn image_name(r: &ImageRef, root: Option<&Path>, id: i64) -> String {
    match r {
        ImageRef::File { path, .. } => root
            .and_then(|root| path.strip_prefix(root).ok())
            .unwrap_or(path)
            .display()
            .to_string(),
        ImageRef::Scene(_) => format!("scene:{id}"),
    }
}

/// Per pair of a batch: ITC, ITM, and the token probabilities `[B * L]`.
type Columns = (Vec<f64>, Vec<f64>, Option<Vec<f64>>);

/// Scores of pairs `pairs` of `ds`. Each distinct image is encoded once;
/// with `on_error = skip` a pair whose image does not decode gets an
/// `error` instead of scores.
pub fn score_pairs(
    emb: &Embedder<'_>,
    ds: &Dataset,
    pairs: &[usize],
    tokens: bool,
    on_error: OnError,
    root: Option<&Path>,
) -> Result<Vec<PairScore>> {
    let mut out: Vec<PairScore> = pairs
        .iter()
        .map(|&n| {
            let p = &ds.pairs[n];
            PairScore {
                pair: n,
                image: image_name(&ds.images[p.image], root, ds.image_ids[p.image]),
                image_id: ds.image_ids[p.image],
                caption: p.caption.clone(),
                itc: None,
                itm: None,
                words: None,
                error: None,
            }
        })
        .collect();
    // Distinct images, each decoded on its own so that one bad file is
    // one pair's error.
    let mut distinct: BTreeMap<usize, Option<Vec<f32>>> = BTreeMap::new();
    for &n in pairs {
        let i = ds.pairs[n].image;
        if distinct.contains_key(&i) {
            continue;
        }
        match ds.load_image(i, emb.image_size, emb.mean, emb.std) {
            Ok(px) => distinct.insert(i, Some(px)),
            Err(e) if on_error == OnError::Skip => {
                for s in out.iter_mut().filter(|s| ds.pairs[s.pair].image == i) {
                    s.error = Some(e.to_string());
                }
                distinct.insert(i, None)
            }
            Err(e) => {
                return Err(crate::data::with_skip_hint(
                    e,
                    "scores such pairs as errors",
                ))
            }
        };
    }
    let good: Vec<usize> = (0..out.len()).filter(|&k| out[k].error.is_none()).collect();
    if good.is_empty() {
        return Ok(out);
    }
    let images: Vec<usize> = distinct
        .iter()
        .filter_map(|(&i, px)| px.as_ref().map(|_| i))
        .collect();
    let pixels: Vec<f32> = images
        .iter()
        .flat_map(|i| distinct[i].as_ref().expect("decoded").iter().copied())
        .collect();
    let slot: Vec<usize> = good
        .iter()
        .map(|&k| {
            images
                .binary_search(&ds.pairs[out[k].pair].image)
                .expect("decoded")
        })
        .collect();
    let captions: Vec<&str> = good.iter().map(|&k| out[k].caption.as_str()).collect();
    let scored = score_decoded(emb, &pixels, &slot, &captions, tokens)?;
    for (s, &k) in scored.into_iter().zip(&good) {
        out[k].itc = Some(s.itc);
        out[k].itm = Some(s.itm);
        out[k].words = s.words;
    }
    Ok(out)
}

/// One caption's scores against its image.
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    pub itc: f64,
    pub itm: f64,
    pub words: Option<Vec<WordScore>>,
}

/// Scores of `captions` against decoded images: `pixels` holds the images
/// one after the other, each normalised `[3, S, S]` as
/// [`Dataset::load_image`] gives it, and caption `c` goes with image
/// `slot[c]`. One forward of each encoder and one of the fusion for all
/// pairs (`vlmatch serve` batches its requests through here).
pub fn score_decoded(
    emb: &Embedder<'_>,
    pixels: &[f32],
    slot: &[usize],
    captions: &[&str],
    tokens: bool,
) -> Result<Vec<Scored>> {
    if captions.is_empty() {
        return Ok(Vec::new());
    }
    let s = emb.image_size as i64;
    let device = emb.model.device;
    let n_images = pixels.len() as i64 / (3 * s * s);
    let pixels = Tensor::from_slice(pixels)
        .view([n_images, 3, s, s])
        .to_device(device);
    let slot: Vec<i64> = slot.iter().map(|&i| i as i64).collect();
    let slot = Tensor::from_slice(&slot).to_device(device);
    // Captions: word-aligned token ids, padded to the longest.
    let encoded: Vec<_> = captions
        .iter()
        .map(|c| emb.tokenizer.encode_words(c, emb.max_len))
        .collect();
    let len = encoded.iter().map(|(ids, _)| ids.len()).max().unwrap_or(2);
    let pad = emb.tokenizer.special.pad;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for (e, _) in &encoded {
        ids.extend(
            e.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, len - e.len())),
        );
        mask.extend(
            std::iter::repeat_n(1i64, e.len()).chain(std::iter::repeat_n(0, len - e.len())),
        );
    }
    let shape = [captions.len() as i64, len as i64];
    let text = TextBatch::new(
        Tensor::from_slice(&ids).view(shape).to_device(device),
        Tensor::from_slice(&mask).view(shape).to_device(device),
    );
    let model = emb.model;
    let (itc, itm, token_p) = tch::no_grad(|| -> Result<Columns> {
        let img: Encoded = model
            .image
            .forward_t(vlmatch_core::EncoderInput::Image(&pixels), false)?
            .select(&slot);
        let txt = model
            .text
            .forward_t(vlmatch_core::EncoderInput::Text(&text), false)?;
        let itc = (model.contrastive.embed_image(&img) * model.contrastive.embed_text(&txt))
            .sum_dim_intlist(1, false, Kind::Float);
        let (fused, token_p) = if tokens {
            let fused = model.fuse(&txt, &img, false)?;
            let p = model.discriminator.token_logits(&fused)?.sigmoid();
            (fused, Some(p))
        } else {
            (model.fuse_cls(&txt, &img, false)?, None)
        };
        let itm = model
            .discriminator
            .pair_logits(&fused)?
            .softmax(1, Kind::Float)
            .select(1, 1);
        let host = |t: Tensor| -> Result<Vec<f64>> {
            Ok(Vec::<f64>::try_from(
                t.to_kind(Kind::Double)
                    .to_device(Device::Cpu)
                    .contiguous()
                    .view([-1]),
            )?)
        };
        Ok((host(itc)?, host(itm)?, token_p.map(host).transpose()?))
    })?;
    Ok((0..captions.len())
        .map(|g| Scored {
            itc: itc[g],
            itm: itm[g],
            words: token_p.as_ref().map(|p| {
                let row = &p[g * len..(g + 1) * len];
                let words = &encoded[g].1;
                let spans: Vec<_> = words.iter().map(|(_, r)| r.clone()).collect();
                words
                    .iter()
                    .zip(crate::explain::word_max(row, &spans))
                    .map(|((w, _), mismatch)| WordScore {
                        word: w.clone(),
                        mismatch,
                    })
                    .collect()
            }),
        })
        .collect())
}

/// What a score file is of; a resumed run must match it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreProgress {
    pub model: Fingerprint,
    pub source: super::index::SourceSpec,
    pub tokens: bool,
    pub total: usize,
    /// Pairs done, and the bytes of the output file they fill.
    pub pairs: usize,
    pub bytes: u64,
}

/// The progress record beside a score file.
pub fn progress_path(out: &Path) -> PathBuf {
    let mut p = out.as_os_str().to_owned();
    p.push(".progress.json");
    PathBuf::from(p)
}

pub struct ScoreOptions {
    pub tokens: bool,
    pub batch: usize,
    pub on_error: OnError,
    /// Image paths are written relative to this root where under it.
    pub root: Option<PathBuf>,
    pub progress: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScoreSummary {
    pub pairs: usize,
    pub scored: usize,
    pub errors: usize,
    pub resumed_at: usize,
}

/// Score every pair of `ds` in order, each block's lines to `sink` as it
/// finishes; `resume_at` pairs are already done. `after_block(pairs done)`
/// runs after each block (a file sink records its progress there). With
/// the ranks of `par`, each scores every `world`-th block of `batch` pairs
/// and rank 0 alone writes them, in order, the lines of one process on the
/// CPU; the other ranks' `sink` and `after_block` are not used.
pub fn stream(
    emb: &Embedder<'_>,
    ds: &Dataset,
    opts: &ScoreOptions,
    resume_at: usize,
    sink: &mut dyn Write,
    after_block: &mut dyn FnMut(usize) -> Result<()>,
    par: Option<&crate::parallel::Parallel>,
) -> Result<ScoreSummary> {
    let all: Vec<usize> = (resume_at..ds.pairs.len()).collect();
    let blocks: Vec<&[usize]> = all.chunks(opts.batch.max(1)).collect();
    let collective = par.map(|p| p.collective());
    let (rank, world) = collective
        .as_ref()
        .map_or((0, 1), |c| (c.rank(), c.world_size()));
    let bar = if opts.progress && rank == 0 {
        indicatif::ProgressBar::new(ds.pairs.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_position(resume_at as u64);
    let (mut scored, mut errors) = (0i64, 0i64);
    let mut first = 0;
    while first < blocks.len() {
        // This rank's block of the round: its lines and counts.
        let (mut text, mut counts) = (String::new(), [0i64; 2]);
        if let Some(block) = blocks.get(first + rank) {
            let scores = score_pairs(
                emb,
                ds,
                block,
                opts.tokens,
                opts.on_error,
                opts.root.as_deref(),
            )?;
            for s in &scores {
                counts[usize::from(s.error.is_some())] += 1;
                text += &serde_json::to_string(s).expect("serialisable");
                text.push('\n');
            }
        }
        let round: Vec<(Vec<u8>, [i64; 2])> = match &collective {
            None => vec![(text.into_bytes(), counts)],
            Some(c) => gather_lines(c.as_ref(), text, counts, emb.model.device)?
                .into_iter()
                .take(blocks.len() - first)
                .collect(),
        };
        crate::parallel::on_rank0(par, "writing scores", || {
            for (i, (bytes, n)) in round.iter().enumerate() {
                let block = blocks[first + i];
                sink.write_all(bytes)
                    .map_err(|e| Error::io("score output", e))?;
                after_block(block[block.len() - 1] + 1)?;
                scored += n[0];
                errors += n[1];
                bar.inc(block.len() as u64);
            }
            Ok(())
        })?;
        first += world;
    }
    bar.finish_and_clear();
    Ok(ScoreSummary {
        pairs: ds.pairs.len(),
        scored: scored as usize,
        errors: errors as usize,
        resumed_at: resume_at,
    })
}

/// Every rank's lines and counts, in rank order: the lengths and counts
/// first, then the bytes padded to the longest.
fn gather_lines(
    c: &dyn vlmatch_core::Collective,
    text: String,
    counts: [i64; 2],
    device: Device,
) -> Result<Vec<(Vec<u8>, [i64; 2])>> {
    let meta = Tensor::from_slice(&[text.len() as i64, counts[0], counts[1]]).to_device(device);
    let meta = Vec::<i64>::try_from(c.all_gather(&meta)?.to_device(Device::Cpu))?;
    let longest = meta.chunks(3).map(|m| m[0]).max().unwrap_or(0).max(1) as usize;
    let mut bytes = text.into_bytes();
    bytes.resize(longest, 0);
    let all = c.all_gather(&Tensor::from_slice(&bytes).to_device(device))?;
    let all = Vec::<u8>::try_from(all.to_device(Device::Cpu))?;
    Ok(meta
        .chunks(3)
        .enumerate()
        .map(|(r, m)| {
            let at = r * longest;
            (all[at..at + m[0] as usize].to_vec(), [m[1], m[2]])
        })
        .collect())
}

/// [`stream`] into the file `out`, resumable: continues a run of the same
/// model, source and `--tokens` from its progress record. With `par`, rank
/// 0 opens and writes the file.
pub fn score_to_file(
    emb: &Embedder<'_>,
    ds: &Dataset,
    opts: &ScoreOptions,
    record: ScoreProgress,
    out: &Path,
    par: Option<&crate::parallel::Parallel>,
) -> Result<ScoreSummary> {
    let prog = progress_path(out);
    let mut record = record;
    let opened = crate::parallel::on_rank0(par, "opening the score file", || {
        open_scores(out, &prog, &mut record)
    })?;
    // Where to start, rank 0's word for it.
    let start = match par {
        None => opened.as_ref().map_or(0, |o| o.1),
        Some(p) => {
            let t = Tensor::from_slice(&[opened.as_ref().map_or(0, |o| o.1 as i64)])
                .to_device(emb.model.device);
            p.broadcast(&[t.shallow_clone()])?;
            t.int64_value(&[0]) as usize
        }
    };
    let mut file = opened.map(|o| o.0);
    let mut after = |done: usize| -> Result<()> {
        let f = std::fs::File::open(out).map_err(|e| Error::io(out, e))?;
        f.sync_all().map_err(|e| Error::io(out, e))?;
        record.pairs = done;
        record.bytes = f.metadata().map_err(|e| Error::io(out, e))?.len();
        write_record(&prog, &record)
    };
    let mut nothing = std::io::sink();
    let sink: &mut dyn Write = match file.as_mut() {
        Some(f) => f,
        None => &mut nothing,
    };
    stream(emb, ds, opts, start, sink, &mut after, par)
}

/// The score file `out`, cut back to what its progress record `prog` says
/// (new when neither exists), and the pairs done; `record` takes them.
fn open_scores(
    out: &Path,
    prog: &Path,
    record: &mut ScoreProgress,
) -> Result<(std::fs::File, usize)> {
    let start = if prog.is_file() {
        let text = std::fs::read_to_string(prog).map_err(|e| Error::io(prog, e))?;
        let old: ScoreProgress = serde_json::from_str(&text).map_err(|e| Error::Data {
            path: prog.to_path_buf(),
            line: Some(e.line()),
            message: format!("not a score progress record: {e}"),
        })?;
        let same = ScoreProgress {
            pairs: old.pairs,
            bytes: old.bytes,
            ..record.clone()
        };
        if same != old {
            return Err(Error::Config(format!(
                "--out {}: its progress record {} is of another model, source or --tokens; \
                 give another --out, or the same arguments to finish it",
                out.display(),
                prog.display()
            )));
        }
        (old.pairs, old.bytes)
    } else if out.exists() {
        return Err(Error::Config(format!(
            "--out {} exists and has no progress record; give a new file",
            out.display()
        )));
    } else {
        (0, 0)
    };
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .map_err(|e| Error::io(out, e))?;
    // What a killed run appended after its last record goes.
    file.set_len(start.1).map_err(|e| Error::io(out, e))?;
    record.pairs = start.0;
    record.bytes = start.1;
    write_record(prog, record)?;
    Ok((file, start.0))
}

fn write_record(path: &Path, r: &ScoreProgress) -> Result<()> {
    crate::durable::write(path, serde_json::to_string(r).expect("serialisable") + "\n")
}
