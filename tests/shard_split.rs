//! `data.shard_split`: under `disjoint` each rank and loader worker reads
//! its own shards. One epoch over every reader is every sample exactly once
//! (a proptest over shard counts, ranks and workers; more readers than
//! shards is an error); a run resumes exactly on the same ranks x workers
//! and refuses others; the resolved value is saved, and a saved config
//! without it means `exact`; in a 4-rank Gloo run each rank reads a quarter
//! of the bytes.

mod common;
use common::*;

use proptest::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vlmatch::data::webdataset::{PairStream, RankPlace, RankStream, Shards};
use vlmatch::data::OnError;
use vlmatch::train::TrainOptions;
use vlmatch_registry::config::ShardSplit;
use vlmatch_registry::ConfigLayers;

/// Shards `counts.len()` of them, shard `i` holding `counts[i]` samples
/// whose image bytes are never decoded here; returns the pattern and every
/// caption.
fn caption_shards(dir: &Path, counts: &[usize]) -> (String, Vec<String>) {
    let mut all = Vec::new();
    for (i, &n) in counts.iter().enumerate() {
        let mut tar = Vec::new();
        for j in 0..n {
            let key = format!("{i:03}-{j:03}");
            let caption = format!("sample {j} of shard {i}");
            tar_entry(&mut tar, &format!("{key}.png"), b"not decoded");
            tar_entry(&mut tar, &format!("{key}.txt"), caption.as_bytes());
            all.push(caption);
        }
        tar_end(&mut tar);
        std::fs::write(dir.join(format!("s-{i:03}.tar")), tar).unwrap();
    }
    let last = counts.len() - 1;
    let pattern = if last == 0 {
        format!("{}/s-000.tar", dir.display())
    } else {
        format!("{}/s-{{000..{last:03}}}.tar", dir.display())
    };
    (pattern, all)
}

static CASE: AtomicUsize = AtomicUsize::new(0);

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Epoch `epoch` read by every worker of every rank, each its own
    /// stream: together every sample exactly once. More ranks x workers than
    /// shards: an error that says so.
    #[test]
    fn one_epoch_over_all_ranks_and_workers_is_every_sample_once(
        counts in prop::collection::vec(0usize..4, 1..10),
        ranks in 1usize..5,
        workers in 1usize..4,
        seed in prop::option::of(any::<u64>()),
        epoch in 0u64..3,
        buffer in 1usize..6,
    ) {
        let mut counts = counts;
        counts[0] += 1;
        let dir = scratch(&format!("split-prop-{}", CASE.fetch_add(1, Ordering::Relaxed)));
        let (pattern, mut all) = caption_shards(&dir, &counts);
        let shards = Shards::resolve(&pattern, "test", buffer)
            .unwrap()
            .with_split(ShardSplit::Disjoint);
        let skipped = Arc::new(AtomicUsize::new(0));
        let place = |rank| RankPlace { rank, ranks, workers, batch_size: 1 };
        let made = RankStream::new(shards.clone(), seed, OnError::Fail, skipped.clone(), place(0));
        if ranks * workers > counts.len() {
            let e = made.err().expect("more readers than shards is an error").to_string();
            prop_assert!(
                e.contains("data.shard_split")
                    && e.contains(&format!("{ranks} rank(s) x {workers} loader worker(s)"))
                    && e.contains(&format!("has {} shard(s)", counts.len())),
                "{}", e
            );
            return Ok(());
        }
        prop_assert!(made.is_ok());
        let mut seen = Vec::new();
        for rank in 0..ranks {
            for w in 0..workers {
                let mut s = PairStream::new(shards.clone(), seed, OnError::Fail, skipped.clone())
                    .with_slot(place(rank).slot(w));
                for _ in 0..epoch {
                    s.rest_of_epoch().unwrap();
                }
                seen.extend(s.rest_of_epoch().unwrap().into_iter().map(|(_, c)| c));
            }
        }
        seen.sort();
        all.sort();
        prop_assert_eq!(seen, all);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// `n` shards of `per_shard` 16-pixel PNG scenes with a caption each.
fn image_shards(dir: &Path, n: usize, per_shard: usize) -> String {
    let scenes = vlmatch::data::Dataset::synthetic("scenes", 3, 0, n * per_shard, 1);
    for shard in 0..n {
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
    format!("{}/train-{{0..{}}}.tar", dir.display(), n - 1)
}

fn metrics(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    jsonl_without_time(&dir.join("metrics.jsonl"))
}

/// Continue `dir` with `sets` on top of its saved config.
fn resume_with(dir: &Path, sets: &[&str]) -> vlmatch_core::Result<vlmatch::train::TrainSummary> {
    train_exclusive(TrainOptions {
        layers: ConfigLayers {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..ConfigLayers::default()
        },
        run_dir: None,
        resume: Some(dir.to_path_buf()),
        halt_after: None,
        progress: false,
        force: false,
    })
}

fn saved_split(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    let t: toml::Table = toml::from_str(&text).unwrap();
    t["data"]
        .get("shard_split")
        .and_then(|v| v.as_str())
        .map(String::from)
}

/// One process with 2 loader workers: a new shard run resolves to
/// `disjoint` and saves it, resumes exactly, and refuses another worker
/// count or split.
#[test]
fn two_workers_split_disjoint_resume_exactly_and_refuse_another_layout() {
    let dir = scratch("split-workers");
    let shards = format!("data.shards=\"{}\"", image_shards(&dir, 4, 6));
    let sets = [
        "data.source=\"webdataset\"",
        &shards,
        "data.workers=2",
        "data.shuffle_buffer=4",
        "train.steps=6",
        "train.checkpoint_every=2",
        "eval.at_end=false",
    ];
    let full = dir.join("full");
    run(&full, &sets, None).unwrap();
    assert_eq!(saved_split(&full).as_deref(), Some("disjoint"));
    let cut = dir.join("cut");
    run(&cut, &sets, Some(5)).unwrap();
    let e = resume_with(&cut, &["data.workers=1"])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.workers = 1") && e.contains("over 2 loader worker(s) per rank"),
        "{e}"
    );
    let e = resume_with(&cut, &["data.shard_split=\"exact\""])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("data.shard_split") && e.contains("\"disjoint\"") && e.contains("\"exact\""),
        "{e}"
    );
    // The refusals left the run as it was: it resumes to the full run.
    let resumed = resume_with(&cut, &[]).unwrap();
    assert_eq!(resumed.start_step, 4);
    assert_eq!(metrics(&full), metrics(&cut));
    // The split changes what is read: not the exact run's batches.
    let exact = dir.join("exact");
    let mut exact_sets = sets.to_vec();
    exact_sets.push("data.shard_split=\"exact\"");
    run(&exact, &exact_sets, None).unwrap();
    assert_ne!(metrics(&full), metrics(&exact));
}

