//! Training reads an annotation file through its index (`data.index =
//! "auto"`, the default): the batches are those of the in-memory loader
//! bit for bit (pixels, captions, ids, keys), skipped lines, augmentation,
//! ranks and resuming included; a whole run's metrics are those of
//! `data.index = "off"`; and where no cache can be written the index is
//! held in memory and training runs the same.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch::data::annotations::{load_checked_within, AnnotationLimits};
use vlmatch::data::loader::{Loader, LoaderConfig, Source};
use vlmatch::data::{Dataset, OnError};
use vlmatch::tokenizer::Tokenizer;
use vlmatch_core::Batch;
use vlmatch_registry::config::AugmentConfig;

/// Ten images of different sizes and colours, and `train.jsonl` naming
/// them: 42 captions (strings and lists, "left"/"right" in some), numeric
/// and named ids, and bad lines (a missing image, no caption, not JSON, a
/// blank line) that `data.on_error = "skip"` drops.
fn annotation_file(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..10u32 {
        let side = 10 + 3 * i;
        let img = image::RgbImage::from_fn(side, side + i % 3, |x, y| {
            image::Rgb([(25 * i + x) as u8, (7 * y) as u8, (200 - 15 * i) as u8])
        });
        img.save(images.join(format!("{i}.png"))).unwrap();
    }
    let mut lines = Vec::new();
    for k in 0..30u32 {
        let i = (k * 7) % 10;
        let side = ["left", "right", "middle"][(k % 3) as usize];
        lines.push(match k % 4 {
            0 => format!(r#"{{"image": "{i}.png", "caption": "shape {k} on the {side}"}}"#),
            1 => format!(
                r#"{{"image": "{i}.png", "caption": ["a {side} one {k}", "two {k}"], "image_id": {}}}"#,
                100 + i
            ),
            2 => format!(
                r#"{{"image": "{i}.png", "caption": "named {k}", "image_id": "img-{i}"}}"#
            ),
            _ => format!(r#"{{"image": "{i}.png", "caption": "plain caption {k}"}}"#),
        });
        match k {
            5 => lines.push(r#"{"image": "gone.png", "caption": "missing"}"#.into()),
            11 => lines.push(r#"{"image": "1.png", "text": "no caption"}"#.into()),
            17 => lines.push("{not json".into()),
            23 => lines.push("   ".into()),
            _ => {}
        }
    }
    let ann = dir.join("train.jsonl");
    std::fs::write(&ann, lines.join("\n") + "\n").unwrap();
    (ann, images)
}

fn limits() -> AnnotationLimits {
    AnnotationLimits::default()
}

/// Every tensor and list of two batches equal, bit for bit.
fn same_batch(a: &Batch, b: &Batch, what: &str) {
    assert_eq!(a.captions, b.captions, "{what}: captions");
    assert_eq!(a.pairs, b.pairs, "{what}: pairs");
    assert_eq!(a.sample_keys_host, b.sample_keys_host, "{what}: keys");
    assert!(a.images.equal(&b.images), "{what}: images");
    assert!(a.image_ids.equal(&b.image_ids), "{what}: image ids");
    assert!(a.image_keys.equal(&b.image_keys), "{what}: image keys");
    assert!(a.text.ids.equal(&b.text.ids), "{what}: token ids");
    assert!(a.text.mask.equal(&b.text.mask), "{what}: mask");
}

fn batches(ds: &Arc<Dataset>, cfg: LoaderConfig, start: u64, n: usize) -> Vec<Batch> {
    let tok = Arc::new(Tokenizer::builtin());
    let mut l = Loader::from_source(Source::Pairs(ds.clone()), tok, cfg, start).unwrap();
    (0..n).map(|_| l.next_batch().unwrap()).collect()
}

/// The index-backed dataset and the in-memory one give the same batches:
/// plain and augmented (flips swapping "left"/"right"), one process and
/// each of two ranks, from the start and resumed mid-epoch.
#[test]
fn the_loader_gives_the_same_batches_through_the_index() {
    let (ann, images) = annotation_file("index-loader");
    let memory = load_checked_within(&ann, Some(&images), None, OnError::Skip, limits()).unwrap();
    assert_eq!((memory.len(), memory.skipped), (38, 3));
    let indexed = vlmatch::data::index::open_dataset(&ann, Some(&images), OnError::Skip, limits())
        .unwrap()
        .expect("JSON lines are indexed");
    assert!(indexed.store.is_some() && indexed.pairs.is_empty() && indexed.images.is_empty());
    assert_eq!(
        (indexed.len(), indexed.image_count(), indexed.skipped),
        (memory.len(), memory.images.len(), memory.skipped)
    );
    let (memory, indexed) = (Arc::new(memory), Arc::new(indexed));
    let loaded = micro_layers(&[]).load().unwrap();
    let plain = |b: usize| LoaderConfig::new(&loaded.config.data, b, Some(9));
    let recipe = AugmentConfig {
        crop: true,
        crop_scale: [0.2, 1.0],
        flip: 0.5,
        flip_swap_left_right: true,
        randaug_n: 2,
        randaug_m: 7.0,
        ..AugmentConfig::default()
    };
    let mut captions = Vec::new();
    for augment in [false, true] {
        let cfg = |b: usize| {
            let c = plain(b);
            if augment {
                c.augmented(&recipe, 9)
            } else {
                c
            }
        };
        // Two epochs of four batches of 8, from the start and from batch 5.
        for (start, n) in [(0u64, 8usize), (5, 3)] {
            let want = batches(&memory, cfg(8), start, n);
            let got = batches(&indexed, cfg(8), start, n);
            for (k, (a, b)) in want.iter().zip(&got).enumerate() {
                same_batch(
                    a,
                    b,
                    &format!("augment {augment}, batch {}", start as usize + k),
                );
            }
            if start == 0 {
                captions.push(want.iter().map(|b| b.captions.clone()).collect::<Vec<_>>());
            }
            for rank in 0..2 {
                let want = batches(&memory, cfg(4).shard(rank, 2), start, n);
                let got = batches(&indexed, cfg(4).shard(rank, 2), start, n);
                for (k, (a, b)) in want.iter().zip(&got).enumerate() {
                    let what = format!(
                        "augment {augment}, rank {rank}, batch {}",
                        start as usize + k
                    );
                    same_batch(a, b, &what);
                }
            }
        }
    }
    assert_ne!(
        captions[0], captions[1],
        "flips swapped \"left\" and \"right\" in some augmented captions"
    );
}

fn sets(ann: &Path, images: &Path, index: &str) -> Vec<String> {
    vec![
        "data.source=\"annotations\"".into(),
        format!("data.annotations=\"{}\"", ann.display()),
        format!("data.image_root=\"{}\"", images.display()),
        "data.on_error=\"skip\"".into(),
        format!("data.index=\"{index}\""),
        "train.batch_size=8".into(),
        "train.steps=6".into(),
        "train.checkpoint_every=2".into(),
        "eval.at_end=false".into(),
    ]
}

fn metrics(dir: &Path) -> Vec<serde_json::Map<String, serde_json::Value>> {
    jsonl_without_time(&dir.join("metrics.jsonl"))
}

/// A run through the index logs what a run with `data.index = "off"`
/// logs, value for value (the skipped lines counted alike), and a run cut
/// after step 5 and resumed from its step-4 checkpoint logs it too.
#[test]
fn training_through_the_index_equals_training_in_memory_and_resumes_exactly() {
    let (ann, images) = annotation_file("index-train");
    let auto = sets(&ann, &images, "auto");
    let off = sets(&ann, &images, "off");
    let refs = |s: &[String]| s.iter().map(String::clone).collect::<Vec<_>>();
    let (auto, off) = (refs(&auto), refs(&off));
    let auto: Vec<&str> = auto.iter().map(String::as_str).collect();
    let off: Vec<&str> = off.iter().map(String::as_str).collect();

    let loaded = micro_layers(&auto).load().unwrap();
    let (source, _) = vlmatch::setup::train_source(&loaded).unwrap();
    let Source::Pairs(ds) = source else {
        panic!("pairs")
    };
    assert!(
        ds.store.is_some(),
        "data.index = \"auto\" reads through the index"
    );
    let loaded = micro_layers(&off).load().unwrap();
    let (source, _) = vlmatch::setup::train_source(&loaded).unwrap();
    let Source::Pairs(ds) = source else {
        panic!("pairs")
    };
    assert!(ds.store.is_none(), "data.index = \"off\" holds the pairs");

    let dir = ann.parent().unwrap();
    let a = run(&dir.join("auto"), &auto, None).unwrap();
    let b = run(&dir.join("off"), &off, None).unwrap();
    assert_eq!(a.last_step, 6);
    assert!(a.logged.iter().all(|m| m["data_skipped"] == 3));
    assert_eq!(metrics(&dir.join("auto")), metrics(&dir.join("off")));
    assert_eq!(losses(&a), losses(&b));

    let cut = dir.join("cut");
    run(&cut, &auto, Some(5)).unwrap();
    let resumed = resume(&cut).unwrap();
    assert_eq!(resumed.start_step, 4);
    assert_eq!(metrics(&dir.join("auto")), metrics(&cut));
}

/// A Karpathy-format file, or a split asked for, is held in memory under
/// `data.index = "auto"`, as before.
#[test]
fn karpathy_files_are_held_whole() {
    let dir = scratch("index-karpathy");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    image::RgbImage::from_pixel(8, 8, image::Rgb([10, 20, 30]))
        .save(images.join("a.png"))
        .unwrap();
    let file = dir.join("dataset_coco.json");
    std::fs::write(
        &file,
        r#"{"images": [{"filename": "a.png", "imgid": 3, "split": "train",
            "sentences": [{"raw": "one"}, {"raw": "two"}]}]}"#,
    )
    .unwrap();
    assert!(
        vlmatch::data::index::open_dataset(&file, Some(&images), OnError::Fail, limits())
            .unwrap()
            .is_none()
    );
    for split in [None, Some("train")] {
        let ann = format!("data.annotations=\"{}\"", file.display());
        let root = format!("data.image_root=\"{}\"", images.display());
        let split = split.map(|s| format!("data.split=\"{s}\""));
        let mut s = vec!["data.source=\"annotations\"", &ann, &root];
        s.extend(split.as_deref());
        let loaded = micro_layers(&s).load().unwrap();
        let (Source::Pairs(ds), _) = vlmatch::setup::train_source(&loaded).unwrap() else {
            panic!("pairs")
        };
        assert!(ds.store.is_none());
        assert_eq!((ds.len(), ds.image_ids.as_slice()), (2, &[3i64][..]));
    }
}

/// Where neither the file's folder nor the per-user cache can take the
/// index (here: its name beside the file is a directory, and the cache
/// home is a file; permissions would not stop root), `vlmatch train` warns
/// and holds the index in memory, and the run logs what the in-memory
/// loader's run logs.
#[test]
fn an_unwritable_cache_leaves_the_index_in_memory() {
    let (ann, images) = annotation_file("index-unwritable");
    let dir = ann.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(dir.join(".train.jsonl.vlmatch-index")).unwrap();
    let home = dir.join("home-is-a-file");
    std::fs::write(&home, "").unwrap();
    let train = |index: &str, run_dir: &str| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_vlmatch"));
        cmd.arg("train")
            .args(["--config", fixture("micro.toml").to_str().unwrap()])
            .args(["--run-dir", dir.join(run_dir).to_str().unwrap()])
            .env("XDG_CACHE_HOME", &home)
            .env("HOME", &home)
            .env("RUST_LOG", "warn");
        for s in sets(&ann, &images, index) {
            cmd.args(["--set", &s]);
        }
        cmd.args(["--set", "train.steps=3"]);
        let out = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        stderr
    };
    let stderr = train("auto", "auto");
    assert!(stderr.contains("it is held in memory"), "{stderr}");
    assert!(
        std::fs::read_dir(&dir).unwrap().all(|e| {
            let e = e.unwrap();
            !e.path().is_file() || !e.file_name().to_string_lossy().ends_with("vlmatch-index")
        }),
        "no index file was written"
    );
    train("off", "off");
    assert_eq!(metrics(&dir.join("auto")), metrics(&dir.join("off")));
}

/// `data.index` takes `auto` or `off`; anything else is an error naming
/// the key and both values.
#[test]
fn a_bad_data_index_names_the_key() {
    let e = micro_layers(&["data.index=\"always\""])
        .load()
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains("data.index") && e.contains("auto") && e.contains("off"),
        "{e}"
    );
    let loaded = micro_layers(&["data.index=\"off\""]).load().unwrap();
    assert!(loaded.to_toml().contains("index = \"off\""));
}
