//! `vlmatch bench --annotations N`: what opening an annotation file of `N`
//! captions costs a training run, held in memory (`data.index = "off"`,
//! the JSON loader) against read through its index (`"auto"`): open time,
//! peak and resident memory per caption, and with two processes (two ranks
//! on one machine) their proportional set sizes and the index mapping's.
//!
//! The file is generated once under `OUT/annotations-N/` (kept for later
//! calls): JSON lines as ALBEF's pretraining files are, one caption per line
//! (`{"image": ..., "caption": ...}`), 5 captions per image, captions of 8
//! to 14 words; the images are hard links to a few small JPEG files (the
//! loaders only check that each exists; nothing is decoded here).
//!
//! Each measurement runs in a fresh child process (this binary with the
//! hidden `--annotation-probe`), so peak RSS (`VmHWM`) is its own: the
//! child opens the file, draws the first epoch's order as the training
//! loader does and reads the first 4096 pairs' captions and image paths,
//! then reports `/proc/self/status` and `/proc/self/smaps_rollup`, and the
//! index mapping's lines of `/proc/self/smaps`. Nothing here asserts a
//! time; the machine's load makes the times indicative.

use crate::data::annotations::{load_checked_within, AnnotationLimits};
use crate::data::{loader::epoch_order, Dataset, OnError};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
use vlmatch_core::{Error, Result};

pub struct AnnotationBenchOptions {
    /// Captions in the generated file.
    pub captions: usize,
    /// Where the file is generated and `annotations-N.json` written.
    pub out: PathBuf,
    /// Also measure the in-memory loader (it needs about 1 KB per caption).
    pub in_memory: bool,
}

const PER_IMAGE: usize = 5;
/// Images sharing one JPEG file through hard links (ext4 allows 65000).
const LINKS_PER_FILE: usize = 50_000;

const WORDS: &[&str] = &[
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "green",
    "small",
    "large",
    "riding",
    "sitting",
    "on",
    "in",
    "the",
    "of",
    "with",
    "next",
    "to",
    "a",
    "table",
    "street",
    "bus",
    "train",
    "plate",
    "pizza",
    "bench",
    "park",
    "tree",
    "water",
    "boat",
    "bicycle",
    "two",
    "three",
    "people",
    "standing",
    "near",
    "white",
    "black",
    "kitchen",
    "room",
    "field",
    "grass",
    "sky",
    "building",
    "window",
    "holding",
    "umbrella",
    "child",
    "playing",
    "ball",
    "frisbee",
    "skateboard",
    "snow",
    "beach",
    "horse",
    "sheep",
    "cow",
    "bird",
    "flying",
];

/// The generated file of `captions` captions under `dir`, made unless a
/// previous call finished it.
fn generate(dir: &Path, captions: usize) -> Result<PathBuf> {
    let file = dir.join("train.jsonl");
    let done = dir.join("generated");
    if done.is_file() {
        return Ok(file);
    }
    let io = |p: &Path, e: std::io::Error| Error::io(p, e);
    std::fs::create_dir_all(dir.join("images")).map_err(|e| io(dir, e))?;
    let images = captions.div_ceil(PER_IMAGE);
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(8, 8, image::Rgb([120, 80, 40]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .map_err(|e| Error::Config(format!("encoding the bench's JPEG: {e}")))?;
    for k in 0..images {
        let folder = dir.join(format!("images/{:05}", k / 1000));
        if k % 1000 == 0 {
            std::fs::create_dir_all(&folder).map_err(|e| io(&folder, e))?;
        }
        let path = folder.join(format!("{k:08}.jpg"));
        let source = dir.join(format!("images/source-{}.jpg", k / LINKS_PER_FILE));
        if k % LINKS_PER_FILE == 0 {
            std::fs::write(&source, &jpeg).map_err(|e| io(&source, e))?;
        }
        match std::fs::hard_link(&source, &path) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(io(&path, e)),
            _ => {}
        }
    }
    let out = std::fs::File::create(&file).map_err(|e| io(&file, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut rng = crate::rng::Rng::new(0xA770);
    // One caption per line, an image's captions spread over the file as
    // in ALBEF's concatenated sources: image k's j-th caption on line
    // j * images + k.
    for j in 0..PER_IMAGE {
        for k in 0..images {
            if j * images + k >= captions {
                break;
            }
            let n = 8 + rng.below(7);
            let words: Vec<&str> = (0..n).map(|_| *rng.pick(WORDS)).collect();
            let line = json!({
                "image": format!("images/{:05}/{k:08}.jpg", k / 1000),
                "caption": words.join(" "),
            });
            writeln!(out, "{line}").map_err(|e| io(&file, e))?;
        }
    }
    out.flush().map_err(|e| io(&file, e))?;
    std::fs::write(&done, "").map_err(|e| io(&done, e))?;
    Ok(file)
}

/// `/proc/self/status` field `key` in KiB.
fn status_kib(key: &str) -> u64 {
    proc_kib("/proc/self/status", key)
}

fn proc_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// `(Rss, Pss)` in KiB of this process's mappings of files whose names end
/// in `suffix` (`/proc/self/smaps`).
fn mapping_kib(suffix: &str) -> (u64, u64) {
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return (0, 0);
    };
    let (mut inside, mut rss, mut pss) = (false, 0, 0);
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            inside = line.trim_end().ends_with(suffix);
            continue;
        }
        let value: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        match first {
            "Rss:" if inside => rss += value,
            "Pss:" if inside => pss += value,
            _ => {}
        }
    }
    (rss, pss)
}

