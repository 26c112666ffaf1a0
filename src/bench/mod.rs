//! `vlmatch bench`: training-step time, peak memory and throughput of the
//! configured model, the data pipeline and NegGen, and the same for the
//! PyTorch yardstick `bench/reference.py` run on the same inputs, printed as
//! a table of ratios and written to `OUT/bench.json`.
//!
//! The step timed is [`crate::step::train_step`], the function training
//! runs. Both sides run `warmup` steps, then `repeats` blocks of `steps`
//! steps with a device synchronisation at each block's end; the time per
//! step is the median over blocks. Nothing here asserts a time.
//!
//! What the reference gets, in `OUT/`: `config.toml` (the merged config),
//! `meta.json` (resolved sizes, special token ids, parameter count),
//! `init.safetensors` (vlmatch's initial weights under its own names: the
//! reference loads them strictly, so a structural difference is an error),
//! `inputs.safetensors` (the fixed batches), `vocab.txt`, and `data/` (JPEG
//! files + an annotation file for the data-pipeline comparison).

pub mod alloc;
pub mod annotation_index;
pub mod eval;
pub mod flops;
pub mod loader;

use crate::data::loader::{batches, Loader, LoaderConfig};
use crate::data::{annotations, ImageRef};
use crate::optim::AdamW;
use crate::setup;
use crate::step::train_step;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Tensor};
use vlmatch_core::{Batch, Error, Forward, Result};
use vlmatch_registry::ConfigLayers;

pub struct BenchOptions {
    pub layers: ConfigLayers,
    pub out: PathBuf,
    /// Timed steps per repeat.
    pub steps: usize,
    pub warmup: usize,
    pub repeats: usize,
    /// Distinct fixed batches cycled through.
    pub batches: usize,
    /// Images written for the data-pipeline comparison (0: skip it).
    pub data_images: usize,
    /// Side of the written JPEG files (they are decoded and resized to
    /// `data.image_size`, as a real dataset's would be).
    pub data_image_side: usize,
    pub neggen: bool,
    /// `(python, script)` of the PyTorch reference; `None`: vlmatch only.
    pub reference: Option<(PathBuf, PathBuf)>,
}