/// A run directory whose saved config has no `data.shard_split` (written
/// before the key) resumes `exact`, even with 2 workers, where a new run
/// would be `disjoint`; its rewritten config then says so.
#[test]
fn a_saved_config_without_the_key_resumes_exact() {
    let dir = scratch("split-old");
    let shards = format!("data.shards=\"{}\"", image_shards(&dir, 4, 6));
    let sets = [
        "data.source=\"webdataset\"",
        &shards,
        "data.workers=2",
        "data.shard_split=\"exact\"",
        "train.steps=6",
        "train.checkpoint_every=2",
        "eval.at_end=false",
    ];
    let full = dir.join("full");
    run(&full, &sets, None).unwrap();
    let cut = dir.join("cut");
    run(&cut, &sets, Some(5)).unwrap();
    let config = cut.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let old: String = text
        .lines()
        .filter(|l| !l.starts_with("shard_split"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(old, text, "the key was saved");
    std::fs::write(&config, old).unwrap();
    assert_eq!(saved_split(&cut), None);
    resume_with(&cut, &[]).unwrap();
    assert_eq!(metrics(&full), metrics(&cut));
    assert_eq!(saved_split(&cut).as_deref(), Some("exact"));
}

/// Under `exact`, rank 0 of 4 reads every tar header and caption; under
/// `disjoint` a quarter of the bytes (read in process, as a loader does).
#[test]
fn an_exact_rank_reads_the_whole_set_a_disjoint_one_a_quarter() {
    let dir = scratch("split-bytes");
    let pattern = image_shards(&dir, 8, 4);
    let total: u64 = Shards::resolve(&pattern, "test", 1)
        .unwrap()
        .paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    let read = |split, rank| {
        let shards = Shards::resolve(&pattern, "test", 1)
            .unwrap()
            .with_split(split);
        let place = RankPlace {
            rank,
            ranks: 4,
            workers: 1,
            batch_size: 2,
        };
        let skipped = Arc::new(AtomicUsize::new(0));
        let mut s = RankStream::new(shards, Some(3), OnError::Fail, skipped, place).unwrap();
        // One epoch: 8 pairs a rank (disjoint), 8 global batches (exact).
        for _ in 0..4 {
            s.next_batch().unwrap();
        }
        s.bytes_read().load(Ordering::Relaxed)
    };
    let exact = read(ShardSplit::Exact, 0);
    assert!(exact > total / 2, "exact: {exact} of {total} bytes");
    let disjoint: Vec<u64> = (0..4).map(|r| read(ShardSplit::Disjoint, r)).collect();
    assert_eq!(disjoint.iter().sum::<u64>(), total, "{disjoint:?}");
}

/// A port nobody listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Children killed when dropped (a failed assertion), so none outlives
/// the test.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The bytes_read of the first `shard stream: epoch read` line of `log`
/// for epoch 0.
fn epoch0_bytes(log: &str) -> Option<u64> {
    // Without colour codes (the log may have them).
    let mut plain = String::new();
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            plain.push(c);
        }
    }
    let line = plain
        .lines()
        .find(|l| l.contains("shard stream: epoch read") && l.contains(" epoch=0 "))?;
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("bytes_read="))?
        .parse()
        .ok()
}

