//! The `vlmatch` command line.

use crate::train::{train_launched, TrainOptions};
use crate::PRESETS;
use clap::{Args, Parser, Subcommand};
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};
use vlmatch_registry::{ConfigLayers, Kind, Registry};

#[derive(Parser, Debug)]
#[command(
    name = "vlmatch",
    version,
    about = "VL-Match vision-language pretraining"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
        /// Test hook: rank RANK kills itself, hangs or is sent SIGTERM right after
        /// step STEP, or has a NaN loss at step STEP.
        #[arg(long, value_name = "RANK:STEP:kill|hang|term|nan", hide = true)]
        fault: Option<crate::fault::Fault>,
    },
    /// Evaluate a trained run: `retrieval` (ITC top-k re-ranked by ITM, on an
    /// annotation file or tar shards), `matching` (lines {"image", "caption",
    /// "negative"}), `zeroshot` (lines {"image", "label"} and `--labels`),
    /// `vqa` (a run fine-tuned with `finetune --task vqa`; lines {"image",
    /// "question", "answer"} or `--data builtin`), `heldout` (the run's own
    /// held-out set: retrieval and color/shape-swap matching, as training
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
        /// Karpathy split(s) of a `dataset_coco.json`-style file, e.g. `test`.
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
    /// in, a linked crate, or a library from the config's `plugins.paths`).
    Plugins {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print what libtorch sees: CUDA, devices, cuDNN, threads.
    Env,
    /// Write the first training images as PNG files plus `captions.txt`, to
    /// look at what the model sees, and `annotations.jsonl` (ALBEF format)
    /// to evaluate on or run `neggen` over. Also `pairs.jsonl` (each pair of
    /// those images with its token ids), `vocab.txt` and `meta.json` (special
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
    /// questions about the built-in scenes. Writes a run directory (default
    /// CHECKPOINT/vqa) that `eval --task vqa` reads.
    Finetune {
        #[arg(long)]
        task: String,
        /// The pretrained run directory.
        #[arg(long)]
        checkpoint: PathBuf,
        /// JSON/JSONL lines {"image", "question", "answer"}, or `builtin`.
        #[arg(long)]
        data: PathBuf,
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
    },
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
            base: Some(preset(&self.preset)?),
            files: self.configs.clone(),
            env: true,
            sets: self.sets.clone(),
        })
    }
}

/// A preset by name: `configs/<name>.toml` in the working directory if
/// present, else the copy built into the binary; or a path to a TOML file.
pub fn preset(name: &str) -> Result<(String, Option<PathBuf>, String)> {
    let file = Path::new("configs").join(format!("{name}.toml"));
    if file.is_file() {
        return vlmatch_registry::config::base_from_file(&file);
    }
    if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) {
        return Ok((format!("preset {name} (built in)"), None, text.to_string()));
    }
    if name.ends_with(".toml") && Path::new(name).is_file() {
        return vlmatch_registry::config::base_from_file(Path::new(name));
    }
    let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
    Err(Error::Config(format!(
        "unknown preset `{name}`; presets: {} (or give a path to a .toml file)",
        known.join(", ")
    )))
}

/// The plugin crates of this repository; any other origin is a third-party crate.
const BUILTIN_CRATES: &[&str] = &[
    "vlmatch-vit",
    "vlmatch-bert",
    "vlmatch-cross-attention",
    "vlmatch-discriminator",
    "vlmatch-mlm-head",
    "vlmatch-itc",
    "vlmatch-itm",
    "vlmatch-mlm",
    "vlmatch-rtd",
    "vlmatch-hard-negative",
    "vlmatch-word-swap",
    "vlmatch-neggen",
];