/// The child's work: open `file` in `mode` (`json` or `index`), draw the
/// first epoch's order, read the first 4096 pairs, and (with `hold`) wait
/// for a line on stdin before measuring, so that two children measure
/// while both hold the data. Prints one JSON object.
pub fn probe(file: &Path, mode: &str, hold: bool) -> Result<()> {
    let base_rss = status_kib("VmRSS:");
    let base_pss = proc_kib("/proc/self/smaps_rollup", "Pss:");
    let root = file.parent().map(Path::to_path_buf);
    let t = Instant::now();
    let (ds, cached): (Dataset, Option<bool>) = match mode {
        "json" => {
            let limits = AnnotationLimits::default();
            let ds = load_checked_within(file, root.as_deref(), None, OnError::Fail, limits)?;
            (ds, None)
        }
        "index" => {
            let ix = crate::data::index::AnnotationIndex::open(
                file,
                root.as_deref(),
                OnError::Fail,
                AnnotationLimits::default(),
            )?;
            let cached = ix.cached;
            let name = file.display().to_string();
            (
                Dataset::stored(name, std::sync::Arc::new(ix), 0),
                Some(cached),
            )
        }
        other => return Err(Error::Config(format!("unknown probe mode `{other}`"))),
    };
    let open_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let order = epoch_order(ds.len(), Some(1), 0);
    let mut bytes = 0usize;
    for &i in order.iter().take(4096) {
        bytes += ds.caption(i)?.len();
        if let crate::data::ImageRef::File { path, .. } = &*ds.image_ref(ds.pair_image(i))? {
            bytes += path.as_os_str().len();
        }
    }
    let first_s = t.elapsed().as_secs_f64();
    if hold {
        println!("ready");
        std::io::stdout().flush().ok();
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).ok();
    }
    let (map_rss, map_pss) = mapping_kib(".vlmatch-index");
    let out = json!({
        "mode": mode,
        "cached": cached,
        "captions": ds.len(),
        "images": ds.image_count(),
        "open_s": open_s,
        "first_4096_s": first_s,
        "read_bytes": bytes,
        "base_rss_kib": base_rss,
        "base_pss_kib": base_pss,
        "rss_kib": status_kib("VmRSS:"),
        "peak_rss_kib": status_kib("VmHWM:"),
        "rollup_rss_kib": proc_kib("/proc/self/smaps_rollup", "Rss:"),
        "rollup_pss_kib": proc_kib("/proc/self/smaps_rollup", "Pss:"),
        "index_map_rss_kib": map_rss,
        "index_map_pss_kib": map_pss,
        "order_len": order.len(),
    });
    println!("{out}");
    Ok(())
}

/// Start `procs` probes of `file` in `mode` at once; with more than one,
/// they measure while all hold the data.
fn run_probes(file: &Path, mode: &str, procs: usize) -> Result<Vec<Value>> {
    let exe = std::env::current_exe().map_err(|e| Error::io("current executable", e))?;
    let mut children = Vec::new();
    for _ in 0..procs {
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "--annotation-probe", mode, "--annotation-file"])
            .arg(file)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        if procs > 1 {
            cmd.arg("--annotation-hold");
        }
        children.push(cmd.spawn().map_err(|e| Error::io(&exe, e))?);
    }
    let mut readers = Vec::new();
    for c in &mut children {
        let mut r = BufReader::new(c.stdout.take().expect("piped"));
        if procs > 1 {
            let mut line = String::new();
            r.read_line(&mut line).map_err(|e| Error::io("probe", e))?;
            if line.trim() != "ready" {
                return Err(Error::Config(format!("a probe said `{line}`")));
            }
        }
        readers.push(r);
    }
    for c in &mut children {
        if let Some(mut stdin) = c.stdin.take() {
            writeln!(stdin).ok();
        }
    }
    let mut out = Vec::new();
    for (mut c, mut r) in children.into_iter().zip(readers) {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut r, &mut text).map_err(|e| Error::io("probe", e))?;
        let status = c.wait().map_err(|e| Error::io("probe", e))?;
        if !status.success() {
            return Err(Error::Config(format!("a {mode} probe failed ({status})")));
        }
        let last = text.lines().last().unwrap_or("");
        out.push(
            serde_json::from_str(last)
                .map_err(|e| Error::Config(format!("a probe printed `{last}`: {e}")))?,
        );
    }
    Ok(out)
}