/// 4 ranks on loopback (Gloo), 8 shards, `data.shard_split` left to its
/// default: the run resolves to `disjoint`, and in its first epoch each
/// rank reads its own 2 shards: a quarter of the bytes, to within a shard,
/// each byte once.
#[test]
fn four_ranks_each_read_a_quarter_of_the_bytes() {
    let root = scratch("split-gloo");
    let pattern = image_shards(&root, 8, 2);
    let sizes: Vec<u64> = Shards::resolve(&pattern, "test", 1)
        .unwrap()
        .paths
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .collect();
    let total: u64 = sizes.iter().sum();
    let run_dir = root.join("run");
    let mut args: Vec<String> = ["train", "--quiet", "--preset", "tiny", "--config"]
        .map(String::from)
        .to_vec();
    args.push(fixture("micro.toml").display().to_string());
    args.extend(["--run-dir".into(), run_dir.display().to_string()]);
    for s in [
        "eval.at_end=false",
        "data.source=\"webdataset\"",
        &format!("data.shards=\"{pattern}\""),
        "data.shuffle_buffer=2",
        "train.batch_size=2",
        "train.steps=3",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
    ] {
        args.extend(["--set".into(), s.to_string()]);
    }
    let port = free_port();
    let log = |rank: usize| root.join(format!("rank{rank}.err"));
    let mut procs = Procs(Vec::new());
    for rank in 0..4 {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlmatch"));
        cmd.args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", "4")
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", "4")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("RUST_LOG", "warn,vlmatch::data::webdataset=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log(rank)).unwrap());
        for v in ["SLURM_PROCID", "SLURM_STEP_ID", "SLURM_STEPID"] {
            cmd.env_remove(v);
        }
        procs.0.push(cmd.spawn().expect("start vlmatch"));
    }
    let started = Instant::now();
    let logs = |_: ()| -> String {
        (0..4)
            .map(|r| {
                let text = std::fs::read_to_string(log(r)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- rank {r}:\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    for c in procs.0.iter_mut() {
        let status = loop {
            if let Some(s) = c.try_wait().unwrap() {
                break s;
            }
            assert!(
                started.elapsed() < Duration::from_secs(240),
                "still running after 240 s\n{}",
                logs(())
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(status.success(), "a rank failed ({status})\n{}", logs(()));
    }
    assert_eq!(saved_split(&run_dir).as_deref(), Some("disjoint"));
    let largest = *sizes.iter().max().unwrap();
    let read: Vec<u64> = (0..4)
        .map(|r| {
            let text = std::fs::read_to_string(log(r)).unwrap();
            epoch0_bytes(&text).unwrap_or_else(|| panic!("rank {r} logged no epoch\n{text}"))
        })
        .collect();
    eprintln!("bytes read in epoch 0 by rank: {read:?} of {total} ({largest} the largest shard)");
    for (r, &b) in read.iter().enumerate() {
        assert!(
            b.abs_diff(total / 4) <= largest,
            "rank {r} read {b} bytes, not within a shard ({largest}) of a quarter of {total}"
        );
    }
    assert_eq!(read.iter().sum::<u64>(), total, "each byte read once");
    let _: PathBuf = run_dir;
}

/// The key's values are a closed set, and it applies to shards only: each
/// mistake is an error naming the key.
#[test]
fn bad_shard_split_values_name_the_key() {
    let e = micro_layers(&["data.shard_split=\"both\""])
        .load()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.shard_split") && e.contains("disjoint") && e.contains("exact"),
        "{e}"
    );
    let e = micro_layers(&["data.shard_split=\"disjoint\""])
        .load()
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("data.shard_split") && e.contains("webdataset"),
        "{e}"
    );
}
