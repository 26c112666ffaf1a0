//! The model thread of `vlmatch serve`: it loads the run and owns the model
//! (tch modules are not shared across threads), takes jobs from a bounded
//! channel, and answers every job that arrived within a small window in one
//! forward: the `/match` pairs through [`score_decoded`], the `/search`
//! queries through one text forward and one exact top-k over the index.

use crate::data::Dataset;
use crate::matcher::embed::{embed_queries, Embedder};
use crate::matcher::index::{Fingerprint, ImageItem, Index, Items};
use crate::matcher::score::{has_discriminator, score_decoded, WordScore};
use crate::matcher::search::{index_images, top_k, DEFAULT_BLOCK};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::Tensor;
use tokio::sync::oneshot;
use vlmatch_core::{Error, Result};

/// How requests are grouped into one forward.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// After the first job of a batch, wait at most this long for more.
    pub window: Duration,
    /// The most jobs in one batch (1: no batching).
    pub max_batch: usize,
    /// Jobs waiting beyond this are refused as busy (HTTP 503).
    pub queue: usize,
}

/// `/match`'s answer for one pair.
#[derive(Debug, Clone, Serialize)]
pub struct MatchResult {
    /// ITM match probability.
    pub itm: f64,
    /// ITC similarity (dot product of the unit embeddings).
    pub itc: f64,
    /// Per caption word, the discriminator's probability that it does not
    /// match the image; absent for a run without a VL-RTD discriminator.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub words: Option<Vec<WordScore>>,
}

/// One result of `/search`.
#[derive(Debug, Clone, Serialize)]
pub struct SearchHit {
    pub rank: usize,
    /// The image's row in the index (its thumbnail is `/thumb/ROW`).
    pub row: usize,
    pub id: i64,
    pub path: String,
    pub itc: f64,
    pub thumb: String,
}

type Reply<T> = oneshot::Sender<std::result::Result<T, String>>;

/// What the HTTP side hands the model thread.
pub enum Job {
    /// Normalised pixels `[3, S, S]` and a caption.
    Match {
        pixels: Vec<f32>,
        caption: String,
        reply: Reply<MatchResult>,
    },
    /// A text query and how many images to return.
    Search {
        query: String,
        k: usize,
        reply: Reply<Vec<SearchHit>>,
    },
}

/// The loaded index as the HTTP side sees it.
pub struct IndexInfo {
    pub dir: PathBuf,
    pub images: Vec<ImageItem>,
    /// The indexed images, to decode for thumbnails.
    pub dataset: Dataset,
}

/// What the model thread tells the HTTP side once the run is loaded.
pub struct ModelInfo {
    pub run: PathBuf,
    pub step: i64,
    pub fingerprint: Fingerprint,
    /// The run trained a VL-RTD discriminator: `/match` returns words.
    pub discriminator: bool,
    pub data: vlmatch_registry::config::DataConfig,
    pub index: Option<IndexInfo>,
    pub batching: Batching,
    /// Batches run and jobs answered.
    pub batches: AtomicU64,
    pub jobs: AtomicU64,
    /// Requests being read or decoded that will soon be jobs: the window is
    /// waited only while there are some, so a lone request goes at once.
    pub pending: AtomicU64,
}

/// A request on its way to the model thread, counted in
/// [`ModelInfo::pending`] until dropped (when its job is queued, or it is
/// refused).
pub struct Pending(Arc<ModelInfo>);

