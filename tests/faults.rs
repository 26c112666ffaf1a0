//! The fault suite for training: diverging and non-finite steps, damaged
//! and half-written checkpoints, kill -9 and SIGTERM at random moments.
//! Every run is the micro model on the built-in data through the real
//! binary, so exit statuses and messages are what a user sees.

mod common;
use common::*;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use tch::Tensor;

const STEPS: i64 = 12;

fn command(args: &[String], env: &[(&str, String)]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vlmatch"));
    c.args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    c
}

/// `vlmatch train` on the micro config into `dir`, plus `sets`.
fn train_args(dir: &Path, sets: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "train",
        "--quiet",
        "--config",
        "tests/fixtures/micro.toml",
        "--set",
        "eval.at_end=false",
        "--set",
        "train.keep_checkpoints=20",
        "--run-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(dir.display().to_string());
    for s in sets {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

fn resume_args(dir: &Path) -> Vec<String> {
    vec![
        "train".into(),
        "--quiet".into(),
        "--resume".into(),
        dir.display().to_string(),
    ]
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn no_backtrace(o: &Output) {
    let e = stderr(o);
    assert!(
        !e.contains("panicked") && !e.contains("stack backtrace"),
        "{e}"
    );
}

/// Each logged step's values without the wall time.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("time_s");
            v
        })
        .collect()
}

fn checkpoint_path(dir: &Path, step: i64) -> PathBuf {
    dir.join(format!("checkpoints/step-{step:08}.safetensors"))
}

fn tensors(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path)
        .unwrap()
        .into_iter()
        .collect()
}

fn assert_same_tensors(a: &Path, b: &Path, filter: impl Fn(&str) -> bool) {
    let (a, b) = (tensors(a), tensors(b));
    let names: Vec<&String> = a.keys().filter(|k| filter(k)).collect();
    assert!(!names.is_empty());
    for n in names {
        assert!(a[n].equal(&b[n]), "tensor {n} differs");
    }
}

fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("checkpoints"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.ends_with(".tmp"))
                .collect()
        })
        .unwrap_or_default()
}

fn latest(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("checkpoints/latest")).unwrap()
}

/// The uninterrupted run the interrupted ones must end like (made once per
/// test binary; tests that need it share it).
fn reference() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("faults-reference");
        let o = command(&train_args(&dir, &[]), &[]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        dir
    })
    .clone()
}

/// The run in `dir` ends exactly like the uninterrupted one: every step
/// logged once with the same values, and the same final weights and
/// optimizer state, bit for bit.
fn assert_matches_reference(dir: &Path) {
    let full = reference();
    let (a, b) = (metrics(&full), metrics(dir));
    assert_eq!(b.len(), STEPS as usize, "each step is logged exactly once");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "step {} differs", x["step"]);
    }
    assert_same_tensors(
        &checkpoint_path(&full, STEPS),
        &checkpoint_path(dir, STEPS),
        |_| true,
    );
}

/// A small deterministic generator for the random moments; the seed is
/// printed so that a failure can be replayed.
struct Moments(u64);

