//! The augmented-loader rows of `vlmatch bench`: the JPEG files of the
//! data-pipeline row (`--data-image-side`, 480 px by default) through
//! ALBEF's training transform to 256 px, one loader worker, against a
//! PIL/torchvision `DataLoader` with `num_workers=1` and one torch thread
//! (`bench/reference_loader.py`) on the same files with the same ops, in
//! the same call. Two variants: random resized crop (scale 0.2 to 1,
//! bicubic), flip and normalise ("plain"), and the same with ALBEF's
//! RandomAugment(2, 7) over its ten ops ("randaug").
//!
//! The loader is timed as the data row times it (one pass of warm-up, then
//! `repeats` passes, median seconds per batch). Then every image once more
//! on this thread, one stage at a time (decode, crop/resize, flip and
//! RandAugment, normalise, collate: tokenising and the batch tensors),
//! giving each stage's share of the time and, where the binary counts
//! allocations ([`crate::bench::alloc`]), its allocations per image.

use crate::data::augment::{AugKey, Augment, Draws};
use crate::data::image::{normalize_into, Scratch, TensorBuf};
use crate::data::loader::{Loader, LoaderConfig};
use crate::tokenizer::Tokenizer;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tch::Tensor;
use vlmatch_core::{Error, Result};
use vlmatch_registry::config::{AugmentConfig, AugmentOp};

/// ALBEF's training resolution.
pub const SIZE: usize = 256;

/// The stages, in order, as both sides name them.
pub const STAGES: [&str; 5] = ["decode", "crop_resize", "augment", "normalize", "collate"];

/// The variants: name and RandAugment's N.
const VARIANTS: [(&str, usize); 2] = [("plain", 0), ("randaug", 2)];

/// What the rows take from `vlmatch bench`'s options.
pub struct Options<'a> {
    /// The bench's output directory, with `data/` and `vocab.txt` written.
    pub out: &'a Path,
    /// Side of the JPEG files in `data/`.
    pub data_image_side: usize,
    /// Timed passes.
    pub repeats: usize,
    /// `(python, script)` of the PyTorch reference: `reference_loader.py`
    /// is looked for beside `script`.
    pub reference: Option<(&'a Path, &'a Path)>,
}

/// `f` over `warmup` calls, then `repeats` blocks of `per_block` calls:
/// the median seconds per call.
fn median_per_call(
    warmup: usize,
    repeats: usize,
    per_block: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut blocks = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        for _ in 0..per_block {
            f()?;
        }
        blocks.push(t.elapsed().as_secs_f64() / per_block.max(1) as f64);
    }
    blocks.sort_by(f64::total_cmp);
    let n = blocks.len();
    Ok(if n % 2 == 1 {
        blocks[n / 2]
    } else {
        (blocks[n / 2 - 1] + blocks[n / 2]) / 2.0
    })
}

/// `python script --dir out`, then the JSON it wrote, or why not.
fn run_reference(python: &Path, script: &Path, out: &Path) -> std::result::Result<Value, String> {
    let mut cmd = std::process::Command::new(python);
    cmd.arg(script).arg("--dir").arg(out);
    let shown = format!("{cmd:?}");
    let status = cmd
        .status()
        .map_err(|e| format!("cannot start {shown}: {e}"))?;
    if !status.success() {
        return Err(format!("{shown} failed ({status})"));
    }
    let path = out.join("loader-reference.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: not JSON: {e}", path.display()))
}

/// ALBEF's pretraining transform with RandAugment's N = `n`.
fn albef(n: usize) -> AugmentConfig {
    AugmentConfig {
        crop: true,
        crop_scale: [0.2, 1.0],
        crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
        flip: 0.5,
        flip_swap_left_right: false,
        randaug_n: n,
        randaug_m: 7.0,
        randaug_ops: AugmentOp::ALBEF.to_vec(),
    }
}

/// The Python that runs `bench/reference_loader.py`: `VLMATCH_LOADER_PYTHON`,
/// else the golden-augment venv (torchvision and OpenCV), else `python`.
fn loader_python(python: &Path) -> PathBuf {
    if let Some(p) = std::env::var_os("VLMATCH_LOADER_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/vlmatch/golden-augment/bin/python"));
    venv.filter(|p| p.exists())
        .unwrap_or_else(|| python.to_path_buf())
}