/// `vlmatch plugins` output.
pub fn plugin_listing(libraries: &[PathBuf]) -> Result<String> {
    let mut registry = Registry::from_inventory().map_err(|e| Error::Config(e.to_string()))?;
    for lib in libraries {
        registry.load_library(lib)?;
    }
    let mut out = String::new();
    for kind in Kind::ALL {
        out.push_str(&format!("{kind}:\n"));
        for e in registry.entries().filter(|e| e.factory.kind() == kind) {
            let from = if BUILTIN_CRATES.contains(&e.origin.as_str()) {
                format!("built-in ({})", e.origin)
            } else if e.origin.starts_with("library ") {
                e.origin.clone()
            } else {
                format!("crate {}", e.origin)
            };
            out.push_str(&format!("  {:<20} {from}\n", e.name));
        }
    }
    Ok(out)
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

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Train {
            config,
            run_dir,
            resume,
            quiet,
            fault,
        } => {
            let mut layers = config.layers()?;
            if resume.is_some() {
                // The run's own saved config replaces the preset.
                layers.base = None;
            }
            let launch = vlmatch_dist::LaunchEnv::from_env()
                .map_err(|e| Error::Config(format!("launcher environment: {e}")))?;
            let rank = launch
                .as_ref()
                .filter(|l| l.world_size > 1)
                .map_or(0, |l| l.rank);
            let summary = train_launched(
                TrainOptions {
                    layers,
                    run_dir,
                    resume,
                    halt_after: None,
                    progress: !quiet,
                },
                launch,
                fault,
            )?;
            if rank > 0 {
                // Rank 0 reports the run.
                return Ok(());
            }
            let first = summary
                .logged
                .first()
                .and_then(|m| m.get("loss"))
                .and_then(|v| v.as_f64());
            let last = summary
                .logged
                .last()
                .and_then(|m| m.get("loss"))
                .and_then(|v| v.as_f64());
            if let (Some(a), Some(b)) = (first, last) {
                println!(
                    "loss {a:.4} -> {b:.4} over steps {}..{}",
                    summary.start_step, summary.last_step
                );
            }
            if let Some(e) = &summary.eval {
                let r = &e.retrieval;
                println!(
                    "held-out ITC retrieval ({} images, {} captions): image->text R@1 {:.1}% R@5 {:.1}% | \
                     text->image R@1 {:.1}% R@5 {:.1}% (chance R@1 {:.1}%)",
                    r.images,
                    r.captions,
                    100.0 * r.i2t_r1,
                    100.0 * r.i2t_r5,
                    100.0 * r.t2i_r1,
                    100.0 * r.t2i_r5,
                    100.0 * r.t2i_chance
                );
                let m = &e.matching;
                println!(
                    "held-out matching, caption vs one color/shape word swapped ({} pairs): ITM {:.1}% | ITC {:.1}% (chance 50%)",
                    m.pairs,
                    100.0 * m.itm_acc,
                    100.0 * m.itc_acc
                );
            }
            println!("run directory: {}", summary.run_dir.display());
            Ok(())
        }
        Command::Env => {
            println!("cuda available: {}", tch::Cuda::is_available());
            println!("cuda devices: {}", tch::Cuda::device_count());
            println!("cudnn available: {}", tch::Cuda::cudnn_is_available());
            println!("intra-op threads: {}", tch::get_num_threads());
            Ok(())
        }
        Command::Preview {
            config,
            count,
            all,
            split,
            out,
        } => preview(&config, &split, (!all).then_some(count), &out),
        Command::Neggen {
            checkpoint,
            data,
            image_root,
            out,
            sets,
            quiet,
        } => {
            let summary = neggen_offline(
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
            let data = DataArg {
                path: data.unwrap_or_default(),
                image_root,
                split,
                labels,
            };
            let result = eval_task(&checkpoint, &task, &data, &sets, !quiet)?;
            if launch_rank().unwrap_or(0) == 0 {
                println!("{result}");
            }
            Ok(())
        }
        Command::Plugins { config } => {
            let loaded = config.layers()?.load()?;
            print!("{}", plugin_listing(&loaded.config.plugins.paths)?);
            Ok(())
        }
        Command::Finetune {
            task,
            checkpoint,
            data,
            image_root,
            out,
            steps,
            lr,
            batch_size,
            sets,
            quiet,
        } => {
            if task != "vqa" {
                return Err(Error::Config(format!(
                    "--task `{task}`: the fine-tuning task is `vqa`"
                )));
            }
            let out = crate::vqa::finetune(&crate::vqa::FinetuneOptions {
                checkpoint,
                data,
                image_root,
                out,
                steps,
                lr,
                batch_size,
                sets,
                progress: !quiet,
            })?;
            println!("fine-tuned run: {}", out.display());
            Ok(())
        }
        Command::Export {
            checkpoint,
            out,
            sets,
        } => {
            let e = export_run(&checkpoint, &out, &sets)?;
            for (role, dir) in [("image", &e.image), ("text", &e.text)] {
                if let Some(d) = dir {
                    println!("{role} encoder: {}", d.display());
                }
            }
            for s in &e.skipped {
                println!("not exported: {s}");
            }
            Ok(())
        }
        Command::Explain {
            checkpoint,
            image,
            text,
            html,
            sets,
        } => {
            let e = explain_cmd(&checkpoint, &image, &text, &sets)?;
            print!("{}", crate::explain::render_text(&e));
            if let Some(path) = html {
                let page = crate::explain::render_html(&e, &image)?;
                std::fs::write(&path, page).map_err(|err| Error::io(&path, err))?;
                println!("wrote {}", path.display());
            }
            println!("{}", serde_json::to_string(&e).expect("json"));
            Ok(())
        }
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
        } => {
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
    }
}

