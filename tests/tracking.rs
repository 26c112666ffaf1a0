//! Experiment tracking: TensorBoard event files as TensorBoard's own reader
//! sees them, after a kill and a resume; `vlmatch plot` over the committed
//! ablation runs.

mod common;
use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vlmatch::tracking::flatten;

type Scalars = BTreeMap<String, Vec<(i64, Option<f32>)>>;

/// `metrics.jsonl` and `eval.jsonl` as the tags the event files should
/// hold: `train/KEY` and `heldout/DOTTED.KEY`, values rounded to f32 as
/// TensorBoard stores them (NaN as `None`).
fn expected(run: &Path) -> Scalars {
    let mut out = Scalars::new();
    for (file, group) in [("metrics.jsonl", "train"), ("eval.jsonl", "heldout")] {
        let text = std::fs::read_to_string(run.join(file)).unwrap();
        for line in text.lines() {
            let v: Value = serde_json::from_str(line).unwrap();
            let step = v["step"].as_i64().unwrap();
            for (k, x) in flatten(&v) {
                let x = (!x.is_nan()).then_some(x as f32);
                out.entry(format!("{group}/{k}"))
                    .or_default()
                    .push((step, x));
            }
        }
    }
    out
}

#[test]
fn tensorboard_reads_what_metrics_jsonl_holds_after_a_resume() {
    let dir = scratch("tensorboard");
    // Killed after step 6: the newest checkpoint is step 4, so steps 5-6
    // are logged twice, once by each invocation, and TensorBoard must show
    // the second.
    let cut = run(&dir, &["eval.every=4"], Some(6)).unwrap();
    assert_eq!(cut.last_step, 6);
    let resumed = resume(&dir).unwrap();
    assert_eq!(resumed.start_step, 4);

    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("tb"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    assert_eq!(files.len(), 2, "one event file per invocation: {files:?}");

    let want = expected(&dir);
    assert_eq!(
        want["train/loss"].len(),
        12,
        "metrics.jsonl: each step once"
    );
    assert_eq!(
        want["heldout/matching.itm_acc"]
            .iter()
            .map(|p| p.0)
            .collect::<Vec<_>>(),
        [4, 8, 12]
    );

    let Some(python) = std::env::var_os("BENCH_REFERENCE_PYTHON") else {
        eprintln!(
            "skipped reading the event files with the tensorboard package: \
             BENCH_REFERENCE_PYTHON is not set (cargo xtask test sets it)"
        );
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/read_tensorboard.py");
    let o = Command::new(python)
        .arg(script)
        .arg(dir.join("tb"))
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "read_tensorboard.py failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Compared as f32, what the files hold (serde_json's decimal parsing
    // is not always the nearest double).
    let got: BTreeMap<String, Vec<(i64, Option<f64>)>> = serde_json::from_slice(&o.stdout).unwrap();
    let got: Scalars = got
        .into_iter()
        .map(|(k, v)| {
            (
                k,
                v.into_iter()
                    .map(|(t, x)| (t, x.map(|x| x as f32)))
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the same scalars"
    );
    for (tag, points) in &want {
        // Steps 5 and 6 once each: the SessionLog START event of the resumed
        // invocation dropped the killed one's.
        assert_eq!(&got[tag], points, "tag {tag}");
    }
}

#[test]
fn tensorboard_off_writes_no_event_files() {
    let dir = scratch("tensorboard-off");
    run(&dir, &["train.tensorboard=false"], Some(2)).unwrap();
    assert!(dir.join("metrics.jsonl").is_file());
    assert!(!dir.join("tb").exists());
}

#[test]
fn without_a_terminal_progress_is_one_plain_line_per_logging_step() {
    let dir = scratch("plain-progress");
    let o = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(["train", "--config"])
        .arg(fixture("micro.toml"))
        .args([
            "--set",
            "train.log_every=4",
            "--set",
            "eval.every=8",
            "--run-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("step ")).collect();
    assert_eq!(lines.len(), 3, "steps 4, 8 and 12: {stderr}");
    for (line, step) in lines.iter().zip(["4/12", "8/12", "12/12"]) {
        assert!(line.starts_with(&format!("step {step} ")), "{line}");
        for part in [" steps/s ETA ", " loss ", " lr "] {
            assert!(line.contains(part), "{line}");
        }
    }
    assert!(lines[2].contains("| held-out@8: i2t R@1 "), "{}", lines[2]);
    // No bar redrawn in place.
    assert!(
        !stderr.contains('\r') && !stderr.contains("\x1b[2K"),
        "{stderr}"
    );
}

fn curves_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/results/curves")
}

fn plot(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .arg("plot")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn plot_draws_the_committed_ablation_runs_grouped_by_seed() {
    let out = scratch("plot");
    let runs: Vec<String> = ["baseline-s1", "baseline-s2", "baseline-s3"]
        .iter()
        .chain(&["vlmatch-s1", "vlmatch-s2", "vlmatch-s3"])
        .map(|r| curves_dir().join(r).display().to_string())
        .collect();
    let svg = out.join("itm.svg");
    let mut args: Vec<&str> = runs.iter().map(String::as_str).collect();
    args.extend(["--metric", "matching.itm_acc", "--group-seeds"]);
    args.extend(["--out", svg.to_str().unwrap()]);
    let o = plot(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = std::fs::read_to_string(&svg).unwrap();
    // One legend entry per group, not per seed.
    assert!(
        text.contains("baseline (3 seeds: mean, min–max band)"),
        "{text}"
    );
    assert!(text.contains("vlmatch (3 seeds: mean, min–max band)"));
    assert!(!text.contains("baseline-s1"));

    // A PNG has its text drawn from the embedded font: pixels that are
    // neither white nor a curve colour exist even without any system font.
    let png = out.join("loss.png");
    let o = plot(&[
        &runs[0],
        &runs[3],
        "--metric",
        "loss",
        "--out",
        png.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (960, 540));
    let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
    assert!(
        dark > 500,
        "axis labels and text are drawn ({dark} dark pixels)"
    );
}

#[test]
fn plot_errors_name_the_run_and_the_keys_it_has() {
    let run = curves_dir().join("baseline-s1");
    let o = plot(&[
        run.to_str().unwrap(),
        "--metric",
        "itm_accc",
        "--out",
        "x.svg",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("baseline-s1 has no metric `itm_accc`"),
        "{err}"
    );
    assert!(err.contains("itm_acc, itm_acc_hard_negative"), "{err}");
    assert!(err.contains("matching.itm_acc"), "{err}");

    let o = plot(&["no/such/run", "--metric", "loss", "--out", "x.svg"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no/such/run does not exist"));
}