impl Pending {
    pub fn start(info: &Arc<ModelInfo>) -> Pending {
        info.pending.fetch_add(1, Ordering::SeqCst);
        Pending(info.clone())
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Load the run (and the index, checked against its fingerprint) on a
/// thread of its own; that thread then serves jobs until every sender is
/// dropped. Returns once the run is loaded, or with its loading error.
pub fn spawn(
    run: PathBuf,
    index: Option<PathBuf>,
    sets: Vec<String>,
    batching: Batching,
    threads: usize,
) -> Result<(SyncSender<Job>, Arc<ModelInfo>, std::thread::JoinHandle<()>)> {
    let (jobs_tx, jobs_rx) = mpsc::sync_channel::<Job>(batching.queue.max(1));
    let (ready_tx, ready_rx) = mpsc::channel::<Result<Arc<ModelInfo>>>();
    let thread = std::thread::Builder::new()
        .name("vlmatch-model".into())
        .spawn(move || {
            // libtorch's intra-op threads wait for each other spinning; more
            // of them than the cores the HTTP side leaves free stalls every
            // forward (seen here: 10x the latency at 32 clients on 2 cores).
            tch::set_num_threads(threads.max(1) as i32);
            let loaded = load(&run, index.as_deref(), &sets, batching);
            let (loaded, info) = match loaded {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(info.clone()));
            work(&loaded, &info, jobs_rx);
        })
        .map_err(|e| Error::io("model thread", e))?;
    match ready_rx.recv() {
        Ok(Ok(info)) => Ok((jobs_tx, info, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            Err(Error::Config(
                "the model thread stopped while loading the run".into(),
            ))
        }
    }
}

/// What the model thread owns.
struct Loaded {
    run: crate::run::LoadedRun,
    /// The index's image embeddings `[n, E]` on the model's device.
    keys: Option<Tensor>,
    images: Vec<ImageItem>,
}

fn load(
    run_dir: &std::path::Path,
    index: Option<&std::path::Path>,
    sets: &[String],
    batching: Batching,
) -> Result<(Loaded, Arc<ModelInfo>)> {
    let run = crate::run::load_run(run_dir, sets)?;
    let c = &run.loaded.config;
    let fingerprint = Fingerprint::of(c, &run.checkpoint)?;
    let (keys, images, index_info) = match index {
        None => (None, Vec::new(), None),
        Some(dir) => {
            let ix = Index::open(dir)?;
            ix.manifest.model.check(dir, &fingerprint, run_dir)?;
            if ix.images.is_empty() {
                return Err(Error::Config(format!(
                    "--index {}: the index holds no images to search",
                    dir.display()
                )));
            }
            let keys = ix
                .embeddings(Items::Images)?
                .to_device(run.asm.model.device);
            let dataset = index_images(&ix, &c.data)?;
            let info = IndexInfo {
                dir: dir.to_path_buf(),
                images: ix.images.clone(),
                dataset,
            };
            (Some(keys), ix.images, Some(info))
        }
    };
    let info = Arc::new(ModelInfo {
        run: run_dir.to_path_buf(),
        step: run.state.step,
        fingerprint,
        discriminator: has_discriminator(c),
        data: c.data.clone(),
        index: index_info,
        batching,
        batches: AtomicU64::new(0),
        jobs: AtomicU64::new(0),
        pending: AtomicU64::new(0),
    });
    Ok((Loaded { run, keys, images }, info))
}

/// The jobs of the next batch: the first waited for without limit, then
/// those already queued, and, while requests are still on their way
/// ([`ModelInfo::pending`]), more until the window closes or the batch is
/// full. `None` once every sender is gone and the queue is empty.
fn next_batch(rx: &Receiver<Job>, b: Batching, info: &ModelInfo) -> Option<Vec<Job>> {
    let first = rx.recv().ok()?;
    let mut jobs = vec![first];
    let deadline = Instant::now() + b.window;
    while jobs.len() < b.max_batch.max(1) {
        if let Ok(j) = rx.try_recv() {
            jobs.push(j);
            continue;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || info.pending.load(Ordering::SeqCst) == 0 {
            break;
        }
        match rx.recv_timeout(left.min(Duration::from_micros(500))) {
            Ok(j) => jobs.push(j),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Some(jobs)
}

fn work(loaded: &Loaded, info: &ModelInfo, rx: Receiver<Job>) {
    let c = &loaded.run.loaded.config;
    let emb = Embedder::new(&loaded.run.asm.model, &loaded.run.tok, c);
    while let Some(jobs) = next_batch(&rx, info.batching, info) {
        // Counted before any reply goes, so a client that has its answer
        // sees it counted.
        info.batches.fetch_add(1, Ordering::SeqCst);
        info.jobs.fetch_add(jobs.len() as u64, Ordering::SeqCst);
        // A panic in a forward fails this batch's requests (their reply
        // senders drop), not the server.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_batch(&emb, loaded, info.discriminator, jobs)
        }));
    }
}

fn run_batch(emb: &Embedder<'_>, loaded: &Loaded, tokens: bool, jobs: Vec<Job>) {
    let (mut pixels, mut captions, mut match_replies) = (Vec::new(), Vec::new(), Vec::new());
    let (mut queries, mut ks, mut search_replies) = (Vec::new(), Vec::new(), Vec::new());
    for j in jobs {
        match j {
            Job::Match {
                pixels: p,
                caption,
                reply,
            } => {
                pixels.extend(p);
                captions.push(caption);
                match_replies.push(reply);
            }
            Job::Search { query, k, reply } => {
                queries.push(query);
                ks.push(k);
                search_replies.push(reply);
            }
        }
    }
    if !captions.is_empty() {
        let slot: Vec<usize> = (0..captions.len()).collect();
        let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
        match score_decoded(emb, &pixels, &slot, &refs, tokens) {
            Ok(scored) => {
                for (s, reply) in scored.into_iter().zip(match_replies) {
                    let _ = reply.send(Ok(MatchResult {
                        itm: s.itm,
                        itc: s.itc,
                        words: s.words,
                    }));
                }
            }
            Err(e) => {
                for reply in match_replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
    if !queries.is_empty() {
        match search(emb, loaded, &queries, &ks) {
            Ok(hits) => {
                for (h, reply) in hits.into_iter().zip(search_replies) {
                    let _ = reply.send(Ok(h));
                }
            }
            Err(e) => {
                for reply in search_replies {
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

/// Each query's top `ks[q]` images by ITC.
fn search(
    emb: &Embedder<'_>,
    loaded: &Loaded,
    queries: &[String],
    ks: &[usize],
) -> Result<Vec<Vec<SearchHit>>> {
    let keys = loaded.keys.as_ref().ok_or_else(|| {
        Error::Config("this server has no index: start it with --index DIR".into())
    })?;
    let refs: Vec<&str> = queries.iter().map(String::as_str).collect();
    let q = embed_queries(emb, &refs, refs.len())?;
    let k = ks.iter().copied().max().unwrap_or(1);
    let top = top_k(&q, keys, k, DEFAULT_BLOCK)?;
    Ok(top
        .into_iter()
        .zip(ks)
        .map(|(cands, &k)| {
            cands
                .into_iter()
                .take(k)
                .enumerate()
                .map(|(rank, (row, s))| SearchHit {
                    rank,
                    row,
                    id: loaded.images[row].id,
                    path: loaded.images[row].path.clone(),
                    itc: f64::from(s),
                    thumb: format!("/thumb/{row}"),
                })
                .collect()
        })
        .collect())
}