/// `vlmatch preview`: the first `count` images (all with `None`) of a split,
/// at the configured resolution (before normalisation), with their captions,
/// token ids and, for the held-out split, the matching triples.
fn preview(config: &ConfigArgs, split: &str, count: Option<usize>, out: &Path) -> Result<()> {
    let loaded = config.layers()?.load()?;
    let (train, heldout) = crate::setup::datasets(&loaded)?;
    let ds = match split {
        "train" => train,
        "heldout" => heldout.ok_or_else(|| {
            Error::Config(
                "--split heldout: the config has no held-out set (built-in data, or \
                 data.heldout_annotations)"
                    .into(),
            )
        })?,
        other => {
            return Err(Error::Config(format!(
                "--split `{other}`: expected `train` or `heldout`"
            )))
        }
    };
    let tok = crate::setup::tokenizer(&loaded)?;
    let data = &loaded.config.data;
    let size = data.image_size as usize;
    let max_len = data.max_len as usize;
    let n = count.unwrap_or(ds.images.len()).min(ds.images.len());
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let file_name = |i: usize| format!("{i:04}.png");
    let mut of_image: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (k, p) in ds.pairs.iter().enumerate() {
        if p.image < n {
            of_image[p.image].push(k);
        }
    }
    let (mut lines, mut ann, mut pairs) = (String::new(), String::new(), String::new());
    let mut n_pairs = 0usize;
    for (i, ks) in of_image.iter().enumerate() {
        let rgb = ds.load_rgb(i, size)?;
        let file = out.join(file_name(i));
        image::RgbImage::from_raw(size as u32, size as u32, rgb)
            .expect("buffer matches the size")
            .save(&file)
            .map_err(|e| Error::Data {
                path: file.clone(),
                line: None,
                message: format!("cannot write PNG: {e}"),
            })?;
        let captions: Vec<&str> = ks.iter().map(|&k| ds.pairs[k].caption.as_str()).collect();
        for c in &captions {
            lines.push_str(&format!("{}\t{c}\n", file_name(i)));
        }
        let entry = serde_json::json!({
            "image": file_name(i),
            "caption": captions,
            "image_id": ds.image_ids[i],
        });
        ann.push_str(&format!("{entry}\n"));
        for &k in ks {
            let caption = &ds.pairs[k].caption;
            let line = serde_json::json!({
                "pair": k,
                "image": file_name(i),
                "image_index": i,
                "image_id": ds.image_ids[i],
                "caption": caption,
                "ids": tok.encode(caption, max_len),
            });
            pairs.push_str(&format!("{line}\n"));
            n_pairs += 1;
        }
    }
    let mut files = vec![
        ("captions.txt", lines),
        ("annotations.jsonl", ann),
        ("pairs.jsonl", pairs),
    ];
    let vocab: String = (0..tok.vocab_size())
        .map(|i| format!("{}\n", tok.token(i)))
        .collect();
    files.push(("vocab.txt", vocab));
    let mut n_matching = None;
    if split == "heldout" {
        let mut triples = String::new();
        let cases = crate::eval::matching_cases(&ds);
        for (image, caption, negative) in cases.iter().filter(|c| c.0 < n) {
            let line = serde_json::json!({
                "image": file_name(*image),
                "image_index": image,
                "caption": caption,
                "negative": negative,
                "caption_ids": tok.encode(caption, max_len),
                "negative_ids": tok.encode(negative, max_len),
            });
            triples.push_str(&format!("{line}\n"));
        }
        n_matching = Some(cases.iter().filter(|c| c.0 < n).count());
        files.push(("matching.jsonl", triples));
    }
    let sp = tok.special;
    let meta = serde_json::json!({
        "split": split,
        "dataset": ds.name,
        "images": n,
        "all_images": n == ds.images.len(),
        "pairs": n_pairs,
        "matching_triples": n_matching,
        "image_size": size,
        "max_len": max_len,
        "mean": data.mean,
        "std": data.std,
        "lowercase": data.lowercase,
        "tokenizer": tok.origin(),
        "vocab_size": tok.vocab_size(),
        "special": {"pad": sp.pad, "unk": sp.unk, "cls": sp.cls, "sep": sp.sep, "mask": sp.mask},
        "word_swap_default_groups": word_swap::default_groups(),
    });
    files.push((
        "meta.json",
        serde_json::to_string_pretty(&meta).expect("serialisable"),
    ));
    for (name, text) in files {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    }
    println!(
        "wrote {n} images and {n_pairs} pairs of {} to {}: captions.txt, annotations.jsonl \
         (ALBEF format, for eval and neggen), pairs.jsonl (token ids), vocab.txt, meta.json{}",
        ds.name,
        out.display(),
        if n_matching.is_some() {
            ", matching.jsonl"
        } else {
            ""
        }
    );
    Ok(())
}