fn mib(kib: &Value) -> f64 {
    kib.as_f64().unwrap_or(0.0) / 1024.0
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// One probe's row of the table: open time, peak and resident MiB, and
/// both above the process's start (the binary and libtorch) per caption.
fn row(name: &str, v: &Value) -> String {
    let n = f(&v["captions"]).max(1.0);
    let per = |k: &str| (f(&v[k]) - f(&v["base_rss_kib"])) * 1024.0 / n;
    format!(
        "{name:<26} {:>7.2} {:>9.0} {:>8.0} {:>11.1} {:>11.1}\n",
        f(&v["open_s"]),
        mib(&v["peak_rss_kib"]),
        mib(&v["rss_kib"]),
        per("peak_rss_kib"),
        per("rss_kib"),
    )
}

/// Generate the file, run the probes, print the table and write
/// `OUT/annotations-N.json`.
pub fn bench_annotations(opts: &AnnotationBenchOptions) -> Result<Value> {
    let dir = opts.out.join(format!("annotations-{}", opts.captions));
    let t = Instant::now();
    let file = generate(&dir, opts.captions)?;
    let size = std::fs::metadata(&file)
        .map_err(|e| Error::io(&file, e))?
        .len();
    eprintln!(
        "annotation file {} ({:.0} MiB) ready in {:.1} s",
        file.display(),
        size as f64 / (1 << 20) as f64,
        t.elapsed().as_secs_f64()
    );
    // A fresh build first (any cache removed), then from the cache.
    let cache = dir.join(".train.jsonl.vlmatch-index");
    let _ = std::fs::remove_file(&cache);
    let build = run_probes(&file, "index", 1)?.remove(0);
    let cached = run_probes(&file, "index", 1)?.remove(0);
    let two_index = run_probes(&file, "index", 2)?;
    let mut skipped = None;
    let (json1, two_json) = if opts.in_memory {
        let one = run_probes(&file, "json", 1)?.remove(0);
        // Two copies at once only where they fit: at 10M captions each
        // holds over 10 GiB, and running out of memory would kill more
        // than this bench.
        let need = 2.0 * f(&one["peak_rss_kib"]);
        let available = proc_kib("/proc/meminfo", "MemAvailable:") as f64;
        let two = if need < 0.8 * available {
            Some(run_probes(&file, "json", 2)?)
        } else {
            skipped = Some(format!(
                "2 processes, in memory: not run; two copies need about {:.1} GiB at their \
                 peak and {:.1} GiB is available\n",
                need / (1 << 20) as f64,
                available / (1 << 20) as f64
            ));
            None
        };
        (Some(one), two)
    } else {
        (None, None)
    };
    let mut table = format!(
        "annotations: {} captions, {} images, {:.0} MiB file\n{:<26} {:>7} {:>9} {:>8} {:>11} {:>11}\n",
        opts.captions,
        cached["images"],
        size as f64 / (1 << 20) as f64,
        "",
        "open s",
        "peak MiB",
        "RSS MiB",
        "peak B/cap",
        "RSS B/cap"
    );
    if let Some(j) = &json1 {
        table += &row("in memory (JSON loader)", j);
    }
    table += &row("index, built", &build);
    table += &row("index, from the cache", &cached);
    let pss = |vs: &[Value], what: &str| {
        let sum = |k: &str| vs.iter().map(|v| mib(&v[k])).sum::<f64>();
        let mut line = format!(
            "2 processes, {what}: PSS {:.0} MiB together ({:.0} above their start), RSS {:.0}",
            sum("rollup_pss_kib"),
            sum("rollup_pss_kib") - sum("base_pss_kib"),
            sum("rollup_rss_kib"),
        );
        if what == "index" {
            line += &format!(
                "; the index mapping: RSS {:.1} MiB, PSS {:.1} MiB together",
                sum("index_map_rss_kib"),
                sum("index_map_pss_kib")
            );
        }
        line + "\n"
    };
    table += &pss(&two_index, "index");
    if let Some(t) = &two_json {
        table += &pss(t, "in memory");
    }
    if let Some(s) = &skipped {
        table += s;
    }
    if let Some(j) = &json1 {
        let ratio = |k: &str| j[k].as_f64().unwrap_or(0.0) / cached[k].as_f64().unwrap_or(1.0);
        table += &format!(
            "in memory / index from the cache: open time {:.1}x, peak RSS {:.1}x\n",
            ratio("open_s"),
            ratio("peak_rss_kib")
        );
    }
    print!("{table}");
    let result = json!({
        "captions": opts.captions,
        "file_bytes": size,
        "index_built": build,
        "index_cached": cached,
        "index_two_processes": two_index,
        "in_memory": json1,
        "in_memory_two_processes": two_json,
        "in_memory_two_processes_skipped": skipped,
    });
    let path = opts.out.join(format!("annotations-{}.json", opts.captions));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&result).unwrap_or_default(),
    )
    .map_err(|e| Error::io(&path, e))?;
    Ok(result)
}
