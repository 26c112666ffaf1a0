//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use vlmatch::run::preset;
use vlmatch::train::{train, TrainOptions, TrainSummary};
use vlmatch_registry::ConfigLayers;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// A fresh directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The tiny preset with the micro model on top, plus `sets`.
pub fn micro_layers(sets: &[&str]) -> ConfigLayers {
    ConfigLayers {
        base: Some(preset("tiny").unwrap()),
        files: vec![fixture("micro.toml")],
        env: false,
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

/// libtorch's random generator is global to the process and the test harness
/// runs tests on parallel threads: training runs in one test binary take
/// turns, or their seeded draws would interleave.
pub static TRAINING: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn train_exclusive(opts: TrainOptions) -> vlmatch_core::Result<TrainSummary> {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    train(opts)
}

pub fn run(
    run_dir: &Path,
    sets: &[&str],
    halt_after: Option<i64>,
) -> vlmatch_core::Result<TrainSummary> {
    train_exclusive(TrainOptions {
        layers: micro_layers(sets),
        run_dir: Some(run_dir.to_path_buf()),
        resume: None,
        halt_after,
        progress: false,
        force: false,
    })
}

pub fn losses(summary: &TrainSummary) -> Vec<(i64, f64)> {
    summary
        .logged
        .iter()
        .map(|m| (m["step"].as_i64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}

/// A ustar header for a regular file `name` whose size field says `size`
/// (base-256 when it does not fit the octal field), whatever follows it.
pub fn tar_header(name: &str, size: u64) -> [u8; 512] {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    if size < 1 << 33 {
        h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// Append a regular file to a ustar archive.
pub fn tar_entry(out: &mut Vec<u8>, name: &str, data: &[u8]) {
    out.extend_from_slice(&tar_header(name, data.len() as u64));
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The two zero blocks that end a ustar archive.
pub fn tar_end(out: &mut Vec<u8>) {
    out.extend_from_slice(&[0u8; 1024]);
}

/// Continue the run directory `dir` from its newest checkpoint.
pub fn resume(dir: &Path) -> vlmatch_core::Result<TrainSummary> {
    train_exclusive(TrainOptions {
        layers: ConfigLayers::default(),
        run_dir: None,
        resume: Some(dir.to_path_buf()),
        halt_after: None,
        progress: false,
        force: false,
    })
}

/// A copy of the directory tree `from` at `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// The objects of a JSON-lines log without their wall time (`time_s`).
pub fn jsonl_without_time(path: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let m = v.as_object_mut().unwrap();
            m.remove("time_s");
            m.clone()
        })
        .collect()
}

/// A micro run of `configs/vlmatch.toml` (4 steps, so the VL-RTD
/// discriminator exists) in `dir/run`, and the held-out split `preview`
/// writes for it in `dir/heldout` (16 PNG images, 48 captions,
/// `annotations.jsonl`): the trained model the matcher and serve tests use.
pub fn vlmatch_run_and_heldout(dir: &Path) -> (PathBuf, PathBuf) {
    let run = dir.join("run");
    let vlmatch_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vlmatch.toml");
    let mut layers = micro_layers(&["train.steps=4", "eval.at_end=false"]);
    layers.files.insert(0, vlmatch_toml.clone());
    train_exclusive(TrainOptions {
        layers,
        run_dir: Some(run.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    let mut layers = micro_layers(&[]);
    layers.files.insert(0, vlmatch_toml);
    let heldout = dir.join("heldout");
    vlmatch::commands::preview::preview(layers, "heldout", None, &heldout).unwrap();
    (run, heldout)
}
