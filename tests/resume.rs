//! A run killed mid-way and resumed ends exactly like an uninterrupted one.

mod common;
use common::*;

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut()
                .unwrap()
                .remove("time_s")
                .expect("wall time is logged");
            v
        })
        .collect()
}

#[test]
fn killed_and_resumed_run_matches_uninterrupted_run() {
    let root = scratch("resume");
    let full_dir = root.join("full");
    let full = run(&full_dir, &[], None).unwrap();
    assert_eq!(full.last_step, 12);

    // Killed after step 6: the newest checkpoint is step 4, and the metrics
    // of steps 5-6 must be dropped and recomputed on resume.
    let cut_dir = root.join("cut");
    let cut = run(&cut_dir, &[], Some(6)).unwrap();
    assert_eq!(cut.last_step, 6);
    assert!(!cut_dir
        .join("checkpoints")
        .join("step-00000012.safetensors")
        .exists());

    let resumed = resume(&cut_dir).unwrap();
    assert_eq!(resumed.start_step, 4, "resumes from the step-4 checkpoint");
    assert_eq!(resumed.last_step, 12);

    let a = metrics(&full_dir);
    let b = metrics(&cut_dir);
    assert_eq!(a.len(), 12);
    assert_eq!(
        b.len(),
        12,
        "metrics.jsonl holds each step once after resuming"
    );
    for (x, y) in a.iter().zip(&b) {
        // Bit-exact on CPU: every logged value, not just the loss.
        assert_eq!(x, y, "step {} differs after resume", x["step"]);
    }
    // The final weights agree too.
    let wa = tch::Tensor::read_safetensors(full_dir.join("checkpoints/step-00000012.safetensors"))
        .unwrap();
    let wb = tch::Tensor::read_safetensors(cut_dir.join("checkpoints/step-00000012.safetensors"))
        .unwrap();
    assert_eq!(wa.len(), wb.len());
    let wb: std::collections::HashMap<_, _> = wb.into_iter().collect();
    for (name, t) in &wa {
        assert!(t.equal(&wb[name]), "tensor {name} differs after resume");
    }
}

#[test]
fn checkpoints_are_pruned_and_latest_points_at_newest() {
    let dir = scratch("prune");
    run(&dir, &["train.keep_checkpoints=2"], None).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "latest",
            "step-00000008.safetensors",
            "step-00000008.safetensors.crc32",
            "step-00000012.safetensors",
            "step-00000012.safetensors.crc32"
        ]
    );
    let latest = std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap();
    assert_eq!(latest, "step-00000012.safetensors");
    assert!(
        dir.join("config.toml").is_file(),
        "merged config written into the run directory"
    );
}

/// Run directories written by the trainer of 46fa8e6 (before hooks and the
/// named trainer state), killed after their step-4 checkpoint, resume with
/// today's trainer and log exactly what that binary logged uninterrupted:
/// one process, and with momentum distillation (its momentum model, queues
/// and queue pointer under `momentum.*`). The two-rank directory is resumed
/// in `tests/distributed.rs`.
#[test]
fn run_directories_from_46fa8e6_resume_exactly() {
    for name in ["plain", "mod"] {
        let dir = scratch(&format!("resume-46fa8e6-{name}"));
        copy_dir(&fixture(&format!("runs-46fa8e6/{name}")), &dir);
        let resumed = resume(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!((resumed.start_step, resumed.last_step), (4, 8), "{name}");
        let want = jsonl_without_time(&dir.join("uninterrupted-metrics.jsonl"));
        let got = jsonl_without_time(&dir.join("metrics.jsonl"));
        assert_eq!(got.len(), 8, "{name}");
        assert_eq!(got, want, "{name}: resumed run differs from 46fa8e6's");
    }
}
