//! The `vlmatch` command line.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use vlmatch_core::{Error, Result};
use vlmatch_registry::ConfigLayers;

#[derive(Parser, Debug)]
#[command(
    name = "vlmatch",
    version,
    about = "VL-Match vision-language pretraining"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// A dynamic plugin library to load (repeatable). The one way to load a
    /// library a run directory's config names.
    #[arg(long = "plugin", value_name = "PATH", global = true)]
    pub plugins: Vec<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Train a model (default: the tiny preset on the built-in dataset).
    Train {
        #[command(flatten)]
        config: ConfigArgs,
        /// Run directory (default: runs/<preset>-<UTC time>).
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Continue a run directory from its newest checkpoint.
        #[arg(long, conflicts_with = "run_dir")]
        resume: Option<PathBuf>,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
        /// Start a new run in a --run-dir that holds another run's
        /// checkpoints (they move to checkpoints.old-TIME).
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// Test hook: rank RANK kills itself, hangs or is sent SIGTERM right after
        /// step STEP, or has a NaN loss at step STEP. Only in builds with the
        /// `fault-injection` feature (`cargo xtask test`).
        #[cfg(feature = "fault-injection")]
        #[arg(long, value_name = "RANK:STEP:kill|hang|term|nan", hide = true)]
        fault: Option<crate::fault::Fault>,
    },
    /// Evaluate a trained run: `retrieval` (ITC top-k re-ranked by ITM, on an
    /// annotation file or tar shards), `matching` (lines {"image", "caption",
    /// "negative"} and an optional "kind"), `zeroshot` (lines {"image", "label"} and `--labels`),
    /// `vqa` (a run fine-tuned with `finetune --task vqa`; lines {"image",
    /// "question", "answer"} or `--data builtin`), `snli-ve` and `nlvr2`
    /// (a run fine-tuned with `finetune --task snli-ve|nlvr2`; ALBEF's JSON
    /// or `--data builtin`, whose `--split` is `val`/`dev`, `test` (default)
    /// or `train`), `heldout` (the run's own
    /// held-out set: retrieval and fine-grained matching by kind, as training
    /// reports them). Prints one JSON object on the last line; writes
    /// RUN_DIR/eval-TASK.json.
    Eval {
        /// The run directory (its config.toml and newest checkpoint).
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        task: String,
        /// The evaluation data (not used by `heldout`).
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        image_root: Option<PathBuf>,
        /// Karpathy split(s) of a `dataset_coco.json`-style file, e.g. `test`;
        /// for `snli-ve`/`nlvr2` on `--data builtin`: `val`, `dev`, `test`, `train`.
        #[arg(long)]
        split: Option<String>,
        /// Candidate labels for `zeroshot`: a JSON list of strings, or one
        /// label per line.
        #[arg(long)]
        labels: Option<PathBuf>,
        /// Overrides over the run's config, e.g. `--set eval.k=64`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long)]
        quiet: bool,
    },
    /// Generate NegGen negatives for an annotation file with a trained run's
    /// generator and ITM filter, one JSON line per negative, with provenance.
    /// NegGen keys come from the run's `[samplers.neggen]` if present, and
    /// `--set samplers.neggen.KEY=...`.
    Neggen {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        image_root: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long)]
        quiet: bool,
    },
    /// List registered plugins by kind, with where each comes from (built
    /// in, a linked crate, or a library from `--plugin` or the config's
    /// `plugins.paths`).
    Plugins {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print what libtorch sees: CUDA, devices, cuDNN, threads.
    Env,
    /// Write the first training images as PNG files plus `captions.txt`, to
    /// look at what the model sees, and `annotations.jsonl` (ALBEF format)
    /// to evaluate on or run `neggen` over. Also `pairs.jsonl` (each pair of
    /// those images with its token ids and, when a sampler is `neggen`, the
    /// words NegGen may replace), `vocab.txt` and `meta.json` (special
    /// token ids, data settings), and for `--split heldout` `matching.jsonl`
    /// (the held-out matching triples, tokenised): with `--all`, what an
    /// outside implementation (bench/reference.py) needs to train and
    /// evaluate on exactly vlmatch's data without a tokenizer of its own.
    Preview {
        #[command(flatten)]
        config: ConfigArgs,
        /// Number of images.
        #[arg(long, default_value_t = 8)]
        count: usize,
        /// Every image of the split (instead of `--count`).
        #[arg(long)]
        all: bool,
        /// `train`, or `heldout` (the set training evaluates on).
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Fine-tune a pretrained run on a downstream task (`vqa`: a classifier
    /// over the training answers on the fused [CLS]). `--data builtin` uses
    /// questions about the built-in scenes. `snli-ve` (3-way) and `nlvr2`
    /// (two images, true/false): ALBEF's heads and JSON files, accuracy on
    /// `--val`/`--test`, the best checkpoint on `--val` kept; `--data
    /// builtin` uses statements about the built-in scenes. Writes a run
    /// directory (default CHECKPOINT/TASK) that `eval --task TASK` reads.
    Finetune {
        #[arg(long)]
        task: String,
        /// The pretrained run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// JSON/JSONL lines {"image", "question", "answer"} (vqa),
        /// {"image", "sentence", "label"} (snli-ve), {"images", "sentence",
        /// "label"} (nlvr2), or `builtin`.
        #[arg(long)]
        data: PathBuf,
        /// snli-ve/nlvr2: validation data (SNLI-VE val, NLVR2 dev) that picks
        /// the checkpoint kept; default with `--data builtin`: built-in.
        #[arg(long)]
        val: Option<PathBuf>,
        /// snli-ve/nlvr2: test data, evaluated with the kept checkpoint.
        #[arg(long)]
        test: Option<PathBuf>,
        /// snli-ve/nlvr2: validate every N steps (default: steps / 5).
        #[arg(long)]
        eval_every: Option<i64>,
        /// snli-ve/nlvr2: train and evaluate with blank images (the
        /// text-only baseline).
        #[arg(long)]
        blank_images: bool,
        #[arg(long)]
        image_root: Option<PathBuf>,
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long, default_value_t = 1000)]
        steps: i64,
        #[arg(long, default_value_t = 1e-4)]
        lr: f64,
        /// Default: the run's train.batch_size.
        #[arg(long)]
        batch_size: Option<usize>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        #[arg(long)]
        quiet: bool,
        /// Continue the fine-tuned run in `--out` (default CHECKPOINT/TASK)
        /// from its newest checkpoint.
        #[arg(long)]
        resume: bool,
        /// Inject a failure (fault tests): RANK:STEP:kill|hang|term|nan. Only
        /// in builds with the `fault-injection` feature.
        #[cfg(feature = "fault-injection")]
        #[arg(long, hide = true)]
        fault: Option<crate::fault::Fault>,
    },
    /// Write a run's image and text encoders in the HuggingFace hub layout
    /// (OUT/image: ViT; OUT/text: BERT with its vocab.txt) for
    /// `transformers` `from_pretrained`.
    Export {
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Show where a caption disagrees with an image: each word with the
    /// VL-RTD discriminator's probability that it does not match, and the ITM
    /// match probability. Prints a table, then one JSON object on the last
    /// line; `--html` writes a page highlighting the suspicious words.
    Explain {
        /// A trained run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        text: String,
        #[arg(long)]
        html: Option<PathBuf>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Time training steps, the data pipeline and NegGen for a config, and
    /// with `--reference`, the PyTorch yardstick on the same inputs; prints
    /// a table of ratios and writes OUT/bench.json. `cargo xtask bench`
    /// runs it with the reference.
    Bench {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, default_value = "target/bench")]
        out: PathBuf,
        /// Timed steps per repeat.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        #[arg(long, default_value_t = 5)]
        repeats: usize,
        /// Distinct fixed batches the steps cycle through.
        #[arg(long, default_value_t = 4)]
        batches: usize,
        /// JPEG files for the data-pipeline comparison (0: skip it).
        #[arg(long, default_value_t = 384)]
        data_images: usize,
        /// Side of those files (decoded and resized to data.image_size).
        #[arg(long, default_value_t = 480)]
        data_image_side: usize,
        /// Skip the NegGen rate.
        #[arg(long)]
        no_neggen: bool,
        /// The PyTorch reference script (e.g. bench/reference.py).
        #[arg(long, requires = "python")]
        reference: Option<PathBuf>,
        /// The Python that runs it (torch 2.11.0, safetensors, transformers, pillow).
        #[arg(long)]
        python: Option<PathBuf>,
        /// Time re-ranked retrieval instead of a training step: vlmatch's
        /// protocol against ALBEF's loop in the reference, on a generated set.
        #[arg(long)]
        eval: bool,
        /// With --eval: images in the generated set.
        #[arg(long, default_value_t = 1000)]
        eval_images: usize,
        /// With --eval: captions per image.
        #[arg(long, default_value_t = 5)]
        eval_captions_per_image: usize,
        /// With --eval: candidates per query re-ranked by ITM.
        #[arg(long, default_value_t = 16)]
        eval_k: usize,
        /// Instead: open a generated annotation file of this many captions
        /// held in memory and through its index (time, peak and resident
        /// memory, PSS of two processes; bench/NOTES.md).
        #[arg(long)]
        annotations: Option<usize>,
        /// With --annotations: skip the in-memory loader (about 1 KB per
        /// caption).
        #[arg(long)]
        annotations_index_only: bool,
        /// One measurement of --annotations, in its own process.
        #[arg(long, hide = true, requires = "annotation_file")]
        annotation_probe: Option<String>,
        #[arg(long, hide = true)]
        annotation_file: Option<PathBuf>,
        #[arg(long, hide = true)]
        annotation_hold: bool,
    },
    /// Embed images and/or captions (an image folder, an annotation file,
    /// tar shards, or `--captions FILE`) into an index directory of ITC
    /// embeddings with the model's fingerprint; resumable (docs/using.md).
    Embed(crate::commands::matcher::EmbedArgs),
    /// Search an index: text -> images, image -> captions; exact top-k by
    /// ITC, `--rerank R` by ITM. One JSON line per query.
    Search(crate::commands::matcher::SearchArgs),
    /// Score every pair of an annotation file or shards: ITC, ITM and with
    /// `--tokens` each word's mismatch probability. JSON lines; resumable.
    Score(crate::commands::matcher::ScoreArgs),
    /// Keep the scored pairs at or above a threshold: a new annotation file
    /// and a report with a score histogram.
    Filter(crate::commands::matcher::FilterArgs),
    /// Serve a trained run over HTTP: `/match`, `/search`, `/health` and a
    /// web page at `/` (docs/using.md). Loopback only unless `--addr` says
    /// otherwise; SIGTERM finishes the requests in flight and exits 0.
    Serve(crate::commands::serve::ServeArgs),
    /// Print the merged configuration that `train` would use.
    Config {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Draw metrics of one or more runs on shared axes into an SVG or PNG
    /// (keys: `metrics.jsonl` fields such as `loss`, held-out values as
    /// dotted paths such as `matching.itm_acc`).
    Plot(crate::plot::PlotArgs),
}

#[derive(Args, Debug, Clone, Default)]
pub struct ConfigArgs {
    /// Preset (configs/<name>.toml) at the bottom of the layers.
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// Config files layered over the preset, in order.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Overrides `dotted.key=value`, applied last (values parse as TOML).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ConfigArgs {
    pub fn layers(&self) -> Result<ConfigLayers> {
        Ok(ConfigLayers {
            base: Some(crate::run::preset(&self.preset)?),
            files: self.configs.clone(),
            env: true,
            sets: self.sets.clone(),
        })
    }
}

/// Standard error with every line prefixed, for the ranks of a
/// data-parallel run (`[rank 1] ...`).
struct Prefixed(String);

impl std::io::Write for Prefixed {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        let mut out = String::with_capacity(text.len() + self.0.len());
        for line in text.split_inclusive('\n') {
            out.push_str(&self.0);
            out.push_str(line);
        }
        std::io::stderr().write_all(out.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// This process's rank, when a launcher started several (`None` for one
/// process or a malformed launcher environment, which `train` reports).
fn launch_rank() -> Option<usize> {
    vlmatch_dist::LaunchEnv::from_env()
        .ok()
        .flatten()
        .filter(|l| l.world_size > 1)
        .map(|l| l.rank)
}

/// The whole CLI: logging, argument parsing, one-line errors. A binary that
/// links extra plugin crates calls this from its `main` (see PLUGINS.md).
/// A panic is one line too (`error: internal error: ...`, exit status
/// [`crate::panics::EXIT_STATUS`]), with a backtrace only under
/// `RUST_BACKTRACE=1`.
///
/// Started as one of several ranks, every line a rank logs is prefixed
/// with `[rank N]`; ranks other than 0 log warnings and errors only (unless
/// `RUST_LOG` says otherwise).
pub fn main() -> std::process::ExitCode {
    // Before anything else: the libtorch this process loaded must be the
    // 2.11.x this binary was built for (src/version.rs). Here, so that a
    // third-party binary calling `cli::main` checks it too.
    if let Err(e) = crate::version::check_or_exit() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    crate::panics::install_hook();
    let rank = launch_rank();
    let default_level = match rank {
        Some(r) if r > 0 => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let prefix = rank.map(|r| format!("[rank {r}] ")).unwrap_or_default();
    let log_prefix = prefix.clone();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(move || Prefixed(log_prefix.clone()))
        .init();
    let outcome = crate::panics::catch(|| {
        crate::panics::test_point("cli");
        run(Cli::parse())
    });
    match outcome {
        Ok(Ok(())) => std::process::ExitCode::SUCCESS,
        // A panic: one line, no backtrace (unless RUST_BACKTRACE is set).
        Err(panic) => {
            eprintln!("{prefix}error: {panic}");
            std::process::ExitCode::from(crate::panics::EXIT_STATUS)
        }
        Ok(Err(e)) => {
            eprintln!("{prefix}error: {e}");
            std::process::ExitCode::from(match e {
                Error::Config(_) | Error::Data { .. } => 2,
                // 128 + the signal (143 SIGTERM, 130 SIGINT), as a process the
                // signal ended would; its state is saved.
                Error::Stopped { signal, .. } => (128 + signal).clamp(129, 255) as u8,
                _ => 1,
            })
        }
    }
}

/// The `--fault` of a command, where the build has it (the
/// `fault-injection` feature, which `cargo xtask test` enables); `None`
/// in other builds, which lack the flag.
macro_rules! injected {
    ($fault:ident) => {{
        #[cfg(feature = "fault-injection")]
        let f = $fault;
        #[cfg(not(feature = "fault-injection"))]
        let f = None;
        f
    }};
}

pub fn run(cli: Cli) -> Result<()> {
    use crate::commands::matcher::Matcher;
    crate::libraries::set_plugin_libraries(&cli.plugins)?;
    match cli.command {
        Command::Train {
            config,
            run_dir,
            resume,
            quiet,
            force,
            #[cfg(feature = "fault-injection")]
            fault,
        } => crate::commands::train::train(
            layers_for_train(&config, resume.is_some())?,
            (run_dir, resume, force),
            quiet,
            injected!(fault),
        ),
        Command::Env => crate::commands::env::env(),
        Command::Preview {
            config,
            count,
            all,
            split,
            out,
        } => crate::commands::preview::preview(
            config.layers()?,
            &split,
            (!all).then_some(count),
            &out,
        ),
        Command::Neggen {
            checkpoint,
            data,
            image_root,
            out,
            sets,
            quiet,
        } => {
            let summary = crate::commands::neggen::neggen_offline(
                &checkpoint,
                &data,
                image_root.as_deref(),
                &out,
                &sets,
                !quiet,
            )?;
            println!("{summary}");
            Ok(())
        }
        Command::Eval {
            checkpoint,
            task,
            data,
            image_root,
            split,
            labels,
            sets,
            quiet,
        } => {
            let data = crate::commands::eval::DataArg {
                path: data.unwrap_or_default(),
                image_root,
                split,
                labels,
            };
            let result =
                crate::commands::eval::eval_task(&checkpoint, &task, &data, &sets, !quiet)?;
            if launch_rank().unwrap_or(0) == 0 {
                println!("{result}");
            }
            Ok(())
        }
        Command::Plugins { config } => {
            let loaded = config.layers()?.load()?;
            let mut libraries = loaded.config.plugins.paths.clone();
            libraries.extend(crate::libraries::plugin_libraries());
            print!("{}", crate::commands::plugins::plugin_listing(&libraries)?);
            Ok(())
        }
        Command::Finetune {
            task,
            checkpoint,
            data,
            val,
            test,
            eval_every,
            blank_images,
            image_root,
            out,
            steps,
            lr,
            batch_size,
            sets,
            quiet,
            resume,
            #[cfg(feature = "fault-injection")]
            fault,
        } => crate::commands::finetune::finetune(
            &task,
            &crate::vqa::FinetuneOptions {
                checkpoint,
                data,
                image_root,
                out,
                steps,
                lr,
                batch_size,
                sets,
                progress: !quiet,
                resume,
                fault: injected!(fault),
            },
            crate::commands::finetune::Classification {
                val,
                test,
                eval_every,
                blank_images,
            },
        ),
        Command::Export {
            checkpoint,
            out,
            sets,
        } => crate::commands::export::export_cmd(&checkpoint, &out, &sets),
        Command::Explain {
            checkpoint,
            image,
            text,
            html,
            sets,
        } => crate::commands::explain::explain_print(
            &checkpoint,
            &image,
            &text,
            html.as_deref(),
            &sets,
        ),
        Command::Bench {
            config,
            out,
            steps,
            warmup,
            repeats,
            batches,
            data_images,
            data_image_side,
            no_neggen,
            reference,
            python,
            eval,
            eval_images,
            eval_captions_per_image,
            eval_k,
            annotations,
            annotations_index_only,
            annotation_probe,
            annotation_file,
            annotation_hold,
        } => {
            if let (Some(mode), Some(file)) = (&annotation_probe, &annotation_file) {
                return crate::bench::annotation_index::probe(file, mode, annotation_hold);
            }
            if let Some(captions) = annotations {
                use crate::bench::annotation_index::{bench_annotations, AnnotationBenchOptions};
                bench_annotations(&AnnotationBenchOptions {
                    captions,
                    out,
                    in_memory: !annotations_index_only,
                })?;
                return Ok(());
            }
            if eval {
                crate::bench::eval::bench_eval(&crate::bench::eval::EvalBenchOptions {
                    layers: config.layers()?,
                    out,
                    images: eval_images,
                    captions_per_image: eval_captions_per_image,
                    k: eval_k,
                    reference: reference.zip(python).map(|(s, p)| (p, s)),
                })?;
                return Ok(());
            }
            let result = crate::bench::bench(&crate::bench::BenchOptions {
                layers: config.layers()?,
                out,
                steps: steps.max(1),
                warmup,
                repeats: repeats.max(1),
                batches: batches.max(1),
                data_images,
                data_image_side,
                neggen: !no_neggen,
                reference: reference.zip(python).map(|(s, p)| (p, s)),
            })?;
            print!("{}", crate::bench::table(&result));
            Ok(())
        }
        Command::Config { config } => {
            let loaded = config.layers()?.load()?;
            print!("{}", loaded.to_toml());
            Ok(())
        }
        Command::Plot(args) => crate::plot::plot(&args.into()),
        Command::Embed(a) => crate::commands::matcher::main(Matcher::Embed(a)),
        Command::Search(a) => crate::commands::matcher::main(Matcher::Search(a)),
        Command::Score(a) => crate::commands::matcher::main(Matcher::Score(a)),
        Command::Filter(a) => crate::commands::matcher::main(Matcher::Filter(a)),
        Command::Serve(a) => crate::commands::serve::serve_cmd(&a),
    }
}

/// `config`'s layers for `train`; with `resume`, the run's own saved config
/// replaces the preset.
fn layers_for_train(config: &ConfigArgs, resume: bool) -> Result<ConfigLayers> {
    let mut layers = config.layers()?;
    if resume {
        layers.base = None;
    }
    Ok(layers)
}
