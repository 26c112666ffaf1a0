//! `vlmatch embed`: images and captions to an index directory
//! ([`super::index`]), in chunks of rows written durably one after the other
//! with a progress record after each, so that a killed embed continues at
//! the first chunk not recorded and ends with the bytes an uninterrupted one
//! writes (each chunk's batches are the same whatever was done before).

use super::index::{
    self, chunk_path, chunks, Dtype, Fingerprint, ImageItem, Items, Manifest, Progress, SourceSpec,
    TextItem,
};
use crate::data::{Dataset, ImageRef, Pair};
use crate::tokenizer::Tokenizer;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Kind, Tensor};
use vlmatch_core::{EncoderInput, Error, Result, VlModel};

/// The fault point of the embed tests (builds with `fault-injection`
/// only): `N` kills the process (SIGKILL) right after the N-th chunk file
/// of this invocation is written, before its progress is recorded.
pub const KILL_AFTER_CHUNKS: &str = "VLMATCH_TEST_EMBED_KILL";

/// What the model needs to embed: the preprocessing of its run.
pub struct Embedder<'a> {
    pub model: &'a VlModel,
    pub tokenizer: &'a Tokenizer,
    pub image_size: usize,
    pub max_len: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// ITC embedding width.
    pub dim: usize,
}

impl<'a> Embedder<'a> {
    pub fn new(
        model: &'a VlModel,
        tokenizer: &'a Tokenizer,
        cfg: &vlmatch_registry::Config,
    ) -> Self {
        Embedder {
            model,
            tokenizer,
            image_size: cfg.data.image_size as usize,
            max_len: cfg.data.max_len as usize,
            mean: cfg.data.mean,
            std: cfg.data.std,
            dim: cfg.model.embed_dim as usize,
        }
    }

    /// Image encoder states of images `indices` of `ds`.
    pub fn image_states(&self, ds: &Dataset, indices: &[usize]) -> Result<vlmatch_core::Encoded> {
        let s = self.image_size as i64;
        let mut pixels = Vec::with_capacity(indices.len() * 3 * self.image_size * self.image_size);
        for &i in indices {
            pixels.extend(ds.load_image(i, self.image_size, self.mean, self.std)?);
        }
        let images = Tensor::from_slice(&pixels)
            .view([indices.len() as i64, 3, s, s])
            .to_device(self.model.device);
        tch::no_grad(|| {
            self.model
                .image
                .forward_t(EncoderInput::Image(&images), false)
        })
    }

    /// Text encoder states of `texts` (padded to the longest).
    pub fn text_states(&self, texts: &[&str]) -> Result<vlmatch_core::Encoded> {
        let batch = self
            .tokenizer
            .text_batch(texts, self.max_len, self.model.device);
        tch::no_grad(|| self.model.text.forward_t(EncoderInput::Text(&batch), false))
    }

    /// Unit ITC embeddings `[n, E]` (f32) of images `indices` of `ds`.
    pub fn images(&self, ds: &Dataset, indices: &[usize]) -> Result<Tensor> {
        let states = self.image_states(ds, indices)?;
        Ok(tch::no_grad(|| self.model.contrastive.embed_image(&states)))
    }

    /// Unit ITC embeddings `[n, E]` (f32) of `texts`.
    pub fn texts(&self, texts: &[&str]) -> Result<Tensor> {
        let states = self.text_states(texts)?;
        Ok(tch::no_grad(|| self.model.contrastive.embed_text(&states)))
    }
}

/// Image files of a folder and its subfolders (`.jpg`, `.jpeg`, `.png`),
/// sorted by path, as a dataset without captions.
pub fn folder_dataset(dir: &Path) -> Result<Dataset> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let p = e.map_err(|e| Error::io(dir, e))?.path();
            if p.is_dir() {
                walk(&p, out)?;
            } else if p
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| ["jpg", "jpeg", "png"].contains(&x.to_ascii_lowercase().as_str()))
            {
                out.push(p);
            }
        }
        Ok(())
    }
    let mut files = Vec::new();
    walk(dir, &mut files)?;
    files.sort();
    if files.is_empty() {
        return Err(Error::Config(format!(
            "--data {}: the folder holds no .jpg, .jpeg or .png image",
            dir.display()
        )));
    }
    Ok(Dataset {
        name: dir.display().to_string(),
        image_ids: (0..files.len() as i64).collect(),
        images: files
            .into_iter()
            .map(|path| ImageRef::File {
                path,
                origin: "--data folder".into(),
                bytes: None,
            })
            .collect(),
        pairs: Vec::new(),
        skipped: 0,
        store: None,
    })
}

