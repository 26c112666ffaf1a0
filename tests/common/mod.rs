//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use vlmatch::cli::preset;
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
    })
}

pub fn losses(summary: &TrainSummary) -> Vec<(i64, f64)> {
    summary
        .logged
        .iter()
        .map(|m| (m["step"].as_i64().unwrap(), m["loss"].as_f64().unwrap()))
        .collect()
}