impl Moments {
    fn new(name: &str) -> Moments {
        let seed = std::env::var("VLMATCH_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        eprintln!("{name}: VLMATCH_FAULT_SEED={seed}");
        Moments(seed | 1)
    }

    /// Uniform in `0..max_ms` milliseconds.
    fn next(&mut self, max_ms: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(self.0 % max_ms.max(1))
    }
}

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "run did not end in {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Start the run in `dir` (or resume it, once it has a checkpoint).
fn start_or_resume(dir: &Path, env: &[(&str, String)]) -> Child {
    let args = if dir.join("checkpoints/latest").exists() {
        resume_args(dir)
    } else {
        train_args(dir, &[])
    };
    command(&args, env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[test]
fn a_diverging_run_stops_with_the_step_its_losses_and_no_panic() {
    let dir = scratch("faults-diverge");
    let o = command(
        &train_args(&dir, &["train.lr=1e8", "train.grad_clip=0"]),
        &[],
    )
    .output()
    .unwrap();
    no_backtrace(&o);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    let line = e.lines().last().unwrap();
    assert!(line.starts_with("error: step "), "{line}");
    for part in [
        "is not finite",
        "grad_norm = NaN",
        "itc = ",
        "itm = ",
        "mlm = ",
    ] {
        assert!(line.contains(part), "`{part}` missing: {line}");
    }
    assert!(line.contains("train.on_nonfinite"), "{line}");
    assert!(leftovers(&dir).is_empty());
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_nonfinite_step_stops_the_run_and_names_the_last_good_checkpoint() {
    let dir = scratch("faults-nan-stop");
    let o = command(&train_args(&dir, &[]), &[])
        .arg("--fault")
        .arg("0:6:nan")
        .output()
        .unwrap();
    no_backtrace(&o);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let e = stderr(&o);
    assert!(e.contains("step 6 is not finite (loss = NaN"), "{e}");
    let good = checkpoint_path(&dir, 4);
    assert!(
        e.contains(&format!("the last good checkpoint is {}", good.display())),
        "{e}"
    );
    // Nothing after the bad step was saved, and the run resumes from there.
    assert_eq!(latest(&dir), "step-00000004.safetensors");
    assert_eq!(metrics(&dir).len(), 5, "steps 1-5 logged, not the bad one");
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn with_skip_a_nonfinite_step_is_dropped_and_training_goes_on() {
    let dir = scratch("faults-nan-skip");
    let o = command(
        &train_args(
            &dir,
            &["train.on_nonfinite=skip", "train.checkpoint_every=1"],
        ),
        &[],
    )
    .arg("--fault")
    .arg("0:6:nan")
    .output()
    .unwrap();
    no_backtrace(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("skipped 1 non-finite step (6;"),
        "{}",
        stderr(&o)
    );
    let m = metrics(&dir);
    assert_eq!(m.len(), STEPS as usize);
    assert!(m[5]["loss"].is_null(), "step 6's loss: {}", m[5]);
    assert_eq!(m[4]["nonfinite_skipped"], 0);
    assert_eq!(m[5]["nonfinite_skipped"], 1);
    assert_eq!(m[11]["nonfinite_skipped"], 1);
    assert!(m[6]["loss"].as_f64().unwrap().is_finite());
    // Step 6 changed nothing: weights and moments as after step 5, and
    // AdamW counts 5 updates.
    let (five, six) = (checkpoint_path(&dir, 5), checkpoint_path(&dir, 6));
    assert_same_tensors(&five, &six, |n| !n.starts_with("state."));
    assert_eq!(tensors(&six)["optim.t"].int64_value(&[]), 5);
    assert_eq!(
        tensors(&checkpoint_path(&dir, 7))["optim.t"].int64_value(&[]),
        6
    );
}

#[test]
fn with_skip_too_many_nonfinite_steps_in_a_row_stop_the_run() {
    let dir = scratch("faults-skip-limit");
    let o = command(
        &train_args(
            &dir,
            &[
                "train.lr=1e8",
                "train.grad_clip=0",
                "train.on_nonfinite=skip",
                "train.max_skipped=3",
            ],
        ),
        &[],
    )
    .output()
    .unwrap();
    no_backtrace(&o);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("non-finite steps in a row (train.max_skipped = 3)"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one() {
    for (name, damage) in [
        ("truncated", 0usize),
        ("one byte flipped", 1),
        ("missing", 2),
    ] {
        let dir = scratch(&format!("faults-damaged-{damage}"));
        let o = command(&train_args(&dir, &[]), &[]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        let newest = checkpoint_path(&dir, STEPS);
        let bytes = std::fs::read(&newest).unwrap();
        match damage {
            0 => std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap(),
            1 => {
                let mut b = bytes.clone();
                let at = b.len() - 100;
                b[at] ^= 0x40;
                std::fs::write(&newest, b).unwrap();
            }
            _ => std::fs::remove_file(&newest).unwrap(),
        }
        // Steps 9-12 are retrained from the step-8 checkpoint.
        let o = command(&resume_args(&dir), &[]).output().unwrap();
        no_backtrace(&o);
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        let e = stderr(&o);
        assert!(
            e.contains(&format!(
                "the newest checkpoint {} is damaged",
                newest.display()
            )) && e.contains(&format!(
                "resuming from {} instead",
                checkpoint_path(&dir, 8).display()
            )),
            "{name}: {e}"
        );
        assert_matches_reference(&dir);
    }
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_failed_checkpoint_write_names_the_path_and_keeps_the_previous_one() {
    let dir = scratch("faults-write-fail");
    let fault = [("VLMATCH_TEST_CHECKPOINT_FAULT", "8:1000:fail".to_string())];
    let o = command(&train_args(&dir, &[]), &fault).output().unwrap();
    no_backtrace(&o);
    assert_ne!(o.status.code(), Some(0));
    let tmp = dir.join("checkpoints/step-00000008.safetensors.tmp");
    let e = stderr(&o);
    assert!(
        e.contains(&tmp.display().to_string()) && e.contains("write failed after 1000 bytes"),
        "{e}"
    );
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    assert!(!checkpoint_path(&dir, 8).exists());
    assert_eq!(latest(&dir), "step-00000004.safetensors");
    vlmatch::checkpoint::verify(&checkpoint_path(&dir, 4)).unwrap();
    // And the run carries on from there to the same end.
    let o = command(&resume_args(&dir), &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert_matches_reference(&dir);
}

/// kill -9 at random moments, and once inside a checkpoint write (random
/// timing almost never lands there): resumed until done, the run ends bit
/// for bit like an uninterrupted one, every step logged once.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn killed_at_random_moments_and_inside_a_checkpoint_write_the_run_ends_exactly() {
    let full = reference();
    let dir = scratch("faults-crash");
    let mut moments = Moments::new("crash consistency");
    // The first start dies while writing the step-8 checkpoint.
    let abort = [("VLMATCH_TEST_CHECKPOINT_FAULT", "8:777:abort".to_string())];
    let mut child = start_or_resume(&dir, &abort);
    let status = wait_with_timeout(&mut child, Duration::from_secs(120));
    assert_eq!(status.code(), None, "killed by SIGKILL inside the write");
    assert!(dir
        .join("checkpoints/step-00000008.safetensors.tmp")
        .exists());
    assert_eq!(latest(&dir), "step-00000004.safetensors");
    // A full run's duration bounds the random moments.
    let span = std::fs::metadata(full.join("metrics.jsonl"))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|end| {
            std::fs::metadata(full.join("config.toml"))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|start| end.duration_since(start).ok())
        })
        .unwrap_or(Duration::from_secs(1));
    let mut kills = 0;
    for _ in 0..30 {
        let mut child = start_or_resume(&dir, &[]);
        if kills < 4 {
            std::thread::sleep(moments.next(span.as_millis() as u64 + 300));
            let _ = child.kill();
        }
        let status = wait_with_timeout(&mut child, Duration::from_secs(120));
        if status.success() {
            break;
        }
        kills += 1;
    }
    eprintln!("crash consistency: {kills} random kills before the run completed");
    assert!(leftovers(&dir).is_empty(), "{:?}", leftovers(&dir));
    assert_matches_reference(&dir);
}

/// SIGTERM (or SIGINT) at a random moment of training: a checkpoint at the
/// next step boundary, exit status 143 (130), and a resume that ends like
/// an uninterrupted run.
#[test]
fn a_signal_at_a_random_moment_saves_at_the_next_step_and_resumes_exactly() {
    let mut moments = Moments::new("signals");
    for (signal, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = scratch(&format!("faults-signal-{signal}"));
        let mut child = start_or_resume(&dir, &[]);
        // Wait until training logs its first step, then pick a moment.
        let start = Instant::now();
        // (A whole line: the run may be writing it right now.)
        let logged_one =
            || std::fs::read_to_string(dir.join("metrics.jsonl")).is_ok_and(|t| t.contains('\n'));
        while !logged_one() {
            assert!(start.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(moments.next(150));
        // SAFETY: kill(2) on a child we own.
        unsafe {
            libc::kill(child.id() as i32, signal);
        }
        let status = wait_with_timeout(&mut child, Duration::from_secs(120));
        if status.success() {
            // The run finished before the signal arrived: nothing to test
            // at this moment (rare; the run has 12 steps).
            eprintln!("signal {signal} came after the end");
            continue;
        }
        assert_eq!(status.code(), Some(code), "signal {signal}");
        // The checkpoint is at the last logged step (log_every = 1).
        let logged = metrics(&dir).len() as i64;
        assert_eq!(
            latest(&dir),
            format!("step-{logged:08}.safetensors"),
            "signal {signal}"
        );
        let o = command(&resume_args(&dir), &[]).output().unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        assert_matches_reference(&dir);
    }
}

/// A run whose `checkpoints/latest` is gone resumes from its newest intact
/// checkpoint file.
#[test]
fn a_lost_latest_pointer_resumes_from_the_newest_checkpoint_file() {
    let dir = scratch("faults-no-latest");
    let o = command(&train_args(&dir, &["train.steps=8"]), &[])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::remove_file(dir.join("checkpoints/latest")).unwrap();
    let o = command(&resume_args(&dir), &[])
        .arg("--set")
        .arg("train.steps=8")
        .output()
        .unwrap();
    no_backtrace(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(metrics(&dir).len(), 8, "nothing retrained, nothing lost");
}

/// A `latest` naming a checkpoint outside its own directory (another
/// run's, further on) is not followed: `--resume` takes this run's newest
/// checkpoint file, with a warning naming the pointer, and `eval` records
/// the checkpoint it used.
#[test]
fn a_latest_pointer_out_of_its_directory_is_not_followed() {
    let root = scratch("faults-latest-escape");
    let (mine, other) = (root.join("mine"), root.join("other"));
    for (dir, steps) in [(&mine, "train.steps=4"), (&other, "train.steps=12")] {
        let o = command(&train_args(dir, &[steps, "train.checkpoint_every=4"]), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
    }
    std::fs::write(
        mine.join("checkpoints/latest"),
        "../../other/checkpoints/step-00000012.safetensors",
    )
    .unwrap();
    let o = command(&resume_args(&mine), &[])
        .args(["--set", "train.steps=8"])
        .output()
        .unwrap();
    no_backtrace(&o);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("expected a checkpoint file name in this directory"),
        "{}",
        stderr(&o)
    );
    let steps: Vec<i64> = metrics(&mine)
        .iter()
        .map(|m| m["step"].as_i64().unwrap())
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "resumed from its own step 4"
    );
    let o = command(
        &["eval", "--quiet", "--task", "heldout", "--checkpoint"]
            .map(String::from)
            .into_iter()
            .chain([mine.display().to_string()])
            .collect::<Vec<_>>(),
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(mine.join("eval-heldout.json")).unwrap())
            .unwrap();
    assert_eq!(r["step"], 8, "{r}");
    assert!(
        r["checkpoint"]
            .as_str()
            .unwrap()
            .ends_with("mine/checkpoints/step-00000008.safetensors"),
        "{r}"
    );
}

/// A checkpoint whose counter `state.step` holds two numbers (its checksum
/// recomputed, so it reads as intact) is refused by name, not a panic.
#[test]
fn a_checkpoint_counter_that_is_not_one_integer_is_refused_by_name() {
    let dir = scratch("faults-bad-counter");
    let o = command(
        &train_args(&dir, &["train.steps=4", "train.checkpoint_every=4"]),
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let path = checkpoint_path(&dir, 4);
    let mut t: Vec<(String, Tensor)> = tensors(&path).into_iter().collect();
    for (k, v) in t.iter_mut() {
        if k == "state.step" {
            *v = Tensor::from_slice(&[4i64, 4]);
        }
    }
    Tensor::write_safetensors(&t, &path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let crc = {
        let mut h = crc32fast::Hasher::new();
        h.update(&bytes);
        h.finalize()
    };
    std::fs::write(
        dir.join("checkpoints/step-00000004.safetensors.crc32"),
        format!("{crc:08x} {}\n", bytes.len()),
    )
    .unwrap();
    let o = command(&resume_args(&dir), &[])
        .args(["--set", "train.steps=8"])
        .output()
        .unwrap();
    no_backtrace(&o);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("`state.step`: expected one integer") && e.contains("step-00000004"),
        "{e}"
    );
}

/// `vlmatch finetune` of the micro run `pre` for `task` into `out`, 6 steps
/// with a checkpoint every 2, plus `extra` arguments.
fn finetune_args(task: &str, pre: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "finetune",
        "--quiet",
        "--task",
        task,
        "--data",
        "builtin",
        "--steps",
        "6",
        "--lr",
        "1e-3",
        "--batch-size",
        "8",
        "--set",
        "data.synthetic.train_scenes=60",
        "--set",
        "data.synthetic.heldout_scenes=20",
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.keep_checkpoints=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if task != "vqa" {
        a.extend(["--eval-every".into(), "3".into()]);
    }
    a.extend(["--checkpoint".into(), pre.display().to_string()]);
    a.extend(["--out".into(), out.display().to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// A fine-tune of each task killed with SIGKILL after step 5 (its newest
/// checkpoint is step 4) and continued with `--resume` ends with the same
/// weights, optimizer state, best weights and logged values, bit for bit,
/// as the same fine-tune run without interruption.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn killed_finetunes_resume_to_identical_weights() {
    let root = scratch("finetune-kill");
    let pre = root.join("pre");
    let o = command(
        &train_args(&pre, &["train.steps=8", "train.checkpoint_every=8"]),
        &[],
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    for task in ["snli-ve", "nlvr2", "vqa"] {
        let full = root.join(format!("{task}-full"));
        let o = command(&finetune_args(task, &pre, &full, &[]), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "{task}: {}", stderr(&o));
        let cut = root.join(format!("{task}-cut"));
        let o = command(
            &finetune_args(task, &pre, &cut, &["--fault", "0:5:kill"]),
            &[],
        )
        .output()
        .unwrap();
        assert!(!o.status.success(), "{task}: the fault killed it");
        assert!(
            !cut.join("checkpoints/step-00000006.safetensors").exists(),
            "{task}: killed before the end"
        );
        let o = command(&finetune_args(task, &pre, &cut, &["--resume"]), &[])
            .output()
            .unwrap();
        assert!(o.status.success(), "{task}: {}", stderr(&o));
        no_backtrace(&o);
        let (a, b) = (
            tensors(&checkpoint_path(&full, 6)),
            tensors(&checkpoint_path(&cut, 6)),
        );
        assert_eq!(a.len(), b.len(), "{task}");
        for (name, t) in &a {
            assert!(t.equal(&b[name]), "{task}: `{name}` differs after resume");
        }
        assert_eq!(metrics(&full), metrics(&cut), "{task}: logged values");
        assert_eq!(metrics(&full).len(), 6, "{task}");
        if task != "vqa" {
            let read = |d: &Path| std::fs::read_to_string(d.join("validation.jsonl")).unwrap();
            assert_eq!(read(&full), read(&cut), "{task}: validation");
        }
    }
}

/// A run directory has one owner: while one trainer runs in it, a second
/// (`--resume`) stops naming the first's pid; a new run refuses a
/// directory holding another run's checkpoints unless `--force`, which
/// moves them aside and says so.
#[test]
fn a_run_directory_has_one_owner() {
    let dir = scratch("faults-owner");
    let mut first = command(
        &train_args(&dir, &["train.steps=100000", "train.checkpoint_every=1"]),
        &[],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let started = Instant::now();
    while !dir.join("checkpoints/latest").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = command(&resume_args(&dir), &[]).output().unwrap();
    let _ = first.kill();
    let _ = first.wait();
    no_backtrace(&o);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(
        e.contains("in use by another trainer") && e.contains(&format!("pid {}", first.id())),
        "{e}"
    );
    // The first is gone: its lock went with it. A new run there is refused
    // (its checkpoints would mix with the old ones) unless forced.
    let o = command(&train_args(&dir, &["train.steps=2"]), &[])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("--resume") && e.contains("--force"), "{e}");
    let mut forced = train_args(&dir, &["train.steps=2"]);
    forced.push("--force".into());
    let o = command(&forced, &[]).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("checkpoints.old-"), "{}", stderr(&o));
    assert_eq!(latest(&dir), "step-00000002.safetensors");
}
