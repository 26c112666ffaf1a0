//! Data-parallel training and evaluation: several `vlmatch` processes on
//! loopback (Gloo over a TCPStore rendezvous), started the way `torchrun`
//! starts them (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`,
//! `MASTER_PORT`), and by `torchrun` itself.
//!
//! Every launch has a hard deadline after which the test kills its
//! processes and fails, so a hang is a failure, never a stuck CI job.

mod common;
use common::*;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tch::Tensor;
use vlmatch::data::loader::{Loader, LoaderConfig, Source};
use vlmatch::data::webdataset::Shards;
use vlmatch::tokenizer::Tokenizer;
use vlmatch_core::Batch;

const BIN: &str = env!("CARGO_BIN_EXE_vlmatch");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A port nobody listens on right now (the OS picks it).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Launcher variables that must not leak into a child from the test's own
/// environment.
const LAUNCH_VARS: &[&str] = &[
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "SLURM_STEPID",
    "TORCHELASTIC_USE_AGENT_STORE",
];

/// Processes of one launch; killed when dropped (a failed assertion, a
/// deadline), so none outlives its test.
struct Launch {
    name: String,
    procs: Vec<(usize, Child)>,
    logs: PathBuf,
    started: Instant,
}

/// How one process ended.
#[derive(Debug)]
struct Ended {
    status: ExitStatus,
    /// Seconds after the launch started.
    at: f64,
    stdout: String,
    stderr: String,
}