/// Captions of a text file, one per non-empty line, as a dataset without
/// images.
pub fn captions_dataset(path: &Path) -> Result<Dataset> {
    let text = vlmatch_registry::check::read_utf8(path)?;
    let pairs: Vec<Pair> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|c| Pair {
            image: usize::MAX,
            caption: c.to_string(),
        })
        .collect();
    if pairs.is_empty() {
        return Err(Error::Data {
            path: path.to_path_buf(),
            line: None,
            message: "no captions (one per line expected)".into(),
        });
    }
    Ok(Dataset {
        name: path.display().to_string(),
        images: Vec::new(),
        image_ids: Vec::new(),
        pairs,
        skipped: 0,
        store: None,
    })
}

/// The dataset a source names: a folder of images, an annotation file or
/// tar shards (read under the run's `[data]` limits), or a caption file.
pub fn load_source(
    spec: &SourceSpec,
    data: &vlmatch_registry::config::DataConfig,
) -> Result<Dataset> {
    match spec.kind.as_str() {
        "folder" => folder_dataset(Path::new(&spec.data)),
        "captions" => captions_dataset(Path::new(&spec.data)),
        "annotations" | "shards" => crate::data::load_any_within(
            &spec.data,
            spec.image_root.as_deref().map(Path::new),
            spec.split.as_deref(),
            data,
        ),
        other => Err(Error::Config(format!(
            "source kind `{other}`: expected folder, annotations, shards or captions"
        ))),
    }
}

/// The source `--data` names (a folder, tar shards or an annotation file),
/// or `--captions`.
pub fn source_spec(
    data: Option<&str>,
    captions: Option<&Path>,
    image_root: Option<&Path>,
    split: Option<&str>,
) -> Result<SourceSpec> {
    let (kind, data) = match (data, captions) {
        (Some(d), None) if Path::new(d).is_dir() => ("folder", d.to_string()),
        (Some(d), None) if crate::data::is_shard_pattern(d) => ("shards", d.to_string()),
        (Some(d), None) => ("annotations", d.to_string()),
        (None, Some(c)) => ("captions", c.display().to_string()),
        _ => {
            return Err(Error::Config(
                "give either --data (an image folder, an annotation file or tar shards) or \
                 --captions (a text file, one caption per line)"
                    .into(),
            ))
        }
    };
    Ok(SourceSpec {
        kind: kind.into(),
        data,
        image_root: image_root.map(|p| p.display().to_string()),
        split: split.map(String::from),
    })
}

/// The items of `ds` an index lists: every image, every caption with its
/// image's id.
pub fn items_of(ds: &Dataset) -> (Vec<ImageItem>, Vec<TextItem>) {
    let images = ds
        .images
        .iter()
        .zip(&ds.image_ids)
        .map(|(r, &id)| ImageItem {
            id,
            path: match r {
                ImageRef::File { path, .. } => path.display().to_string(),
                ImageRef::Scene(_) => format!("scene:{id}"),
            },
        })
        .collect();
    let texts = ds
        .pairs
        .iter()
        .enumerate()
        .map(|(n, p)| TextItem {
            id: n,
            image_id: ds.image_ids.get(p.image).copied(),
            caption: p.caption.clone(),
        })
        .collect();
    (images, texts)
}