/// Both variants on the files of the data row (`OUT/data/`), with the PIL
/// reference when `opts.reference` names one. (What it needs of
/// `vlmatch bench` comes in [`Options`], so that `bench` and this module do
/// not import each other.)
pub fn rows(opts: &Options, cfg: &vlmatch_registry::Config, tok: &Arc<Tokenizer>) -> Result<Value> {
    let dir = opts.out.join("data");
    let ann = dir.join("annotations.json");
    let ds = Arc::new(crate::data::annotations::load(&ann, Some(&dir))?);
    let text = std::fs::read_to_string(&ann).map_err(|e| Error::io(&ann, e))?;
    let items: Vec<Value> = serde_json::from_str(&text).map_err(|e| Error::Data {
        path: ann.clone(),
        line: Some(e.line()),
        message: format!("not JSON: {e}"),
    })?;
    // One torch thread, as the reference's DataLoader worker has.
    let threads = tch::get_num_threads();
    tch::set_num_threads(1);
    let out = measure(opts, cfg, tok, &dir, ds, items);
    tch::set_num_threads(threads);
    out
}

/// [`rows`] on one torch thread.
fn measure(
    opts: &Options,
    cfg: &vlmatch_registry::Config,
    tok: &Arc<Tokenizer>,
    dir: &Path,
    ds: Arc<crate::data::Dataset>,
    items: Vec<Value>,
) -> Result<Value> {
    let b = cfg.train.batch_size.min(ds.len()).max(1);
    let per_pass = ds.len() / b;
    let seed = cfg.train.seed;
    let mut data = cfg.data.clone();
    data.image_size = SIZE as i64;
    data.workers = 1;
    let mut out = json!({
        "images": ds.len(),
        "jpeg_side": opts.data_image_side,
        "image_size": SIZE,
        "batch_size": b,
        "workers": 1,
        "variants": {},
    });
    for (name, n) in VARIANTS {
        let aug = albef(n);
        let lc = LoaderConfig::new(&data, b, Some(seed)).augmented(&aug, seed);
        let mut loader = Loader::new(ds.clone(), tok.clone(), lc, 0)?;
        let s = median_per_call(per_pass, opts.repeats, per_pass, || {
            loader.next_batch().map(drop)
        })?;
        drop(loader);
        let paths: Vec<PathBuf> = items
            .iter()
            .map(|it| dir.join(it["image"].as_str().unwrap_or_default()))
            .collect();
        let captions: Vec<&str> = items
            .iter()
            .map(|it| it["caption"].as_str().unwrap_or_default())
            .collect();
        let augment = Augment::new(&aug, seed).expect("crop on");
        let stages = stage_loop(&paths, &captions, &augment, &data, tok, b)?;
        out["variants"][name] = json!({
            "randaug_n": n,
            "images_per_s": b as f64 / s,
            "stages": stages,
        });
    }
    if let Some((python, script)) = opts.reference {
        let spec = json!({
            "root": dir,
            "items": items,
            "size": SIZE,
            "crop_scale": [0.2, 1.0],
            "crop_ratio": [3.0 / 4.0, 4.0 / 3.0],
            "flip": 0.5,
            "mean": cfg.data.mean,
            "std": cfg.data.std,
            "batch_size": b,
            "repeats": opts.repeats,
            "vocab": opts.out.join("vocab.txt"),
            "max_len": cfg.data.max_len,
            "variants": VARIANTS.iter().map(|&(name, n)| json!({
                "name": name,
                "randaug_n": n,
                "randaug_m": 7,
                "randaug_ops": AugmentOp::ALBEF.iter().map(|op| {
                    serde_json::to_value(op).expect("op name")
                }).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        let path = opts.out.join("loader-spec.json");
        std::fs::write(&path, serde_json::to_string_pretty(&spec).expect("json"))
            .map_err(|e| Error::io(&path, e))?;
        let script = script.with_file_name("reference_loader.py");
        let python = loader_python(python);
        out["reference"] =
            run_reference(&python, &script, opts.out).unwrap_or_else(|e| json!({ "error": e }));
    }
    Ok(out)
}

/// Seconds and allocations per image of each stage, every image once after
/// a warm-up pass, on this thread with one [`Scratch`] (the loader's code).
fn stage_loop(
    paths: &[PathBuf],
    captions: &[&str],
    aug: &Augment,
    data: &vlmatch_registry::config::DataConfig,
    tok: &Tokenizer,
    b: usize,
) -> Result<Value> {
    let n = (paths.len() / b) * b;
    let plane = 3 * SIZE * SIZE;
    let mut scratch = Scratch::default();
    let mut draws = Draws::default();
    let mut pixels = TensorBuf::zeros(b * plane);
    let mut secs = [0f64; 5];
    let mut allocs = [0u64; 5];
    let counted = crate::bench::alloc::allocations().is_some();
    let count = || crate::bench::alloc::allocations().unwrap_or(0);
    for timed in [false, true] {
        for first in (0..n).step_by(b) {
            for (k, i) in (first..first + b).enumerate() {
                let key = AugKey {
                    sample: i as u64,
                    epoch: 0,
                };
                let mut marks = [(Instant::now(), count()); 5];
                let (w, h) = scratch.decode_file(&paths[i], "the bench")?;
                marks[1] = (Instant::now(), count());
                aug.draws_into(key, w, h, &mut draws);
                scratch.aug.crop_resize(&scratch.rgb, (w, h), &draws, SIZE);
                marks[2] = (Instant::now(), count());
                scratch.aug.flip_and_ops(&draws, SIZE);
                marks[3] = (Instant::now(), count());
                let dst = &mut pixels[k * plane..(k + 1) * plane];
                normalize_into(scratch.aug.image(), data.mean, data.std, dst);
                marks[4] = (Instant::now(), count());
                if timed {
                    for s in 0..4 {
                        secs[s] += (marks[s + 1].0 - marks[s].0).as_secs_f64();
                        allocs[s] += marks[s + 1].1 - marks[s].1;
                    }
                }
            }
            let (t, a) = (Instant::now(), count());
            let (ids, mask, l) =
                tok.encode_batch(&captions[first..first + b], data.max_len as usize);
            // As the loader hands a batch on: its tensor, a new one to fill.
            let filled = std::mem::replace(&mut pixels, TensorBuf::zeros(b * plane));
            let images = filled
                .into_tensor()
                .view([b as i64, 3, SIZE as i64, SIZE as i64]);
            let text = (
                Tensor::from_slice(&ids).view([b as i64, l as i64]),
                Tensor::from_slice(&mask).view([b as i64, l as i64]),
            );
            drop((images, text));
            if timed {
                secs[4] += t.elapsed().as_secs_f64();
                allocs[4] += count() - a;
            }
        }
    }
    let total: f64 = secs.iter().sum();
    let mut out = json!({
        "images": n,
        "images_per_s": n as f64 / total,
        "s_per_image": {},
        "share": {},
        "allocations_per_image": if counted { json!({}) } else { Value::Null },
    });
    for (s, name) in STAGES.iter().enumerate() {
        out["s_per_image"][name] = json!(secs[s] / n as f64);
        out["share"][name] = json!(secs[s] / total);
        if counted {
            out["allocations_per_image"][name] = json!(allocs[s] as f64 / n as f64);
        }
    }
    Ok(out)
}

/// The rows' lines in `vlmatch bench`'s table.
pub fn lines(r: &Value) -> String {
    let Some(l) = r.get("loader") else {
        return String::new();
    };
    let mut s = format!(
        "augmented loader: {} JPEGs of {} px to {} px, one worker each side (images/s per core)\n",
        l["images"], l["jpeg_side"], l["image_size"]
    );
    let reference = l.get("reference");
    if let Some(e) = reference.and_then(|r| r.get("error")) {
        s += &format!("  PIL reference failed: {}\n", e.as_str().unwrap_or("?"));
    }
    for (name, label) in [
        ("plain", "  crop + flip + normalise"),
        ("randaug", "  + RandomAugment(2, 7)"),
    ] {
        let v = &l["variants"][name];
        let a = v["images_per_s"].as_f64();
        let b = reference.and_then(|r| r["variants"][name]["images_per_s"].as_f64());
        let ratio = match (a, b) {
            (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        let f = |x: Option<f64>| x.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into());
        s += &format!("{:<34} {:>12} {:>12} {:>22}\n", label, f(a), f(b), ratio);
        let shares = |st: &Value| -> String {
            let t: f64 = STAGES.iter().filter_map(|k| st[*k].as_f64()).sum();
            STAGES
                .iter()
                .map(|k| match st[*k].as_f64() {
                    Some(x) if t > 0.0 => format!("{k} {:.0}%", 100.0 * x / t),
                    _ => format!("{k} -"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        s += &format!(
            "    vlmatch stages: {}\n",
            shares(&v["stages"]["s_per_image"])
        );
        if let Some(rv) = reference
            .map(|r| &r["variants"][name])
            .filter(|v| !v.is_null())
        {
            s += &format!("    PIL stages:     {}\n", shares(&rv["stage_s_per_image"]));
        }
        let per = &v["stages"]["allocations_per_image"];
        if per.is_object() {
            let list: Vec<String> = STAGES
                .iter()
                .map(|k| format!("{k} {:.2}", per[*k].as_f64().unwrap_or(f64::NAN)))
                .collect();
            s += &format!("    vlmatch allocations per image: {}\n", list.join(", "));
        }
    }
    s
}
