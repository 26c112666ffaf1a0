//! `vlmatch embed`, `search`, `score` and `filter`: the arguments and the
//! command bodies over [`crate::matcher`].

use crate::matcher::embed::{self, EmbedOptions, Embedder};
use crate::matcher::filter::{By, FilterOptions};
use crate::matcher::index::{Dtype, Fingerprint, Index};
use crate::matcher::score::{ScoreOptions, ScoreProgress};
use crate::matcher::search::{self, SearchOptions};
use clap::Args;
use std::io::Write;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

#[derive(Args, Debug)]
pub struct EmbedArgs {
    /// The trained run directory (its config.toml and newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Images and captions: an image folder (searched recursively for
    /// .jpg/.jpeg/.png), an annotation file, or tar shards (`a-{000..009}.tar`).
    #[arg(long, conflicts_with = "captions")]
    pub data: Option<String>,
    /// Captions only: a text file, one caption per line.
    #[arg(long)]
    pub captions: Option<PathBuf>,
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    /// Karpathy split(s) of a `dataset_coco.json`-style file.
    #[arg(long)]
    pub split: Option<String>,
    /// The index directory (new, or an unfinished one to continue).
    #[arg(long)]
    pub out: PathBuf,
    /// How embeddings are stored: f16 or f32.
    #[arg(long, default_value = "f16")]
    pub dtype: Dtype,
    /// Embed only `images` or only `texts` of the source.
    #[arg(long)]
    pub only: Option<String>,
    /// Rows per chunk file (each written durably, the unit of resuming).
    #[arg(long, default_value_t = 4096)]
    pub chunk: usize,
    /// Rows per forward (default: the run's eval.batch_size).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct SearchArgs {
    /// The run whose model built the index.
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// An index directory written by `vlmatch embed`.
    #[arg(long)]
    pub index: PathBuf,
    /// A text query, answered with images (repeatable).
    #[arg(long)]
    pub text: Vec<String>,
    /// A file of text queries, one per line.
    #[arg(long)]
    pub queries: Option<PathBuf>,
    /// An image query, answered with captions (repeatable).
    #[arg(long)]
    pub image: Vec<PathBuf>,
    /// Results per query.
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    /// Re-rank each query's top R by ITC with the ITM match probability.
    #[arg(long, value_name = "R")]
    pub rerank: Option<usize>,
    /// Index rows per block of the exact search.
    #[arg(long, default_value_t = search::DEFAULT_BLOCK)]
    pub block: usize,
    /// Rows per forward (default: the run's eval.batch_size).
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

#[derive(Args, Debug)]
pub struct ScoreArgs {
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// An annotation file or tar shards.
    #[arg(long)]
    pub data: String,
    #[arg(long)]
    pub image_root: Option<PathBuf>,
    #[arg(long)]
    pub split: Option<String>,
    /// The JSON-lines file (resumable; default: standard output).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also each word's mismatch probability from the VL-RTD discriminator.
    #[arg(long)]
    pub tokens: bool,
    /// Pairs per forward, and per durable step of `--out`.
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct FilterArgs {
    /// The lines `vlmatch score --out` wrote.
    #[arg(long)]
    pub scores: PathBuf,
    /// The new annotation file.
    #[arg(long)]
    pub out: PathBuf,
    /// The score compared: itc, itm, or word-match (1 - the highest word
    /// mismatch probability; needs `score --tokens`).
    #[arg(long, default_value = "itm")]
    pub by: By,
    /// Pairs at or above it are kept.
    #[arg(long)]
    pub threshold: f64,
    /// The report (default: OUT.report.json).
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// The score histogram as a PNG.
    #[arg(long)]
    pub png: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub bins: usize,
}

/// `vlmatch embed`.
pub fn embed_cmd(a: &EmbedArgs) -> Result<embed::EmbedSummary> {
    let (images, texts) = match a.only.as_deref() {
        None => (true, true),
        Some("images") => (true, false),
        Some("texts") => (false, true),
        Some(other) => {
            return Err(Error::Config(format!(
                "--only `{other}`: expected `images` or `texts`"
            )))
        }
    };
    let source = embed::source_spec(
        a.data.as_deref(),
        a.captions.as_deref(),
        a.image_root.as_deref(),
        a.split.as_deref(),
    )?;
    // Several ranks under a launcher share the chunks.
    let loaded = crate::run::run_config(&a.checkpoint, &a.sets)?;
    let (device, par) = crate::parallel::join_launched(&loaded.config.train)?;
    let result = (|| {
        let run = crate::run::load_run_on(&a.checkpoint, &a.sets, Some(device))?;
        let c = &run.loaded.config;
        let ds = embed::load_source(&source, &c.data)?;
        let fingerprint = Fingerprint::of(c, &run.checkpoint)?;
        let emb = Embedder::new(&run.asm.model, &run.tok, c);
        let opts = EmbedOptions {
            out: a.out.clone(),
            dtype: a.dtype,
            chunk: a.chunk,
            batch: a.batch.unwrap_or(c.eval.batch_size),
            images,
            texts,
            progress: !a.quiet,
        };
        embed::embed(&emb, fingerprint, source, &ds, &opts, par.as_ref())
    })();
    crate::parallel::finish(result, par)
}

/// `vlmatch search`: the answers, one per query (text queries first).
pub fn search_cmd(a: &SearchArgs) -> Result<Vec<search::Answer>> {
    let mut texts: Vec<String> = a.text.clone();
    if let Some(q) = &a.queries {
        let file = vlmatch_registry::check::read_utf8(q)?;
        texts.extend(
            file.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from),
        );
    }
    if texts.is_empty() && a.image.is_empty() {
        return Err(Error::Config(
            "search needs a query: --text, --queries FILE or --image PATH".into(),
        ));
    }
    if a.rerank.is_some_and(|r| r < a.k) {
        return Err(Error::Config(format!(
            "--rerank {}: re-rank at least the -k {} results shown",
            a.rerank.unwrap_or(0),
            a.k
        )));
    }
    let index = Index::open(&a.index)?;
    let run = crate::run::load_run(&a.checkpoint, &a.sets)?;
    let c = &run.loaded.config;
    index.manifest.model.check(
        &a.index,
        &Fingerprint::of(c, &run.checkpoint)?,
        &a.checkpoint,
    )?;
    let emb = Embedder::new(&run.asm.model, &run.tok, c);
    let opts = SearchOptions {
        k: a.k,
        rerank: a.rerank,
        block: a.block,
        batch: a.batch.unwrap_or(c.eval.batch_size),
    };
    let mut answers = Vec::new();
    if !texts.is_empty() {
        if index.images.is_empty() {
            return Err(Error::Config(format!(
                "--text: index {} holds no images to search",
                a.index.display()
            )));
        }
        let images = match a.rerank {
            Some(_) => Some(search::index_images(&index, &c.data)?),
            None => None,
        };
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        answers.extend(search::texts_to_images(
            &emb,
            &index,
            images.as_ref(),
            &refs,
            &opts,
        )?);
    }
    if !a.image.is_empty() {
        if index.texts.is_empty() {
            return Err(Error::Config(format!(
                "--image: index {} holds no captions to search",
                a.index.display()
            )));
        }
        let queries = search::files_dataset(a.image.iter().map(PathBuf::as_path), "--image");
        answers.extend(search::images_to_texts(&emb, &index, &queries, &opts)?);
    }
    Ok(answers)
}

/// [`search_cmd`], one JSON line per query on standard output.
pub fn search_print(a: &SearchArgs) -> Result<()> {
    let answers = search_cmd(a)?;
    let mut out = std::io::stdout().lock();
    for ans in &answers {
        writeln!(out, "{}", serde_json::to_string(ans).expect("json"))
            .map_err(|e| Error::io("standard output", e))?;
    }
    Ok(())
}

/// `vlmatch score`: to `--out` (resumable) or standard output.
pub fn score_cmd(a: &ScoreArgs) -> Result<crate::matcher::score::ScoreSummary> {
    let source = embed::source_spec(
        Some(&a.data),
        None,
        a.image_root.as_deref(),
        a.split.as_deref(),
    )?;
    if source.kind == "folder" {
        return Err(Error::Config(format!(
            "--data {}: score needs pairs (an annotation file or tar shards), not a folder",
            a.data
        )));
    }
    let loaded = crate::run::run_config(&a.checkpoint, &a.sets)?;
    if a.tokens && !crate::matcher::score::has_discriminator(&loaded.config) {
        return Err(Error::Config(format!(
            "--tokens: run {} was trained without a VL-RTD objective (no enabled \
             `[objectives.*]` of plugin `rtd`), so it has no trained discriminator to score \
             words with; score without --tokens, or train with configs/vlmatch.toml",
            a.checkpoint.display()
        )));
    }
    // Several ranks under a launcher share the blocks of pairs.
    let (device, par) = crate::parallel::join_launched(&loaded.config.train)?;
    let result = (|| {
        let run = crate::run::load_run_on(&a.checkpoint, &a.sets, Some(device))?;
        let c = &run.loaded.config;
        let ds = embed::load_source(&source, &c.data)?;
        let root = match source.kind.as_str() {
            "annotations" => Some(match &a.image_root {
                Some(r) => r.clone(),
                None => Path::new(&a.data)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default(),
            }),
            _ => None,
        };
        let emb = Embedder::new(&run.asm.model, &run.tok, c);
        let opts = ScoreOptions {
            tokens: a.tokens,
            batch: a.batch.unwrap_or(c.eval.batch_size),
            on_error: c.data.on_error,
            root,
            progress: !a.quiet && a.out.is_some(),
        };
        let par = par.as_ref();
        match &a.out {
            Some(out) => {
                let record = ScoreProgress {
                    model: Fingerprint::of(c, &run.checkpoint)?,
                    source: source.clone(),
                    tokens: a.tokens,
                    total: ds.pairs.len(),
                    pairs: 0,
                    bytes: 0,
                };
                crate::matcher::score::score_to_file(&emb, &ds, &opts, record, out, par)
            }
            None => {
                let mut stdout = std::io::stdout().lock();
                let mut nothing = |_| Ok(());
                crate::matcher::score::stream(&emb, &ds, &opts, 0, &mut stdout, &mut nothing, par)
            }
        }
    })();
    crate::parallel::finish(result, par)
}

/// `vlmatch filter`.
pub fn filter_cmd(a: &FilterArgs) -> Result<crate::matcher::filter::FilterReport> {
    if !a.threshold.is_finite() {
        return Err(Error::Config(format!(
            "--threshold {}: expected a finite number",
            a.threshold
        )));
    }
    crate::matcher::filter::filter(
        &a.scores,
        &a.out,
        &FilterOptions {
            by: a.by,
            threshold: a.threshold,
            bins: a.bins,
            report: a.report.clone(),
            png: a.png.clone(),
        },
    )
}

/// The CLI's entry for the four commands: run one, print its JSON lines or
/// its summary (on the last line of standard output; for `score` without
/// `--out`, whose lines are the output, in the log).
pub fn main(command: Matcher) -> Result<()> {
    let summary = match command {
        Matcher::Embed(a) => serde_json::to_value(embed_cmd(&a)?),
        Matcher::Search(a) => return search_print(&a),
        Matcher::Score(a) => {
            let s = score_cmd(&a)?;
            if a.out.is_none() {
                tracing::info!(
                    pairs = s.pairs,
                    scored = s.scored,
                    errors = s.errors,
                    "scored"
                );
                return Ok(());
            }
            serde_json::to_value(s)
        }
        Matcher::Filter(a) => serde_json::to_value(filter_cmd(&a)?),
    };
    // Ranks other than 0 of a launch print nothing.
    let rank = vlmatch_dist::LaunchEnv::from_env()
        .ok()
        .flatten()
        .map_or(0, |l| l.rank);
    if rank == 0 {
        println!("{}", summary.expect("serialisable"));
    }
    Ok(())
}

/// One of the four commands with its arguments.
pub enum Matcher {
    Embed(EmbedArgs),
    Search(SearchArgs),
    Score(ScoreArgs),
    Filter(FilterArgs),
}