pub struct EmbedOptions {
    pub out: PathBuf,
    pub dtype: Dtype,
    /// Rows per chunk file.
    pub chunk: usize,
    /// Rows per forward.
    pub batch: usize,
    pub images: bool,
    pub texts: bool,
    pub progress: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbedSummary {
    pub index: String,
    pub images: usize,
    pub texts: usize,
    pub dim: usize,
    /// Chunks this invocation wrote, and those an earlier one had.
    pub chunks_written: usize,
    pub chunks_resumed: usize,
    pub seconds: f64,
}

/// Embed `ds` into `opts.out` with `emb`'s model (fingerprint `model`),
/// continuing an unfinished index of the same model, source and settings.
/// With the ranks of `par`, each embeds every `world`-th chunk and rank 0
/// alone writes, the same bytes as one process on the CPU.
pub fn embed(
    emb: &Embedder<'_>,
    model: Fingerprint,
    source: SourceSpec,
    ds: &Dataset,
    opts: &EmbedOptions,
    par: Option<&crate::parallel::Parallel>,
) -> Result<EmbedSummary> {
    let started = Instant::now();
    let (mut images, mut texts) = items_of(ds);
    if !opts.images {
        images.clear();
    }
    if !opts.texts {
        texts.clear();
    }
    if images.is_empty() && texts.is_empty() {
        return Err(Error::Config(format!(
            "{}: nothing to embed (no {})",
            source.data,
            if opts.images { "images" } else { "captions" }
        )));
    }
    let dim = emb.dim;
    let manifest = Manifest {
        format: index::FORMAT.into(),
        version: index::VERSION,
        model,
        dtype: opts.dtype,
        dim,
        chunk: opts.chunk.max(1),
        source,
        images: images.len(),
        texts: texts.len(),
    };
    let dir = &opts.out;
    // Rank 0 opens or continues the index; every rank learns where it
    // stands.
    let opened = crate::parallel::on_rank0(par, "opening the index", || {
        let progress = start_or_resume(dir, &manifest)?;
        for kind in [Items::Images, Items::Texts] {
            std::fs::create_dir_all(dir.join(kind.name())).map_err(|e| Error::io(dir, e))?;
        }
        crate::durable::write(
            &index::items_path(dir, Items::Images),
            index::jsonl(&images),
        )?;
        crate::durable::write(&index::items_path(dir, Items::Texts), index::jsonl(&texts))?;
        index::write_progress(dir, progress)?;
        Ok(progress)
    })?;
    let mut progress = agree_progress(par, opened, emb.model.device)?;
    let collective = par.map(|p| p.collective());
    let (rank, world) = collective
        .as_ref()
        .map_or((0, 1), |c| (c.rank(), c.world_size()));

    let chunk = manifest.chunk;
    let total = chunks(images.len(), chunk) + chunks(texts.len(), chunk);
    let resumed = progress.images + progress.texts;
    let bar = if opts.progress && rank == 0 && std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(total as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "[{elapsed_precise}] {bar:20} chunk {pos}/{len} {per_sec} ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(resumed as u64);
    bar.reset_eta();
    if resumed > 0 && rank == 0 {
        tracing::info!(index = %dir.display(), chunks = resumed, of = total, "resuming");
    }
    let kill_after = kill_after();
    let mut written = 0usize;
    let batch = opts.batch.max(1);
    let caption_refs: Vec<&str> = texts.iter().map(|t| t.caption.as_str()).collect();
    for kind in [Items::Images, Items::Texts] {
        let n = match kind {
            Items::Images => images.len(),
            Items::Texts => texts.len(),
        };
        let done = match kind {
            Items::Images => progress.images,
            Items::Texts => progress.texts,
        };
        let n_chunks = chunks(n, chunk);
        let rows_of = |c: usize| c * chunk..((c + 1) * chunk).min(n);
        bar.set_message(kind.name());
        // In rounds of one chunk per rank: rank r embeds chunk `first + r`;
        // rank 0 gathers them and writes them in order.
        let mut first = done;
        while first < n_chunks {
            let mine = first + rank;
            let mut parts = Vec::new();
            if mine < n_chunks {
                let rows: Vec<usize> = rows_of(mine).collect();
                for b in rows.chunks(batch) {
                    parts.push(match kind {
                        Items::Images => emb.images(ds, b)?,
                        Items::Texts => {
                            let t: Vec<&str> = b.iter().map(|&j| caption_refs[j]).collect();
                            emb.texts(&t)?
                        }
                    });
                }
            }
            let round: Vec<(usize, Tensor)> = match &collective {
                None => vec![(mine, Tensor::cat(&parts, 0))],
                Some(c) => {
                    // Equal shapes on every rank: `chunk` rows, zeros past
                    // this rank's own.
                    let own = if parts.is_empty() {
                        Tensor::zeros([0, dim as i64], (Kind::Float, emb.model.device))
                    } else {
                        Tensor::cat(&parts, 0)
                    };
                    let pad = Tensor::zeros(
                        [chunk as i64 - own.size()[0], dim as i64],
                        (Kind::Float, emb.model.device),
                    );
                    let all = c.all_gather(&Tensor::cat(&[own, pad], 0))?;
                    (0..world)
                        .map(|r| first + r)
                        .filter(|&c| c < n_chunks)
                        .map(|c| {
                            let at = ((c - first) * chunk) as i64;
                            (c, all.narrow(0, at, rows_of(c).len() as i64))
                        })
                        .collect()
                }
            };
            crate::parallel::on_rank0(par, "writing index chunks", || {
                for (c, t) in &round {
                    let bytes = index::to_bytes(t, manifest.dtype)?;
                    crate::durable::write(&chunk_path(dir, kind, *c), bytes)?;
                    written += 1;
                    if kill_after == Some(written) {
                        tracing::warn!(chunk = c, "fault injection: SIGKILL after a chunk write");
                        // SAFETY: kill(2) on our own pid; nothing runs after it.
                        unsafe {
                            libc::kill(libc::getpid(), libc::SIGKILL);
                        }
                    }
                    match kind {
                        Items::Images => progress.images = c + 1,
                        Items::Texts => progress.texts = c + 1,
                    }
                    index::write_progress(dir, progress)?;
                    bar.inc(1);
                    if opts.progress && bar.is_hidden() {
                        eprintln!(
                            "embed {} chunk {}/{n_chunks} ({} rows)",
                            kind.name(),
                            c + 1,
                            rows_of(*c).len()
                        );
                    }
                }
                Ok(())
            })?;
            first += world;
        }
    }
    bar.finish_and_clear();
    Ok(EmbedSummary {
        index: dir.display().to_string(),
        images: images.len(),
        texts: texts.len(),
        dim,
        chunks_written: written,
        chunks_resumed: resumed,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The progress of an index directory to continue: none for a new or empty
/// directory (whose manifest is then written); the recorded one when its
/// manifest is this one; an error naming what differs otherwise.
fn start_or_resume(dir: &Path, manifest: &Manifest) -> Result<Progress> {
    let path = index::manifest_path(dir);
    if !path.exists() {
        if dir.is_dir()
            && std::fs::read_dir(dir)
                .map_err(|e| Error::io(dir, e))?
                .next()
                .is_some()
        {
            return Err(Error::Config(format!(
                "--out {}: the folder is not empty and holds no index; give a new folder",
                dir.display()
            )));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let text = serde_json::to_string_pretty(manifest).expect("serialisable") + "\n";
        crate::durable::write(&path, text)?;
        return Ok(Progress::default());
    }
    let old = index::read_manifest(dir)?;
    if &old != manifest {
        let mut diffs = Vec::new();
        if old.model != manifest.model {
            diffs.push("the model (fingerprint)");
        }
        if old.source != manifest.source {
            diffs.push("the source");
        }
        if (old.images, old.texts) != (manifest.images, manifest.texts) {
            diffs.push("the item counts");
        }
        if old.dtype != manifest.dtype {
            diffs.push("--dtype");
        }
        if old.chunk != manifest.chunk {
            diffs.push("--chunk");
        }
        if old.dim != manifest.dim {
            diffs.push("the embedding width");
        }
        return Err(Error::Config(format!(
            "--out {} holds an index that differs in {}; give a new folder to make a \
             new index, or the same arguments to finish this one",
            dir.display(),
            diffs.join(", ")
        )));
    }
    index::read_progress(dir)
}

/// Rank 0's progress (`opened`) on every rank of `par`.
fn agree_progress(
    par: Option<&crate::parallel::Parallel>,
    opened: Option<Progress>,
    device: tch::Device,
) -> Result<Progress> {
    let Some(p) = par else {
        return Ok(opened.expect("one process opens the index itself"));
    };
    let o = opened.unwrap_or_default();
    let t = Tensor::from_slice(&[o.images as i64, o.texts as i64]).to_device(device);
    p.broadcast(&[t.shallow_clone()])?;
    let v = Vec::<i64>::try_from(t.to_device(tch::Device::Cpu))?;
    Ok(Progress {
        images: v[0] as usize,
        texts: v[1] as usize,
    })
}

/// [`KILL_AFTER_CHUNKS`], in builds with the `fault-injection` feature.
fn kill_after() -> Option<usize> {
    if !cfg!(feature = "fault-injection") {
        return None;
    }
    std::env::var(KILL_AFTER_CHUNKS).ok()?.parse().ok()
}

/// Unit embeddings of `kind` from a dataset, for callers that embed
/// queries; the same batching as [`embed`] for one batch.
pub fn embed_queries(emb: &Embedder<'_>, texts: &[&str], batch: usize) -> Result<Tensor> {
    let mut parts = Vec::new();
    for b in texts.chunks(batch.max(1)) {
        parts.push(emb.texts(b)?);
    }
    if parts.is_empty() {
        return Ok(Tensor::zeros([0, 1], (Kind::Float, emb.model.device)));
    }
    Ok(Tensor::cat(&parts, 0))
}