/// An evaluation data file and how to read it.
#[derive(Debug, Clone)]
pub struct DataArg {
    pub path: PathBuf,
    pub image_root: Option<PathBuf>,
    /// Karpathy split(s), comma-separated.
    pub split: Option<String>,
    /// Zero-shot candidate labels.
    pub labels: Option<PathBuf>,
}

/// Candidate labels: a JSON list of strings, or one label per line.
fn read_labels(path: &Path) -> Result<Vec<String>> {
    let text = vlmatch_registry::check::read_utf8(path)?;
    if text.trim_start().starts_with('[') {
        serde_json::from_str(&text).map_err(|e| Error::Data {
            path: path.to_path_buf(),
            line: Some(e.line()),
            message: format!("expected a JSON list of strings: {e}"),
        })
    } else {
        Ok(text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }
}

/// `vlmatch eval`: load a run's model and evaluate `task` on `data`; the
/// result is also written to `RUN_DIR/eval-TASK.json`.
///
/// Started by a launcher as several ranks, `retrieval` shares its ITM
/// re-ranking among them (every rank gets the result; rank 0 writes it);
/// the other tasks run on rank 0 alone and the other ranks return `null`.
pub fn eval_task(
    run_dir: &Path,
    task: &str,
    data: &DataArg,
    sets: &[String],
    progress: bool,
) -> Result<serde_json::Value> {
    let launch = vlmatch_dist::LaunchEnv::from_env()
        .map_err(|e| Error::Config(format!("launcher environment: {e}")))?
        .filter(|l| l.world_size > 1);
    let Some(launch) = launch else {
        return eval_on(run_dir, task, data, sets, progress, None);
    };
    if task != "retrieval" {
        if launch.rank > 0 {
            return Ok(serde_json::Value::Null);
        }
        tracing::info!("--task {task} runs on rank 0 alone (only retrieval is shared)");
        return eval_on(run_dir, task, data, sets, progress, None);
    }
    let loaded = run_config(run_dir, sets)?;
    let train = &loaded.config.train;
    let device = crate::setup::rank_device(&train.device, launch.local_rank)?;
    let timeout = std::time::Duration::from_secs(train.dist.timeout.max(1));
    let par = crate::parallel::Parallel::connect(&launch, device, timeout)?;
    let result = eval_on(
        run_dir,
        task,
        data,
        sets,
        progress && par.is_main(),
        Some((&par, device)),
    );
    match result {
        Ok(r) => {
            par.leave();
            Ok(r)
        }
        Err(e) if crate::parallel::Parallel::is_communication(&e) => Err(par.explain(e)),
        Err(e) => Err(e),
    }
}

/// [`eval_task`] on one process, or as one rank of `par` (on `device`).
fn eval_on(
    run_dir: &Path,
    task: &str,
    data: &DataArg,
    sets: &[String],
    progress: bool,
    par: Option<(&crate::parallel::Parallel, tch::Device)>,
) -> Result<serde_json::Value> {
    let image_root = data.image_root.as_deref();
    let split = data.split.as_deref();
    let labels = data.labels.as_deref();
    let data = data.path.as_path();
    if data.as_os_str().is_empty() && task != "heldout" {
        return Err(Error::Config(format!(
            "--task {task} needs --data FILE (the evaluation data)"
        )));
    }
    if task == "vqa" {
        let r = crate::vqa::evaluate(run_dir, data, image_root, sets)?;
        let mut result = serde_json::to_value(r).expect("serialisable");
        result["task"] = serde_json::json!(task);
        result["data"] = serde_json::json!(data.display().to_string());
        return write_eval(run_dir, task, result);
    }
    let (loaded, tok, asm, state) = load_run_on(run_dir, sets, par.map(|(_, d)| d))?;
    let c = &loaded.config;
    let inp = crate::eval::EvalInputs::new(c, &tok);
    let collective = par.map(|(p, _)| p.collective());
    let bar = if progress {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut result = match task {
        "retrieval" => {
            let ds = crate::data::load_any_with(
                &data.display().to_string(),
                image_root,
                split,
                c.data.on_error,
            )?;
            let r = crate::eval::retrieval_reranked_sharded(
                &asm.model,
                &ds,
                &inp,
                c.eval.k,
                &c.eval.rerank,
                collective.as_deref(),
                &bar,
            )?;
            serde_json::to_value(r).expect("serialisable")
        }
        "matching" => {
            let (ds, negatives) =
                crate::data::annotations::load_with(data, image_root, Some("negative"), split)?;
            let m = crate::eval::matching_triples(&asm.model, &ds, &negatives, &inp)?;
            serde_json::to_value(m).expect("serialisable")
        }
        "heldout" => {
            let (_, heldout) = crate::setup::datasets(&loaded)?;
            let ds = heldout.ok_or_else(|| {
                Error::Config(
                    "--task heldout: the run's config has no held-out set (built-in data, or \
                     data.heldout_annotations)"
                        .into(),
                )
            })?;
            let r = crate::eval::held_out(&asm.model, &ds, &inp, state.step)?;
            serde_json::to_value(r).expect("serialisable")
        }
        "zeroshot" => {
            let labels = read_labels(labels.ok_or_else(|| {
                Error::Config("--task zeroshot needs --labels FILE (the candidate labels)".into())
            })?)?;
            let (ds, _) =
                crate::data::annotations::load_entries(data, image_root, "label", c.data.on_error)?;
            let z =
                crate::eval::zeroshot(&asm.model, &ds, &labels, &inp, c.eval.k, &c.eval.rerank)?;
            serde_json::to_value(z).expect("serialisable")
        }
        other => {
            return Err(Error::Config(format!(
                "--task `{other}`: expected `retrieval`, `matching`, `zeroshot`, `vqa` or `heldout`"
            )))
        }
    };
    bar.finish_and_clear();
    result["task"] = serde_json::json!(task);
    result["step"] = serde_json::json!(state.step);
    result["data"] = serde_json::json!(data.display().to_string());
    if par.is_some_and(|(p, _)| !p.is_main()) {
        // Rank 0 writes the result.
        return Ok(result);
    }
    write_eval(run_dir, task, result)
}

/// Write RUN_DIR/eval-TASK.json and return the result.
fn write_eval(run_dir: &Path, task: &str, result: serde_json::Value) -> Result<serde_json::Value> {
    let out = run_dir.join(format!("eval-{task}.json"));
    std::fs::write(
        &out,
        serde_json::to_string_pretty(&result).expect("serialisable"),
    )
    .map_err(|e| Error::io(&out, e))?;
    Ok(result)
}

/// A trained run: its config (with `sets` on top), tokenizer, model with the
/// newest checkpoint's weights, and that checkpoint's counters.
type LoadedRun = (
    vlmatch_registry::LoadedConfig,
    std::sync::Arc<crate::tokenizer::Tokenizer>,
    vlmatch_registry::Assembly,
    crate::checkpoint::TrainerState,
);

/// A run directory's saved config with `sets` (and the environment) on top.
pub fn run_config(run_dir: &Path, sets: &[String]) -> Result<vlmatch_registry::LoadedConfig> {
    ConfigLayers {
        base: Some(vlmatch_registry::config::base_from_file(
            &run_dir.join("config.toml"),
        )?),
        files: vec![],
        env: true,
        sets: sets.to_vec(),
    }
    .load()
}

fn load_run(run_dir: &Path, sets: &[String]) -> Result<LoadedRun> {
    load_run_on(run_dir, sets, None)
}

/// [`load_run`] on `device` (default: the run's `train.device`).
fn load_run_on(run_dir: &Path, sets: &[String], device: Option<tch::Device>) -> Result<LoadedRun> {
    let loaded = run_config(run_dir, sets)?;
    let tok = std::sync::Arc::new(crate::setup::tokenizer(&loaded)?);
    let device = match device {
        Some(d) => d,
        None => crate::setup::device(&loaded.config.train.device)?,
    };
    let (mut asm, _) = crate::setup::model_on(&loaded, &tok, device)?;
    let ckpt = crate::checkpoint::latest(run_dir)?;
    let (_, state) = crate::checkpoint::load(&ckpt, &mut asm.vs)?;
    Ok((loaded, tok, asm, state))
}

/// `vlmatch export` of a trained run's newest checkpoint.
pub fn export_run(run_dir: &Path, out: &Path, sets: &[String]) -> Result<crate::export::Exported> {
    let (loaded, tok, asm, _) = load_run(run_dir, sets)?;
    crate::export::export(&loaded, &tok, &asm.vs, out)
}

/// `vlmatch explain` on a trained run.
pub fn explain_cmd(
    run_dir: &Path,
    image: &Path,
    text: &str,
    sets: &[String],
) -> Result<crate::explain::Explanation> {
    let (loaded, tok, asm, _) = load_run(run_dir, sets)?;
    let d = &loaded.config.data;
    let pixels = crate::explain::image_tensor(image, d.image_size as usize, d.mean, d.std)?;
    crate::explain::explain(&asm.model, &tok, d.max_len as usize, &pixels, text)
}

/// A NegGen sampler with the config's `[samplers.neggen]` keys (defaults
/// where absent) and the default tagger, for use outside training.
pub fn neggen_sampler(
    loaded: &vlmatch_registry::LoadedConfig,
    tok: &std::sync::Arc<crate::tokenizer::Tokenizer>,
) -> Result<neggen::NegGen> {
    let cfg: neggen::NegGenConfig = if loaded.config.samplers.contains_key("neggen") {
        loaded.section("samplers.neggen")?
    } else {
        serde_json::from_str("{}").expect("every NegGen key has a default")
    };
    let codec = std::rc::Rc::new(crate::tokenizer::Codec {
        tokenizer: tok.clone(),
        max_len: loaded.config.data.max_len as usize,
    });
    neggen::NegGen::load(
        cfg,
        codec,
        Some(crate::pretrained::load_masked_lm),
        crate::setup::device(&loaded.config.train.device)?,
        tch::Kind::Float,
        "samplers.neggen",
    )
}

/// `vlmatch neggen`: NegGen over a whole annotation file, written as JSON
/// lines `{image, image_id, caption, negative, masked_words, itm_score}`
/// (atomically); returns the summary line.
pub fn neggen_offline(
    run_dir: &Path,
    data: &Path,
    image_root: Option<&Path>,
    out: &Path,
    sets: &[String],
    progress: bool,
) -> Result<String> {
    let (loaded, tok, asm, _) = load_run(run_dir, sets)?;
    let c = &loaded.config;
    tch::manual_seed(c.train.seed as i64);
    let sampler = neggen_sampler(&loaded, &tok)?;
    let ds = crate::data::load_any_with(
        &data.display().to_string(),
        image_root,
        None,
        c.data.on_error,
    )?;
    let mut loader_cfg = crate::data::loader::LoaderConfig::new(&c.data, c.eval.batch_size, None);
    loader_cfg.preps = crate::data::loader::CaptionPreps::new(
        vlmatch_core::NegativeSampler::caption_prep(&sampler),
    );
    let all: Vec<usize> = (0..ds.len()).collect();
    let bar = if progress {
        indicatif::ProgressBar::new(ds.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = std::time::Instant::now();
    let mut lines = String::new();
    let mut written = 0usize;
    for (b, batch) in crate::data::loader::batches(&ds, &tok, &loader_cfg, &all).enumerate() {
        let batch = batch?.to_device(asm.model.device);
        let fwd = vlmatch_core::Forward::new(&asm.model, &batch, false);
        for cand in sampler
            .candidates(&fwd, i64::MAX)?
            .into_iter()
            .filter(|c| c.kept)
        {
            let pair = &ds.pairs[all[b * loader_cfg.batch_size + cand.owner]];
            let image = match &ds.images[pair.image] {
                crate::data::ImageRef::File { path, .. } => path.display().to_string(),
                crate::data::ImageRef::Scene(_) => format!("scene:{}", ds.image_ids[pair.image]),
            };
            let line = serde_json::json!({
                "image": image,
                "image_id": ds.image_ids[pair.image],
                "caption": pair.caption,
                "negative": cand.text,
                "masked_words": cand.masked,
                "itm_score": cand.itm,
            });
            lines.push_str(&format!("{line}\n"));
            written += 1;
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    let tmp = out.with_extension("tmp");
    std::fs::write(&tmp, lines).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    let n = &sampler.counts;
    let secs = started.elapsed().as_secs_f64();
    Ok(format!(
        "neggen: {} captions, {written} negatives written to {}, {} dropped by the filter, {} without a noun/adjective, {:.1} negatives/s",
        n.captions.get(),
        out.display(),
        n.dropped_by_filter.get(),
        n.no_candidate.get(),
        written as f64 / secs.max(1e-9)
    ))
}