/// Median of positive durations.
fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    let n = xs.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn sync(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`).
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// This process's GPU memory in MiB as `nvidia-smi` reports it (the caching
/// allocator's reservation plus the CUDA context); `None` without a GPU.
pub fn gpu_used_mib() -> Option<f64> {
    let out = Command::new("nvidia-smi")
        .args([
            "--query-compute-apps=pid,used_memory",
            "--format=csv,noheader,nounits",
        ])
        .output()
        .ok()?;
    let me = std::process::id().to_string();
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        let mut f = l.split(',').map(str::trim);
        (f.next()? == me).then(|| f.next()?.parse().ok()).flatten()
    })
}

/// Time `f` over `warmup` calls, then `repeats` blocks of `per_block`
/// calls; the median seconds per call.
fn time_blocks(
    device: Device,
    warmup: usize,
    repeats: usize,
    per_block: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<(f64, Vec<f64>)> {
    for _ in 0..warmup {
        f()?;
    }
    sync(device);
    let mut blocks = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let t = Instant::now();
        for _ in 0..per_block {
            f()?;
        }
        sync(device);
        blocks.push(t.elapsed().as_secs_f64() / per_block as f64);
    }
    Ok((median(blocks.clone()), blocks))
}

/// The model's initial parameters, on the CPU, as `out/init.safetensors`
/// (the reference starts from them).
fn write_init(vs: &tch::nn::VarStore, out: &Path) -> Result<()> {
    let init: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(k, v)| (k, v.detach().to_device(Device::Cpu).contiguous()))
        .collect();
    Tensor::write_safetensors(&init, out.join("init.safetensors"))?;
    Ok(())
}

fn write_file(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    std::fs::write(path, contents).map_err(|e| Error::io(path, e))
}

pub fn bench(opts: &BenchOptions) -> Result<Value> {
    let loaded = opts.layers.load()?;
    let cfg = loaded.config.clone();
    let tc = &cfg.train;
    let threads = setup::threads(tc);
    tch::set_num_threads(threads as i32);
    tch::manual_seed(tc.seed as i64);
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;

    let tok = Arc::new(setup::tokenizer(&loaded)?);
    let (asm, env) = setup::model(&loaded, &tok)?;
    let (train_ds, _) = setup::datasets(&loaded)?;
    let device = env.device;
    let b = tc.batch_size;
    let n_params = asm.trainable_parameters();

    // What the reference needs to build the same model on the same inputs.
    write_file(&out.join("config.toml"), loaded.to_toml())?;
    let vocab: String = (0..tok.vocab_size())
        .map(|i| format!("{}\n", tok.token(i)))
        .collect();
    write_file(&out.join("vocab.txt"), vocab)?;
    write_init(&asm.vs, out)?;
    let mut loader_cfg = LoaderConfig::new(&cfg.data, b, Some(tc.seed));
    // As in training: the samplers' caption work is the loader's.
    loader_cfg.preps = crate::data::loader::CaptionPreps::new(asm.caption_preps());
    let order = crate::data::loader::epoch_order(train_ds.len(), Some(tc.seed), 0);
    let wanted = (opts.batches * b).min(order.len());
    let inputs: Vec<Batch> =
        batches(&train_ds, &tok, &loader_cfg, &order[..wanted]).collect::<Result<_>>()?;
    let inputs: Vec<Batch> = inputs
        .into_iter()
        .filter(|x| x.len() as usize == b)
        .collect();
    if inputs.is_empty() {
        return Err(Error::Config(format!(
            "the training data has fewer than train.batch_size = {b} pairs"
        )));
    }
    let mut saved = Vec::new();
    for (i, x) in inputs.iter().enumerate() {
        saved.push((format!("images.{i}"), x.images.shallow_clone()));
        saved.push((format!("ids.{i}"), x.text.ids.shallow_clone()));
        saved.push((format!("mask.{i}"), x.text.mask.shallow_clone()));
        saved.push((format!("image_ids.{i}"), x.image_ids.shallow_clone()));
    }
    Tensor::write_safetensors(&saved, out.join("inputs.safetensors"))?;
    let inputs: Vec<Batch> = inputs.iter().map(|x| x.to_device(device)).collect();
    let special = tok.special;
    let meta = json!({
        "device": format!("{device:?}"),
        "cuda": matches!(device, Device::Cuda(_)),
        "compute": format!("{:?}", env.compute),
        "threads": threads,
        "batch_size": b,
        "batches": inputs.len(),
        "vocab_size": tok.vocab_size(),
        "special": {"pad": special.pad, "unk": special.unk, "cls": special.cls,
                    "sep": special.sep, "mask": special.mask},
        "parameters": n_params,
        "steps": opts.steps, "warmup": opts.warmup, "repeats": opts.repeats,
        "lr": tc.lr,
    });
    write_file(
        &out.join("meta.json"),
        serde_json::to_string_pretty(&meta).expect("json"),
    )?;

    // A forward check the reference repeats: ITC at initialisation on batch
    // 0 (no sampling involved, so both sides must agree closely).
    // The config's objective of plugin `itc` gives it (null without one).
    let itc = cfg
        .objectives
        .iter()
        .find(|(name, o)| o.enabled && o.plugin.as_deref().unwrap_or(name.as_str()) == "itc");
    let itc = itc.and_then(|(name, _)| asm.objectives.iter().find(|o| &o.name == name));
    let init_itc = match itc {
        None => None,
        Some(o) => Some(tch::no_grad(|| -> Result<f64> {
            let fwd = Forward::new(&asm.model, &inputs[0], false);
            let out = o.objective.forward(&fwd, 0)?;
            let (_, loss) = out
                .losses
                .first()
                .ok_or_else(|| Error::plugin("itc", "its objective returned no loss"))?;
            Ok(loss.double_value(&[]))
        })?),
    };

    // Training steps.
    let mut optim = AdamW::new(&asm.vs, tc.betas, tc.eps, tc.weight_decay);
    let mut guard = crate::guard::Guard::new(tc, device);
    let mut k = 0usize;
    let mut last_loss = Tensor::from(f32::NAN);
    let reads_before = vlmatch_core::readback::count();
    let (step_s, blocks) = time_blocks(device, opts.warmup, opts.repeats, opts.steps, || {
        let outcome = train_step(&asm, &mut optim, tc, k as i64, tc.lr, &mut guard, || {
            k += 1;
            Ok(inputs[(k - 1) % inputs.len()].shallow_clone())
        })?;
        last_loss = outcome.values["loss"].shallow_clone();
        Ok(())
    })?;
    // Host read-backs inside the step (each a device synchronisation on a
    // GPU), counted by vlmatch_core::readback.
    let steps_run = (opts.warmup + opts.repeats * opts.steps).max(1) as f64;
    let readbacks_per_step = (vlmatch_core::readback::count() - reads_before) as f64 / steps_run;
    // FLOPs of two more steps on batch 0: as executed, and on the plain path.
    let flop_counts = flops::count(tc.seed as i64, || {
        train_step(&asm, &mut optim, tc, k as i64, tc.lr, &mut guard, || {
            Ok(inputs[0].shallow_clone())
        })
        .map(|_| ())
    })?;
    let last_loss = last_loss.double_value(&[]);
    let peak = if matches!(device, Device::Cuda(_)) {
        json!({"gpu_mib": gpu_used_mib(), "rss_mib": peak_rss_mib()})
    } else {
        json!({"rss_mib": peak_rss_mib()})
    };
    let mut result = json!({
        "meta": meta,
        "init_itc_loss": init_itc,
        "step_s": step_s,
        "step_s_blocks": blocks,
        "images_per_s": b as f64 / step_s,
        "last_loss": last_loss,
        "peak_memory": peak,
        "readbacks_per_step": readbacks_per_step,
        "flops": flop_counts,
    });
    eprintln!(
        "vlmatch: {:.2} ms/step ({:.1} images/s), last loss {last_loss:.4}",
        step_s * 1e3,
        b as f64 / step_s
    );

    let neggen_fills =
        asm.model.generator.is_some() || loaded.figment.contains("samplers.neggen.fill_model");
    if opts.neggen && !neggen_fills {
        // A preset without an MLM head (base: ITC + ITM) has nothing to fill with.
        println!(
            "NegGen: skipped (no [model.generator] and no samplers.neggen.fill_model to fill with)"
        );
    }
    if opts.neggen && neggen_fills {
        // NegGen's keys: the config's `[samplers.neggen]`, else its defaults.
        let mut layers = opts.layers.clone();
        layers.sets = crate::samplers::sets_with_section(&loaded, "neggen", &layers.sets);
        let sampler = crate::samplers::run_sampler(&layers.load()?, &env, &asm.model, "neggen")?;
        // Tagging is the loader's work in training (on its worker threads):
        // timed apart, on one thread, and done before the step's part.
        let preps = crate::data::loader::CaptionPreps::new(sampler.caption_prep());
        // Warm-up: the tagger compiles its patterns on first use.
        preps.run(&inputs[0].captions[..1], 1);
        let t = Instant::now();
        let tagged: Vec<Batch> = inputs
            .iter()
            .map(|x| {
                let mut y = x.shallow_clone();
                y.prepared.extend(preps.run(&x.captions, 1));
                y
            })
            .collect();
        let tag_s = t.elapsed().as_secs_f64();
        let mut kept = 0usize;
        let mut generated = 0usize;
        let mut captions = 0usize;
        let passes = opts.repeats.max(1);
        let t = Instant::now();
        for _ in 0..passes {
            for x in &tagged {
                let fwd = Forward::new(&asm.model, x, false);
                let cands = tch::no_grad(|| sampler.candidates(&fwd, i64::MAX))
                    .ok_or_else(|| Error::Config("NegGen lists no candidates".into()))??;
                generated += cands.len();
                kept += cands.iter().filter(|c| c.kept).count();
                captions += x.len() as usize;
            }
        }
        sync(device);
        let secs = t.elapsed().as_secs_f64();
        result["neggen"] = json!({
            "captions": captions,
            "negatives": kept,
            "candidates": generated,
            "candidates_per_s": generated as f64 / secs,
            "negatives_per_s": kept as f64 / secs,
            "captions_per_s": captions as f64 / secs,
            "tagging_captions_per_s": (captions / passes) as f64 / tag_s.max(1e-9),
            "note": "untrained model: the rate, not the quality; negatives are the candidates the filters kept; \
                     the rates are the training thread's (POS tagging is the loader's, on one worker thread: tagging_captions_per_s)",
        });
    }

    if opts.data_images > 0 {
        result["data"] = data_pipeline(opts, &cfg, &train_ds, &tok)?;
        let reference = opts.reference.as_ref();
        let loader_opts = loader::Options {
            out: &opts.out,
            data_image_side: opts.data_image_side,
            repeats: opts.repeats,
            reference: reference.map(|(p, s)| (p.as_path(), s.as_path())),
        };
        result["loader"] = loader::rows(&loader_opts, &cfg, &tok)?;
    }

    if let Some((python, script)) = &opts.reference {
        result["reference"] = run_reference(python, script, out, &[], "reference.json")?;
    }
    let path = out.join("bench.json");
    write_file(&path, serde_json::to_string_pretty(&result).expect("json"))?;
    Ok(result)
}

/// Run the PyTorch reference `script` on the inputs in `out` (plus
/// `args`) and read the JSON it writes there as `answer`.
fn run_reference(
    python: &Path,
    script: &Path,
    out: &Path,
    args: &[&str],
    answer: &str,
) -> Result<Value> {
    let mut cmd = Command::new(python);
    cmd.arg(script).arg("--dir").arg(out).args(args);
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| Error::Config(format!("cannot start the reference {shown}: {e}")))?;
    if !status.success() {
        return Err(Error::Config(format!(
            "the PyTorch reference failed ({status}): {shown}"
        )));
    }
    let path = out.join(answer);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Data {
        path: path.clone(),
        line: Some(e.line()),
        message: format!("not JSON: {e}"),
    })
}

/// The data pipeline alone: JPEG files decoded, resized, normalised and
/// tokenised into batches by the training loader, in images/s.
fn data_pipeline(
    opts: &BenchOptions,
    cfg: &vlmatch_registry::Config,
    train_ds: &crate::data::Dataset,
    tok: &Arc<crate::tokenizer::Tokenizer>,
) -> Result<Value> {
    let dir = opts.out.join("data");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).map_err(|e| Error::io(&images, e))?;
    let n = opts.data_images.min(train_ds.images.len());
    let mut lines = Vec::with_capacity(n);
    let side = opts.data_image_side;
    for i in 0..n {
        let ImageRef::Scene(scene) = &train_ds.images[i] else {
            return Err(Error::Config(
                "the data benchmark writes images from the built-in dataset (data.source = \"synthetic\")"
                    .into(),
            ));
        };
        let name = format!("{i:06}.jpg");
        let path = images.join(&name);
        if !path.exists() {
            let rgb = image::RgbImage::from_raw(side as u32, side as u32, scene.render(side))
                .expect("render gives side x side RGB");
            rgb.save_with_format(&path, image::ImageFormat::Jpeg)
                .map_err(|e| Error::Data {
                    path: path.clone(),
                    line: None,
                    message: format!("cannot write JPEG: {e}"),
                })?;
        }
        let caption = train_ds
            .pairs
            .iter()
            .find(|p| p.image == i)
            .map(|p| p.caption.clone())
            .unwrap_or_default();
        lines.push(json!({"image": format!("images/{name}"), "caption": caption, "image_id": i}));
    }
    let ann = dir.join("annotations.json");
    write_file(&ann, serde_json::to_string(&lines).expect("json"))?;
    let ds = Arc::new(annotations::load(&ann, Some(&dir))?);
    let b = cfg.train.batch_size.min(ds.len());
    let per_pass = ds.len() / b;
    let loader_cfg = LoaderConfig::new(&cfg.data, b, Some(cfg.train.seed));
    let mut loader = Loader::new(ds.clone(), tok.clone(), loader_cfg, 0)?;
    let (s_per_batch, _) = time_blocks(Device::Cpu, per_pass, opts.repeats, per_pass, || {
        loader.next_batch().map(drop)
    })?;
    Ok(json!({
        "images": ds.len(),
        "jpeg_side": side,
        "image_size": cfg.data.image_size,
        "workers": cfg.data.workers,
        "batch_size": b,
        "images_per_s": b as f64 / s_per_batch,
    }))
}

/// The comparison table `vlmatch bench` prints.
pub fn table(r: &Value) -> String {
    let m = &r["meta"];
    let reference = r.get("reference");
    let get = |v: Option<&Value>, path: &[&str]| -> Option<f64> {
        let mut v = v?;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_f64()
    };
    let mut s = format!(
        "vlmatch bench: device {}, compute {}, {} threads, batch {}, {} timed steps x {} repeats after {} warm-up (median)\n",
        m["device"].as_str().unwrap_or("?"),
        m["compute"].as_str().unwrap_or("?"),
        m["threads"],
        m["batch_size"],
        m["steps"],
        m["repeats"],
        m["warmup"],
    );
    if let Some(rf) = reference {
        s += &format!(
            "model check: parameters {} (reference {}); ITC loss at init {:.6} (reference {:.6})\n",
            m["parameters"],
            rf["parameters"],
            r["init_itc_loss"].as_f64().unwrap_or(f64::NAN),
            rf["init_itc_loss"].as_f64().unwrap_or(f64::NAN),
        );
        if let Some(note) = rf.get("note").and_then(Value::as_str) {
            s += &format!("reference note: {note}\n");
        }
    }
    s += &format!(
        "{:<34} {:>12} {:>12} {:>22}\n",
        "", "vlmatch", "PyTorch", "ratio"
    );
    let fmt = |x: Option<f64>, scale: f64, prec: usize| {
        x.map(|x| format!("{:.*}", prec, x * scale))
            .unwrap_or_else(|| "-".into())
    };
    let row = |name: &str, path: &[&str], scale: f64, prec: usize, lower_better: bool| {
        let a = get(Some(r), path);
        let b = get(reference, path);
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => {
                let q = a / b;
                let better = if lower_better { q < 1.0 } else { q > 1.0 };
                format!(
                    "{q:.2}x ({})",
                    if better {
                        "vlmatch better"
                    } else {
                        "PyTorch better"
                    }
                )
            }
            _ => "-".into(),
        };
        format!(
            "{:<34} {:>12} {:>12} {:>22}\n",
            name,
            fmt(a, scale, prec),
            fmt(b, scale, prec),
            ratio
        )
    };
    s += &row("train step (ms)", &["step_s"], 1e3, 2, true);
    s += &row("images/s", &["images_per_s"], 1.0, 1, false);
    s += &row("peak RSS (MiB)", &["peak_memory", "rss_mib"], 1.0, 0, true);
    if let Some(n) = get(Some(r), &["readbacks_per_step"]) {
        s += &format!(
            "{:<34} {:>12.2}   (host reads inside the step; each syncs a GPU)\n",
            "read-backs per step", n
        );
    }
    if get(Some(r), &["peak_memory", "gpu_mib"]).is_some() {
        s += &row(
            "peak GPU memory (MiB)",
            &["peak_memory", "gpu_mib"],
            1.0,
            0,
            true,
        );
    }
    s += &flops::lines(r);
    // Model FLOPs by the usual convention: the reference's count when there
    // is one (both columns, so the ratio is the speed's), else the nominal
    // count above.
    let nominal = get(reference, &["flops_per_step"])
        .or_else(|| get(Some(r), &["flops", "nominal", "total"]));
    if let Some(f) = nominal {
        let tf = |t: Option<f64>| t.map(|t| f / t / 1e12);
        row_text(
            &mut s,
            "model TFLOP/s",
            tf(get(Some(r), &["step_s"])),
            tf(get(reference, &["step_s"])),
        );
        if let Some(peak) = get(reference, &["peak_tflops"]) {
            let mfu = |t: Option<f64>| t.map(|t| 100.0 * f / t / 1e12 / peak);
            row_text(
                &mut s,
                &format!("MFU % (of {peak:.0} TFLOP/s)"),
                mfu(get(Some(r), &["step_s"])),
                mfu(get(reference, &["step_s"])),
            );
        }
    }
    if get(Some(r), &["data", "images_per_s"]).is_some() {
        s += &row(
            "data pipeline (images/s)",
            &["data", "images_per_s"],
            1.0,
            1,
            false,
        );
    }
    s += &loader::lines(r);
    for (name, key) in [
        ("NegGen candidates/s", "candidates_per_s"),
        ("NegGen negatives kept/s", "negatives_per_s"),
        ("NegGen tagging captions/s/thread", "tagging_captions_per_s"),
    ] {
        if let Some(n) = get(Some(r), &["neggen", key]) {
            s += &format!(
                "{:<34} {:>12.1} {:>12} {:>22}\n",
                name, n, "-", "(no PyTorch NegGen)"
            );
        }
    }
    s
}

fn row_text(s: &mut String, name: &str, a: Option<f64>, b: Option<f64>) {
    let f = |x: Option<f64>| x.map(|x| format!("{x:.3}")).unwrap_or_else(|| "-".into());
    *s += &format!("{:<34} {:>12} {:>12}\n", name, f(a), f(b));
}