impl Drop for Launch {
    fn drop(&mut self) {
        for (_, c) in &mut self.procs {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `vlmatch` binary with `args` run from the repository root, output to
/// files under `logs` named after `name` and the rank.
fn command(args: &[String], logs: &Path, name: &str, rank: usize) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args).current_dir(repo());
    for v in LAUNCH_VARS {
        cmd.env_remove(v);
    }
    let out = std::fs::File::create(logs.join(format!("{name}.rank{rank}.out"))).unwrap();
    let err = std::fs::File::create(logs.join(format!("{name}.rank{rank}.err"))).unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    cmd
}

/// `vlmatch ARGS` as `world` ranks on loopback (one plain process when
/// `world` is 1), as torchrun would start them.
fn launch(name: &str, world: usize, args: &[String], logs: &Path) -> Launch {
    launch_with(name, world, args, logs, &[])
}

/// [`launch`] with `env` set for every rank.
fn launch_with(
    name: &str,
    world: usize,
    args: &[String],
    logs: &Path,
    env: &[(&str, &str)],
) -> Launch {
    let port = free_port();
    let procs = (0..world)
        .map(|rank| {
            let mut cmd = command(args, logs, name, rank);
            cmd.envs(env.iter().copied());
            if world > 1 {
                cmd.env("RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("LOCAL_WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", port.to_string());
            }
            (rank, cmd.spawn().expect("start vlmatch"))
        })
        .collect();
    Launch {
        name: name.to_string(),
        procs,
        logs: logs.to_path_buf(),
        started: Instant::now(),
    }
}

impl Launch {
    fn read(&self, rank: usize, ext: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{}.rank{rank}.{ext}", self.name)))
            .unwrap_or_default()
    }

    /// Every process's output, for failure messages.
    fn report(&self) -> String {
        (0..self.procs.len())
            .map(|r| {
                let err = self.read(r, "err");
                let tail: Vec<&str> = err.lines().rev().take(25).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!(
                    "--- {} rank {r} stderr (tail):\n{}",
                    self.name,
                    tail.join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits for the processes `ranks` to exit, at most `limit` after the
    /// launch started; past it, kills every process and fails.
    fn wait_for(&mut self, ranks: &[usize], limit: Duration) -> HashMap<usize, Ended> {
        let mut ended = HashMap::new();
        loop {
            for (rank, child) in &mut self.procs {
                if ended.contains_key(rank) || !ranks.contains(rank) {
                    continue;
                }
                if let Some(status) = child.try_wait().unwrap() {
                    ended.insert(
                        *rank,
                        Ended {
                            status,
                            at: self.started.elapsed().as_secs_f64(),
                            stdout: String::new(),
                            stderr: String::new(),
                        },
                    );
                }
            }
            if ended.len() == ranks.len() {
                break;
            }
            if self.started.elapsed() > limit {
                for (_, c) in &mut self.procs {
                    let _ = c.kill();
                }
                panic!(
                    "{}: ranks {ranks:?} still running after {limit:?}; killed\n{}",
                    self.name,
                    self.report()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for (rank, e) in &mut ended {
            e.stdout = self.read(*rank, "out");
            e.stderr = self.read(*rank, "err");
        }
        ended
    }

    /// Waits for every process and requires each to succeed.
    fn succeed(mut self, limit: Duration) -> Vec<Ended> {
        let all: Vec<usize> = (0..self.procs.len()).collect();
        let mut ended = self.wait_for(&all, limit);
        if let Some((r, e)) = ended.iter().find(|(_, e)| !e.status.success()) {
            panic!(
                "{}: rank {r} failed ({})\n{}",
                self.name,
                e.status,
                self.report()
            );
        }
        all.iter().map(|r| ended.remove(r).unwrap()).collect()
    }
}

/// `train` arguments for the micro model with `preset` (a config file
/// layered over it, or none) and `sets`.
fn train_args(run_dir: &Path, preset: Option<&str>, sets: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = ["train", "--quiet", "--preset", "tiny", "--config"]
        .map(String::from)
        .to_vec();
    a.push(fixture("micro.toml").display().to_string());
    if let Some(p) = preset {
        a.push("--config".into());
        a.push(repo().join(p).display().to_string());
    }
    a.push("--run-dir".into());
    a.push(run_dir.display().to_string());
    for s in ["eval.at_end=false"].iter().chain(sets) {
        a.push("--set".into());
        a.push(s.to_string());
    }
    a
}

/// metrics.jsonl without the wall time.
fn metrics(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    jsonl_without_time(&dir.join("metrics.jsonl"))
}

fn checkpoint(dir: &Path, step: i64) -> HashMap<String, Tensor> {
    let path = dir.join(format!("checkpoints/step-{step:08}.safetensors"));
    Tensor::read_safetensors(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

/// Relative differences between two runs' model and optimizer tensors
/// (per tensor: max |a - b| / max |a|), largest first, with the tensor.
fn weight_differences(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
) -> Vec<(f64, String)> {
    let mut out = Vec::new();
    for (name, x) in a {
        if !(name.starts_with("model.") || name.starts_with("optim.")) || name == "optim.t" {
            continue;
        }
        let y = b
            .get(name)
            .unwrap_or_else(|| panic!("tensor {name} missing"));
        assert_eq!(x.size(), y.size(), "{name}");
        let (x, y) = (x.to_kind(tch::Kind::Double), y.to_kind(tch::Kind::Double));
        let scale = x.abs().max().double_value(&[]).max(1e-12);
        out.push((
            (&x - &y).abs().max().double_value(&[]) / scale,
            name.clone(),
        ));
    }
    out.sort_by(|p, q| q.0.total_cmp(&p.0));
    out
}

/// Whether two runs' final weights are the same, as far as floating point
/// lets them be: `a` is the reference (one process).
///
/// - The relative L2 distance of all model weights, `|a - b| / |a|`, is at
///   most `rel`. Single elements are no measure: AdamW divides each
///   gradient element by its own running magnitude, so an element whose
///   exact gradient is 0 (every attention key bias: softmax ignores a shift
///   shared by all keys) or nearly 0 moves by up to the learning rate in a
///   direction set by rounding, in either run.
/// - A parameter the reference never updated (its AdamW second moment is
///   all zero: no objective reached it) is bit-identical in `b`.
///
/// Returns what to report, or why they differ.
fn same_weights(
    a: &HashMap<String, Tensor>,
    b: &HashMap<String, Tensor>,
    rel: f64,
) -> Result<String, String> {
    let (mut diff2, mut norm2) = (0.0, 0.0);
    let mut untouched_moved = Vec::new();
    for (name, x) in a {
        let Some(param) = name.strip_prefix("model.") else {
            continue;
        };
        let y = b
            .get(name)
            .ok_or_else(|| format!("tensor {name} missing"))?;
        let (xd, yd) = (x.to_kind(tch::Kind::Double), y.to_kind(tch::Kind::Double));
        diff2 += (&xd - &yd)
            .square()
            .sum(tch::Kind::Double)
            .double_value(&[]);
        norm2 += xd.square().sum(tch::Kind::Double).double_value(&[]);
        let untouched = a
            .get(&format!("optim.v.{param}"))
            .is_some_and(|v| v.abs().max().double_value(&[]) == 0.0);
        if untouched && !x.equal(y) {
            untouched_moved.push(param.to_string());
        }
    }
    let global = (diff2 / norm2.max(1e-300)).sqrt();
    let worst: Vec<String> = weight_differences(a, b)
        .iter()
        .take(3)
        .map(|(d, t)| format!("{d:.2e} in {t}"))
        .collect();
    let report = format!(
        "weights differ by {global:.2e} (relative L2 over the model); elementwise most: {}",
        worst.join(", ")
    );
    if !untouched_moved.is_empty() {
        return Err(format!(
            "parameters the reference never updated changed: {} ({report})",
            untouched_moved.join(", ")
        ));
    }
    if global > rel {
        return Err(format!("{report}: above {rel:e}"));
    }
    Ok(report)
}

/// The largest relative difference between two metrics.jsonl logs in
/// `keys` (every key when empty), with where it is; the logs must have the
/// same steps and keys.
fn log_difference(
    a: &[serde_json::Map<String, serde_json::Value>],
    b: &[serde_json::Map<String, serde_json::Value>],
    keys: &[&str],
) -> (f64, String) {
    assert_eq!(a.len(), b.len(), "logged steps");
    let mut worst = (0.0f64, String::from("nothing"));
    for (x, y) in a.iter().zip(b) {
        let mut kx: Vec<_> = x.keys().collect();
        let mut ky: Vec<_> = y.keys().collect();
        kx.sort();
        ky.sort();
        assert_eq!(kx, ky, "logged keys at step {}", x["step"]);
        for (k, v) in x {
            if !keys.is_empty() && !keys.contains(&k.as_str()) {
                continue;
            }
            let (p, q) = (v.as_f64().unwrap(), y[k].as_f64().unwrap());
            let d = (p - q).abs() / p.abs().max(1e-6);
            if d > worst.0 {
                worst = (d, format!("`{k}` at step {}: {p} vs {q}", x["step"]));
            }
        }
    }
    worst
}

/// 2 ranks x 8 pairs train as 1 process x 16: the same losses and gradient
/// norms at every step (the first step's from the same weights; a gradient
/// norm equal to 1e-5 says the averaged gradients are), and the same
/// weights after 4 steps ([`same_weights`]), for the baseline and the full
/// VL-Match objectives (global ITC, global hard negatives, MLM, VL-RTD and
/// FG-ITM keyed by the global sample), for the baseline with gradient
/// accumulation, and for the baseline with momentum distillation. Metrics that are ratios (accuracies) are means of the
/// ranks' ratios: reported, not compared.
#[test]
fn two_ranks_train_as_one_process_with_the_global_batch() {
    let root = scratch("dist-equivalence");
    let mut failures = Vec::new();
    let baseline = &["loss", "itc", "itm", "mlm", "grad_norm", "lr"][..];
    let vlmatch = &[
        "loss",
        "itc",
        "fgitm",
        "rtd",
        "rtd_disc",
        "gen",
        "grad_norm",
        "lr",
    ][..];
    // The third case accumulates 2 micro-batches per step: the first
    // backward must not reduce gradients, the second reduces their sum.
    for (name, preset, accum, losses) in [
        ("baseline", "configs/baseline.toml", 1, baseline),
        ("vlmatch", "configs/vlmatch.toml", 1, vlmatch),
        ("baseline-accum2", "configs/baseline.toml", 2, baseline),
        // Momentum distillation: momentum features gathered from every
        // rank, queued alike on each (the queue of 960 takes 16s).
        ("baseline-mod", "configs/mod.toml", 1, baseline),
    ] {
        let accum = format!("train.accum_steps={accum}");
        let sets = [
            "train.steps=4",
            "train.checkpoint_every=0",
            "train.dist.timeout=60",
            &accum,
        ];
        let one_dir = root.join(format!("{name}-1x16"));
        let two_dir = root.join(format!("{name}-2x8"));
        let mut one_args = train_args(&one_dir, Some(preset), &sets);
        one_args.extend(["--set".into(), "train.batch_size=16".into()]);
        let mut two_args = train_args(&two_dir, Some(preset), &sets);
        two_args.extend(["--set".into(), "train.batch_size=8".into()]);
        let one = launch(&format!("{name}-1x16"), 1, &one_args, &root);
        let two = launch(&format!("{name}-2x8"), 2, &two_args, &root);
        two.succeed(Duration::from_secs(240));
        one.succeed(Duration::from_secs(240));

        let (m1, m2) = (metrics(&one_dir), metrics(&two_dir));
        assert_eq!(m1.len(), 4, "{name}: one line per step");
        let first = log_difference(&m1[..1], &m2[..1], losses);
        let all = log_difference(&m1, &m2, losses);
        let other = log_difference(&m1, &m2, &[]);
        let weights = same_weights(&checkpoint(&one_dir, 4), &checkpoint(&two_dir, 4), 1e-5);
        eprintln!(
            "{name}, 1x16 vs 2x8: losses at step 1 differ by {:.2e} ({}); over 4 steps by \
             {:.2e} ({}); any logged value by {:.2e} ({}); after 4 steps {}",
            first.0,
            first.1,
            all.0,
            all.1,
            other.0,
            other.1,
            match &weights {
                Ok(r) | Err(r) => r,
            }
        );
        if all.0 > 1e-5 {
            failures.push(format!(
                "{name}: losses differ by {:.3e} (relative) at {}, above 1e-5",
                all.0, all.1
            ));
        }
        if let Err(e) = weights {
            failures.push(format!("{name}: after 4 steps {e}"));
        }
        if name == "baseline-mod" {
            // The momentum model and the queues (features, keys, pointer)
            // agree too: keys exactly, floats to rounding.
            let (a, b) = (checkpoint(&one_dir, 4), checkpoint(&two_dir, 4));
            let saved: Vec<_> = a
                .iter()
                .filter(|(k, _)| k.starts_with("momentum."))
                .collect();
            assert!(saved.len() > 10, "momentum tensors in the checkpoint");
            for (k, x) in saved {
                let y = &b[k];
                let same = match x.kind() {
                    tch::Kind::Float => (x - y).abs().max().double_value(&[]) <= 1e-5,
                    _ => x.equal(y),
                };
                if !same {
                    failures.push(format!("{name}: `{k}` differs between 1x16 and 2x8"));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The loader contract: with 2 ranks each global batch (drawn as one
/// process drawing 16) is split into rank 0's first 8 rows and rank 1's
/// last 8, with the rows' global positions as sample keys; for in-memory
/// pairs and for a shard stream, from the start and from a resumed batch.
#[test]
fn ranks_load_disjoint_parts_of_the_global_batch() {
    let loaded = micro_layers(&[]).load().unwrap();
    let tok = Arc::new(Tokenizer::builtin());
    let (train, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let train = Arc::new(train);
    let shards = write_shards(&scratch("dist-shards"), 24);
    let sources = |_: ()| {
        [
            ("pairs", Source::Pairs(train.clone())),
            (
                "shards",
                Source::Shards(Shards::resolve(&shards, "test", 7).unwrap()),
            ),
        ]
    };
    let cfg = |b: usize| LoaderConfig::new(&loaded.config.data, b, Some(5));
    for start in [0u64, 13] {
        let whole = sources(());
        let part0 = sources(());
        let part1 = sources(());
        for (((what, w), (_, p0)), (_, p1)) in whole.into_iter().zip(part0).zip(part1) {
            let mut w = Loader::from_source(w, tok.clone(), cfg(16), start).unwrap();
            let mut p0 = Loader::from_source(p0, tok.clone(), cfg(8).shard(0, 2), start).unwrap();
            let mut p1 = Loader::from_source(p1, tok.clone(), cfg(8).shard(1, 2), start).unwrap();
            for g in start..start + 3 {
                let (w, a, b) = (
                    w.next_batch().unwrap(),
                    p0.next_batch().unwrap(),
                    p1.next_batch().unwrap(),
                );
                let rows = |b: &Batch, r: std::ops::Range<i64>| {
                    (
                        b.captions[r.start as usize..r.end as usize].to_vec(),
                        b.images.narrow(0, r.start, r.end - r.start),
                        b.sample_keys.narrow(0, r.start, r.end - r.start),
                    )
                };
                for (part, rows_of_whole) in [(&a, 0..8), (&b, 8..16)] {
                    let (caps, images, keys) = rows(&w, rows_of_whole.clone());
                    assert_eq!(
                        part.captions, caps,
                        "{what}: batch {g}, rows {rows_of_whole:?}"
                    );
                    assert!(part.images.equal(&images), "{what}: batch {g} images");
                    assert!(part.sample_keys.equal(&keys), "{what}: batch {g} keys");
                }
                let expect = Tensor::arange_start(
                    g as i64 * 16,
                    g as i64 * 16 + 16,
                    (tch::Kind::Int64, tch::Device::Cpu),
                );
                assert!(
                    w.sample_keys.equal(&expect),
                    "{what}: batch {g} global keys"
                );
            }
        }
    }
}

/// 3 shards of `per_shard` synthetic scenes (a PNG and a caption each);
/// returns their brace pattern.
fn write_shards(dir: &Path, per_shard: usize) -> String {
    let scenes = vlmatch::data::Dataset::synthetic("scenes", 3, 0, 3 * per_shard, 1);
    for shard in 0..3 {
        let mut tar = Vec::new();
        for i in 0..per_shard {
            let s = shard * per_shard + i;
            let mut png = std::io::Cursor::new(Vec::new());
            image::RgbImage::from_raw(16, 16, scenes.load_rgb(s, 16).unwrap())
                .unwrap()
                .write_to(&mut png, image::ImageFormat::Png)
                .unwrap();
            tar_entry(&mut tar, &format!("{s:06}.png"), &png.into_inner());
            let caption = &scenes.pairs.iter().find(|p| p.image == s).unwrap().caption;
            tar_entry(&mut tar, &format!("{s:06}.txt"), caption.as_bytes());
        }
        tar_end(&mut tar);
        std::fs::write(dir.join(format!("train-{shard}.tar")), tar).unwrap();
    }
    format!("{}/train-{{0..2}}.tar", dir.display())
}

/// A rank killed mid-run makes the other stop, non-zero, with a message
/// naming it, well within the test's 30 s; the run then resumes from its
/// last checkpoint with 2 ranks and ends exactly as an uninterrupted 2-rank
/// run.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_killed_rank_stops_the_other_and_the_run_resumes() {
    let root = scratch("dist-kill");
    let sets = [
        "train.steps=12",
        "train.checkpoint_every=4",
        "train.dist.timeout=5",
    ];
    let full_dir = root.join("full");
    let full = launch("full", 2, &train_args(&full_dir, None, &sets), &root);

    let cut_dir = root.join("cut");
    let mut args = train_args(&cut_dir, None, &sets);
    args.extend(["--fault".into(), "1:6:kill".into()]);
    let mut cut = launch("cut", 2, &args, &root);
    let ended = cut.wait_for(&[0, 1], Duration::from_secs(90));
    let (r0, r1) = (&ended[&0], &ended[&1]);
    assert!(
        !r1.status.success(),
        "rank 1 was to kill itself: {:?}",
        r1.status
    );
    assert!(
        !r0.status.success(),
        "rank 0 must fail when rank 1 dies\n{}",
        cut.report()
    );
    let stopped_after = r0.at - r1.at;
    eprintln!("rank 0 stopped {stopped_after:.1} s after rank 1 died");
    assert!(
        stopped_after < 30.0,
        "rank 0 took {stopped_after:.1} s to stop"
    );
    assert!(
        r0.stderr.contains("error:") && r0.stderr.contains("rank 1"),
        "rank 0's error names rank 1:\n{}",
        r0.stderr
    );
    assert_eq!(
        std::fs::read_to_string(cut_dir.join("checkpoints/latest")).unwrap(),
        "step-00000004.safetensors"
    );

    let resumed = launch(
        "resumed",
        2,
        &[
            "train".into(),
            "--quiet".into(),
            "--resume".into(),
            cut_dir.display().to_string(),
            "--set".into(),
            "train.dist.timeout=30".into(),
        ],
        &root,
    );
    resumed.succeed(Duration::from_secs(240));
    full.succeed(Duration::from_secs(240));
    let (a, b) = (metrics(&full_dir), metrics(&cut_dir));
    assert_eq!(b.len(), 12, "each step logged once after resuming");
    // Bit-exact on CPU: every logged value.
    assert_eq!(a, b, "2 ranks resumed vs uninterrupted");
    let (a, b) = (checkpoint(&full_dir, 12), checkpoint(&cut_dir, 12));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "tensor {name} differs after resuming");
    }
}

/// Rank 0 serves the rendezvous store; when it dies the others cannot read
/// its heartbeat, and say so.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_killed_rank_0_stops_the_other_and_is_named() {
    let root = scratch("dist-kill0");
    let mut args = train_args(
        &root.join("run"),
        None,
        &["train.steps=12", "train.dist.timeout=5"],
    );
    args.extend(["--fault".into(), "0:3:kill".into()]);
    let mut cut = launch("cut", 2, &args, &root);
    let ended = cut.wait_for(&[0, 1], Duration::from_secs(90));
    let (r0, r1) = (&ended[&0], &ended[&1]);
    assert!(
        !r0.status.success() && !r1.status.success(),
        "{}",
        cut.report()
    );
    let stopped_after = r1.at - r0.at;
    eprintln!("rank 1 stopped {stopped_after:.1} s after rank 0 died");
    assert!(
        stopped_after < 30.0,
        "rank 1 took {stopped_after:.1} s to stop"
    );
    assert!(
        r1.stderr.contains("error:") && r1.stderr.contains("rank 0 has probably exited"),
        "rank 1's error names rank 0:\n{}",
        r1.stderr
    );
}

/// GradCache on two ranks: ITC over 2 ranks x 4 micro-batches of 2
/// (`train.contrastive_accum = "cached"`) contrasts the whole global batch
/// of 16, as one process with a batch of 16 does.
#[test]
fn cached_contrastive_accumulation_on_two_ranks_equals_one_batch() {
    let root = scratch("dist-grad-cache");
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
        "objectives.itm.enabled=false",
        "objectives.mlm.enabled=false",
    ];
    let one_dir = root.join("one");
    let two_dir = root.join("two");
    let mut one_args = train_args(&one_dir, None, &sets);
    one_args.extend(["--set".into(), "train.batch_size=16".into()]);
    let mut two_args = train_args(&two_dir, None, &sets);
    for s in [
        "train.batch_size=2",
        "train.accum_steps=4",
        "train.contrastive_accum=\"cached\"",
    ] {
        two_args.extend(["--set".into(), s.into()]);
    }
    let one = launch("grad-cache-1x16", 1, &one_args, &root);
    let two = launch("grad-cache-2x4x2", 2, &two_args, &root);
    two.succeed(Duration::from_secs(240));
    one.succeed(Duration::from_secs(240));
    let (m1, m2) = (metrics(&one_dir), metrics(&two_dir));
    assert_eq!(m1.len(), 3);
    assert_eq!(m2.len(), 3);
    for (a, b) in m1.iter().zip(&m2) {
        for key in ["itc", "loss", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * x.abs().max(1e-6),
                "step {}: {key} {x} on one process vs {y} cached on two ranks",
                a["step"]
            );
        }
    }
}

/// Rank 0 alone writes checkpoints; when that write fails (a full disk),
/// the other rank does not sit out `train.dist.timeout` or
/// `train.dist.io_timeout`: it stops at once, with rank 0's reason.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_failed_save_on_rank_0_stops_every_rank_with_its_reason() {
    let root = scratch("dist-save-fails");
    let args = train_args(
        &root.join("run"),
        None,
        &[
            "train.steps=12",
            "train.checkpoint_every=4",
            "train.dist.timeout=60",
            "train.dist.io_timeout=600",
        ],
    );
    let fault = [("VLMATCH_TEST_CHECKPOINT_FAULT", "8:1000:fail")];
    let mut run = launch_with("save-fails", 2, &args, &root, &fault);
    let ended = run.wait_for(&[0, 1], Duration::from_secs(120));
    let (r0, r1) = (&ended[&0], &ended[&1]);
    assert!(
        !r0.status.success() && !r1.status.success(),
        "{}",
        run.report()
    );
    let apart = (r1.at - r0.at).abs();
    eprintln!("the ranks stopped {apart:.1} s apart");
    assert!(apart < 10.0, "rank 1 took {apart:.1} s longer than rank 0");
    assert!(
        r0.stderr.contains("step-00000008"),
        "rank 0 names the file it could not write:\n{}",
        r0.stderr
    );
    assert!(
        r1.stderr
            .contains("rank 0 failed to write the checkpoint of step 8")
            && r1.stderr.contains("step-00000008"),
        "rank 1 names rank 0 and its reason:\n{}",
        r1.stderr
    );
    assert_eq!(
        std::fs::read_to_string(root.join("run/checkpoints/latest")).unwrap(),
        "step-00000004.safetensors",
        "the previous checkpoint stays the latest"
    );
}

/// A rank that hangs (alive, but stuck in its step) stops the other within
/// `train.dist.timeout`, with an error that names it.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn a_hung_rank_stops_the_other_within_the_timeout() {
    let root = scratch("dist-hang");
    let mut args = train_args(
        &root.join("run"),
        None,
        &["train.steps=12", "train.dist.timeout=4"],
    );
    args.extend(["--fault".into(), "1:3:hang".into()]);
    let mut hung = launch("hang", 2, &args, &root);
    let ended = hung.wait_for(&[0], Duration::from_secs(90));
    let r0 = &ended[&0];
    assert!(!r0.status.success(), "{}", hung.report());
    assert!(
        r0.stderr.contains("error:") && r0.stderr.contains("rank 1"),
        "rank 0's error names rank 1:\n{}",
        r0.stderr
    );
    eprintln!(
        "rank 0 stopped at {:.1} s: {}",
        r0.at,
        r0.stderr.lines().last().unwrap_or("")
    );
    // Rank 1 is still stuck; dropping the launch kills it.
}

/// A run of 2 ranks x 8 resumes on 1 process only with the same global
/// batch: with train.batch_size 8 it stops and says what to set; with 16 it
/// continues, to the weights of the 2-rank run.
#[test]
fn resuming_with_another_rank_count_keeps_the_global_batch() {
    let root = scratch("dist-regroup");
    let sets = [
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.dist.timeout=30",
    ];
    let full_dir = root.join("full");
    launch("full", 2, &train_args(&full_dir, None, &sets), &root).succeed(Duration::from_secs(240));
    // The run as a kill after step 4 would have left it.
    let cut_dir = root.join("cut");
    std::fs::create_dir_all(cut_dir.join("checkpoints")).unwrap();
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/step-00000004.safetensors",
    ] {
        std::fs::copy(full_dir.join(f), cut_dir.join(f)).unwrap();
    }
    std::fs::write(
        cut_dir.join("checkpoints/latest"),
        "step-00000004.safetensors",
    )
    .unwrap();

    let resume = |batch: usize| -> Vec<String> {
        [
            "train",
            "--quiet",
            "--resume",
            &cut_dir.display().to_string(),
            "--set",
            &format!("train.batch_size={batch}"),
        ]
        .map(String::from)
        .to_vec()
    };
    let mut wrong = launch("wrong", 1, &resume(8), &root);
    let e = wrong
        .wait_for(&[0], Duration::from_secs(120))
        .remove(&0)
        .unwrap();
    assert!(!e.status.success());
    assert!(
        e.stderr
            .contains("this run used 2 ranks x train.batch_size 8 = global batch 16")
            && e.stderr
                .contains("with 1 rank set --set train.batch_size=16"),
        "{}",
        e.stderr
    );
    launch("right", 1, &resume(16), &root).succeed(Duration::from_secs(240));
    let same = same_weights(&checkpoint(&full_dir, 8), &checkpoint(&cut_dir, 8), 1e-5);
    eprintln!("2 x 8 resumed as 1 x 16 vs 2 x 8: {same:?}");
    same.unwrap();
}

/// With momentum distillation, a 2-rank run killed after its step-4
/// checkpoint and resumed on 2 ranks ends bit-identical to the
/// uninterrupted one: rank 0 reads the momentum model, the queues and the
/// queue pointer and rank 1 receives them.
#[test]
fn a_resumed_two_rank_mod_run_matches_the_uninterrupted_one() {
    let root = scratch("dist-mod-resume");
    let sets = [
        "train.steps=8",
        "train.checkpoint_every=4",
        "train.dist.timeout=30",
        "momentum.queue_size=32",
    ];
    let full_dir = root.join("full");
    launch(
        "mod-full",
        2,
        &train_args(&full_dir, Some("configs/mod.toml"), &sets),
        &root,
    )
    .succeed(Duration::from_secs(240));
    let cut_dir = root.join("cut");
    std::fs::create_dir_all(cut_dir.join("checkpoints")).unwrap();
    for f in [
        "config.toml",
        "metrics.jsonl",
        "checkpoints/step-00000004.safetensors",
    ] {
        std::fs::copy(full_dir.join(f), cut_dir.join(f)).unwrap();
    }
    std::fs::write(
        cut_dir.join("checkpoints/latest"),
        "step-00000004.safetensors",
    )
    .unwrap();
    let resume: Vec<String> = [
        "train",
        "--quiet",
        "--resume",
        &cut_dir.display().to_string(),
    ]
    .map(String::from)
    .to_vec();
    launch("mod-resumed", 2, &resume, &root).succeed(Duration::from_secs(240));
    let (a, b) = (checkpoint(&full_dir, 8), checkpoint(&cut_dir, 8));
    assert!(a.keys().any(|k| k.starts_with("momentum.queue.")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        assert!(t.equal(&b[name]), "{name} differs after resume");
    }
    assert_eq!(metrics(&full_dir), metrics(&cut_dir));
}

/// `vlmatch eval --task retrieval` as 2 ranks shares the ITM re-ranking and
/// reports the recalls of 1 process.
#[test]
fn retrieval_eval_on_two_ranks_gives_the_recalls_of_one() {
    let root = scratch("dist-eval");
    let run_dir = root.join("run");
    run(&run_dir, &["train.steps=4", "eval.at_end=false"], None).unwrap();
    let data = root.join("heldout");
    let preview = Command::new(BIN)
        .current_dir(repo())
        .args(["preview", "--preset", "tiny", "--config"])
        .arg(fixture("micro.toml"))
        .args(["--split", "heldout", "--all", "--out"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(preview.status.success(), "{preview:?}");
    let args: Vec<String> = [
        "eval",
        "--quiet",
        "--task",
        "retrieval",
        "--checkpoint",
        &run_dir.display().to_string(),
        "--data",
        &data.join("annotations.jsonl").display().to_string(),
        "--image-root",
        &data.display().to_string(),
        "--set",
        "eval.k=5",
        "--set",
        "eval.batch_size=7",
    ]
    .map(String::from)
    .to_vec();
    let last_json = |e: &Ended| -> serde_json::Value {
        serde_json::from_str(e.stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|err| panic!("{err}: {}\n{}", e.stdout, e.stderr))
    };
    let one = launch("eval-1", 1, &args, &root).succeed(Duration::from_secs(120));
    let two = launch("eval-2", 2, &args, &root).succeed(Duration::from_secs(120));
    let (a, b) = (last_json(&one[0]), last_json(&two[0]));
    assert_eq!(a["captions"].as_u64(), Some(48), "{a}");
    assert!(a["fused_pairs"].as_u64().unwrap() <= a["naive_pairs"].as_u64().unwrap());
    assert!(a["seconds"].as_f64().unwrap() > 0.0 && a["pairs_per_s"].as_f64().unwrap() > 0.0);
    // Everything but the wall time is the same.
    let untimed = |v: &serde_json::Value| {
        let mut v = v.clone();
        let o = v.as_object_mut().unwrap();
        o.remove("seconds");
        o.remove("pairs_per_s");
        v
    };
    assert_eq!(untimed(&a), untimed(&b), "recalls of 1 process vs 2 ranks");
    assert!(two[1].stdout.trim().is_empty(), "rank 1 prints nothing");
    let written: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(run_dir.join("eval-retrieval.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(untimed(&written), untimed(&a));
}

/// `torchrun --nproc-per-node 2 --no-python vlmatch train ...` (the venv's
/// `python -m torch.distributed.run`) trains the tiny preset's objectives on
/// the micro model to the weights of one process with the doubled batch.
/// Needs BENCH_REFERENCE_PYTHON (`cargo xtask test` sets it).
#[test]
fn torchrun_launches_two_ranks() {
    let Some(python) = std::env::var_os("BENCH_REFERENCE_PYTHON") else {
        eprintln!("skipped: BENCH_REFERENCE_PYTHON is not set (cargo xtask test sets it)");
        return;
    };
    let root = scratch("dist-torchrun");
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
    ];
    let one_dir = root.join("one");
    let mut one_args = train_args(&one_dir, None, &sets);
    one_args.extend(["--set".into(), "train.batch_size=16".into()]);
    let one = launch("one", 1, &one_args, &root);

    let two_dir = root.join("torchrun");
    let port = free_port().to_string();
    let mut cmd = Command::new(&python);
    cmd.args(["-m", "torch.distributed.run", "--nproc-per-node", "2"])
        .args(["--master-addr", "127.0.0.1", "--master-port", &port])
        .args(["--no-python", BIN])
        .args(train_args(&two_dir, None, &sets))
        .args(["--set", "train.batch_size=8"])
        .current_dir(repo());
    for v in LAUNCH_VARS {
        cmd.env_remove(v);
    }
    let out = std::fs::File::create(root.join("torchrun.rank0.out")).unwrap();
    let err = std::fs::File::create(root.join("torchrun.rank0.err")).unwrap();
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    let tr = Launch {
        name: "torchrun".into(),
        procs: vec![(0, cmd.spawn().expect("start torchrun"))],
        logs: root.clone(),
        started: Instant::now(),
    };
    let ended = tr.succeed(Duration::from_secs(240));
    one.succeed(Duration::from_secs(240));
    assert!(
        ended[0].stdout.contains("run directory"),
        "rank 0 reports the run:\n{}",
        ended[0].stdout
    );
    let same = same_weights(&checkpoint(&one_dir, 3), &checkpoint(&two_dir, 3), 1e-5);
    eprintln!("torchrun 2 x 8 vs 1 x 16: {same:?}");
    same.unwrap();
}

/// SIGTERM (what Slurm and Kubernetes send before a kill) on one rank: the
/// ranks agree at the next logging step, rank 0 writes a checkpoint, every
/// rank exits with 143, and resuming ends where an uninterrupted run does.
/// On one process the same, without the agreement.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the fault-injection feature (cargo xtask test enables it)"
)]
fn sigterm_on_one_rank_stops_every_rank_with_a_checkpoint() {
    let root = scratch("dist-term");
    let sets = [
        "train.steps=12",
        "train.checkpoint_every=0",
        "train.dist.timeout=20",
    ];
    for (world, rank) in [(2usize, 1usize), (1, 0)] {
        let name = format!("w{world}");
        let full_dir = root.join(format!("{name}-full"));
        let full = launch(
            &format!("{name}-full"),
            world,
            &train_args(&full_dir, None, &sets),
            &root,
        );
        let cut_dir = root.join(format!("{name}-cut"));
        let mut args = train_args(&cut_dir, None, &sets);
        args.extend(["--fault".into(), format!("{rank}:5:term")]);
        let mut cut = launch(&format!("{name}-cut"), world, &args, &root);
        let all: Vec<usize> = (0..world).collect();
        let ended = cut.wait_for(&all, Duration::from_secs(90));
        for r in &all {
            let e = &ended[r];
            assert_eq!(
                e.status.code(),
                Some(143),
                "rank {r} of {world}\n{}",
                cut.report()
            );
            assert!(
                e.stderr.contains("stopped by SIGTERM after step 6"),
                "rank {r}: {}",
                e.stderr
            );
        }
        assert_eq!(
            std::fs::read_to_string(cut_dir.join("checkpoints/latest")).unwrap(),
            "step-00000006.safetensors"
        );
        let mut resume = vec!["train".to_string(), "--quiet".into(), "--resume".into()];
        resume.push(cut_dir.display().to_string());
        launch(&format!("{name}-resumed"), world, &resume, &root).succeed(Duration::from_secs(240));
        full.succeed(Duration::from_secs(240));
        assert_eq!(
            metrics(&full_dir),
            metrics(&cut_dir),
            "{world} ranks: stopped and resumed vs uninterrupted"
        );
        let (a, b) = (checkpoint(&full_dir, 12), checkpoint(&cut_dir, 12));
        for (n, t) in &a {
            assert!(
                t.equal(&b[n]),
                "{world} ranks: tensor {n} differs after resuming"
            );
        }
    }
}

/// The two-rank run directory written by the trainer of 46fa8e6 (before
/// hooks and the named trainer state; `tests/fixtures/runs-46fa8e6`),
/// killed after its step-4 checkpoint, resumes on two ranks with today's
/// trainer and logs exactly what that binary logged uninterrupted.
#[test]
fn two_rank_run_directory_from_46fa8e6_resumes_exactly() {
    let root = scratch("dist-46fa8e6");
    let dir = root.join("run");
    copy_dir(&fixture("runs-46fa8e6/two-ranks"), &dir);
    let args: Vec<String> = ["train", "--quiet", "--resume", &dir.display().to_string()]
        .map(String::from)
        .to_vec();
    launch("resume-46fa8e6", 2, &args, &root).succeed(Duration::from_secs(120));
    let want = jsonl_without_time(&dir.join("uninterrupted-metrics.jsonl"));
    let got = metrics(&dir);
    assert_eq!(got.len(), 8);
    assert_eq!(got, want, "the resumed run differs from 46fa8e6's");
}

/// Fine-tuning through the one guarded step is data-parallel too: SNLI-VE
/// on 2 ranks x 4 items trains as 1 process x 8 (the same losses, and the
/// same weights after 4 steps, to rounding).
#[test]
fn two_ranks_finetune_as_one_process_with_the_global_batch() {
    let root = scratch("dist-finetune");
    let pre = root.join("pre");
    let args = train_args(&pre, None, &["train.steps=8"]);
    launch("pre", 1, &args, &root).succeed(Duration::from_secs(120));
    let finetune = |out: &Path, batch: usize| -> Vec<String> {
        [
            "finetune",
            "--quiet",
            "--task",
            "snli-ve",
            "--data",
            "builtin",
            "--steps",
            "4",
            "--lr",
            "1e-3",
            "--eval-every",
            "2",
            "--set",
            "data.synthetic.train_scenes=60",
            "--set",
            "data.synthetic.heldout_scenes=20",
            "--set",
            "train.dist.timeout=60",
            "--batch-size",
            &batch.to_string(),
            "--checkpoint",
            &pre.display().to_string(),
            "--out",
            &out.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    };
    let (one_dir, two_dir) = (root.join("1x8"), root.join("2x4"));
    let one = launch("ft-1x8", 1, &finetune(&one_dir, 8), &root);
    one.succeed(Duration::from_secs(120));
    let two = launch("ft-2x4", 2, &finetune(&two_dir, 4), &root);
    two.succeed(Duration::from_secs(120));
    let (m1, m2) = (metrics(&one_dir), metrics(&two_dir));
    assert_eq!(m1.len(), 4);
    let worst = log_difference(&m1, &m2, &["loss", "grad_norm", "lr"]);
    assert!(worst.0 <= 1e-5, "losses differ: {}", worst.1);
    same_weights(&checkpoint(&one_dir, 4), &checkpoint(&two_dir, 4), 1e-5)
        .unwrap_or_else(|e| panic!("after 4 steps: {e}"));
}

/// SigLIP in place of ITC (`configs/siglip.toml` over the baseline): 2
/// ranks x 8 pairs compute what 1 process x 16 computes. Each rank scores
/// its images against every rank's texts, gathered with gradient; ITM's
/// hard negatives are drawn from SigLIP's similarities of the global batch.
/// The same losses (SigLIP, ITM, MLM) and gradient norms at every step, the
/// same `t` and `b` logged, and the same weights after 4 steps, SigLIP's
/// `t'` and `b` among them.
#[test]
fn two_ranks_train_siglip_as_one_process_with_the_global_batch() {
    let root = scratch("dist-siglip");
    let keys = &[
        "loss",
        "siglip",
        "siglip_scale",
        "siglip_bias",
        "itm",
        "mlm",
        "grad_norm",
    ][..];
    let sets = [
        "train.steps=4",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
    ];
    let (one_dir, two_dir) = (root.join("1x16"), root.join("2x8"));
    let args = |dir: &Path, batch: &str| {
        let mut a = train_args(dir, Some("configs/baseline.toml"), &sets);
        a.extend([
            "--config".into(),
            repo().join("configs/siglip.toml").display().to_string(),
        ]);
        a.extend(["--set".into(), format!("train.batch_size={batch}")]);
        a
    };
    let (one_args, two_args) = (args(&one_dir, "16"), args(&two_dir, "8"));
    let one = launch("siglip-1x16", 1, &one_args, &root);
    let two = launch("siglip-2x8", 2, &two_args, &root);
    two.succeed(Duration::from_secs(240));
    one.succeed(Duration::from_secs(240));

    let (m1, m2) = (metrics(&one_dir), metrics(&two_dir));
    assert_eq!(m1.len(), 4, "one line per step");
    assert!(
        m1[0].contains_key("siglip") && !m1[0].contains_key("itc"),
        "{:?}",
        m1[0]
    );
    let first = log_difference(&m1[..1], &m2[..1], keys);
    let all = log_difference(&m1, &m2, keys);
    let (a, b) = (checkpoint(&one_dir, 4), checkpoint(&two_dir, 4));
    let weights = same_weights(&a, &b, 1e-5);
    eprintln!(
        "siglip, 1x16 vs 2x8: step 1 differs by {:.2e} ({}); 4 steps by {:.2e} ({}); after 4 steps {}",
        first.0,
        first.1,
        all.0,
        all.1,
        match &weights {
            Ok(r) | Err(r) => r,
        }
    );
    assert!(all.0 <= 1e-5, "losses differ by {:.3e} at {}", all.0, all.1);
    weights.unwrap_or_else(|e| panic!("after 4 steps {e}"));
    // SigLIP's own parameters moved, and equally.
    for name in ["logit_scale", "logit_bias"] {
        let key = format!("model.objectives.siglip.{name}");
        let (x, y) = (&a[&key], &b[&key]);
        let moved = a[&format!("optim.v.objectives.siglip.{name}")]
            .abs()
            .max()
            .double_value(&[]);
        assert!(moved > 0.0, "{key} got no gradient");
        let d = (x - y).abs().max().double_value(&[]);
        assert!(
            d <= 1e-5 * x.abs().max().double_value(&[]).max(1.0),
            "{key}: {x} vs {y}"
        );
    }
}

/// With ALBEF's augmentations on (crop, flip with the caption swap,
/// RandAugment; `data.augment`), 2 ranks x 8 still train as 1 process x
/// 16: each image's draws are keyed by its sample and epoch, not by rank.
#[test]
fn two_ranks_augment_as_one_process() {
    let root = scratch("dist-augment");
    let sets = [
        "train.steps=3",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
        "data.augment.crop=true",
        "data.augment.crop_scale=[0.2, 1.0]",
        "data.augment.flip=0.5",
        "data.augment.flip_swap_left_right=true",
        "data.augment.randaug_n=2",
    ];
    let (one_dir, two_dir) = (root.join("1x16"), root.join("2x8"));
    let mut one_args = train_args(&one_dir, Some("configs/baseline.toml"), &sets);
    one_args.extend(["--set".into(), "train.batch_size=16".into()]);
    let mut two_args = train_args(&two_dir, Some("configs/baseline.toml"), &sets);
    two_args.extend(["--set".into(), "train.batch_size=8".into()]);
    let two = launch("augment-2x8", 2, &two_args, &root);
    let one = launch("augment-1x16", 1, &one_args, &root);
    two.succeed(Duration::from_secs(240));
    one.succeed(Duration::from_secs(240));
    let (m1, m2) = (metrics(&one_dir), metrics(&two_dir));
    assert_eq!(m1.len(), 3, "one line per step");
    let losses = ["loss", "itc", "itm", "mlm", "grad_norm"];
    let (d, at) = log_difference(&m1, &m2, &losses);
    assert!(d <= 1e-5, "losses differ by {d:.3e} (relative) at {at}");
    let weights = same_weights(&checkpoint(&one_dir, 3), &checkpoint(&two_dir, 3), 1e-5);
    assert!(weights.is_ok(), "after 3 steps: {weights:?}");
}
