//! Real dataset formats: WebDataset tar shards, streamed for training and
//! materialised for evaluation, and `data.on_error`.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch::data::loader::{Loader, LoaderConfig, Source};
use vlmatch::data::webdataset::{key_image_id, PairStream, Shards};
use vlmatch::data::{load_any, load_any_with, Dataset, OnError};
use vlmatch::tokenizer::Tokenizer;
use vlmatch_core::Batch;

/// `data.image_size` of the micro config.
const SIZE: usize = 16;

fn png(rgb: Vec<u8>) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_raw(SIZE as u32, SIZE as u32, rgb)
        .unwrap()
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// Shards written from synthetic scenes, and what they hold.
struct Made {
    dir: PathBuf,
    pattern: String,
    /// (image id, caption, scene) of every pair.
    pairs: Vec<(i64, String, usize)>,
    scenes: Dataset,
}

impl Made {
    fn scene_of(&self, id: i64, caption: &str) -> usize {
        self.pairs
            .iter()
            .find(|p| p.0 == id && p.1 == caption)
            .unwrap_or_else(|| panic!("pair ({id}, {caption:?}) is not in the shards"))
            .2
    }
}

/// 3 shards x 10 samples: shards 0 and 2 hold `.png` + `.txt` (and an
/// ignored `.cls`), shard 1 `.png` + `.json` with two captions and an
/// `image_id`; 40 pairs of 30 images.
fn make_shards(name: &str) -> Made {
    let dir = scratch(name);
    let scenes = Dataset::synthetic("scenes", 7, 0, 30, 2);
    let mut pairs = Vec::new();
    for shard in 0..3 {
        let mut tar = Vec::new();
        for i in 0..10 {
            let s = shard * 10 + i;
            let key = format!("{s:06}");
            let caps: Vec<&str> = scenes
                .pairs
                .iter()
                .filter(|p| p.image == s)
                .map(|p| p.caption.as_str())
                .collect();
            tar_entry(
                &mut tar,
                &format!("{key}.png"),
                &png(scenes.load_rgb(s, SIZE).unwrap()),
            );
            if shard == 1 {
                let id = 1000 + s as i64;
                let json = serde_json::json!({"caption": caps, "image_id": id});
                tar_entry(
                    &mut tar,
                    &format!("{key}.json"),
                    json.to_string().as_bytes(),
                );
                pairs.extend(caps.iter().map(|c| (id, c.to_string(), s)));
            } else {
                tar_entry(&mut tar, &format!("{key}.txt"), caps[0].as_bytes());
                tar_entry(&mut tar, &format!("{key}.cls"), b"3");
                pairs.push((key_image_id(&key), caps[0].to_string(), s));
            }
        }
        tar_end(&mut tar);
        std::fs::write(dir.join(format!("train-{shard:06}.tar")), tar).unwrap();
    }
    let pattern = format!("{}/train-{{000000..000002}}.tar", dir.display());
    Made {
        dir,
        pattern,
        pairs,
        scenes,
    }
}

fn loader_config(batch_size: usize, seed: u64, on_error: &str) -> LoaderConfig {
    let set = format!("data.on_error=\"{on_error}\"");
    let loaded = micro_layers(&[&set]).load().unwrap();
    LoaderConfig::new(&loaded.config.data, batch_size, Some(seed))
}

fn shard_batches(made: &Made, buffer: usize, seed: u64, start: u64, n: usize) -> Vec<Batch> {
    let shards = Shards::resolve(&made.pattern, "test", buffer).unwrap();
    let mut loader = Loader::from_source(
        Source::Shards(shards),
        Arc::new(Tokenizer::builtin()),
        loader_config(8, seed, "fail"),
        start,
    )
    .unwrap();
    (0..n).map(|_| loader.next_batch().unwrap()).collect()
}

fn ids(b: &Batch) -> Vec<i64> {
    Vec::<i64>::try_from(&b.image_ids).unwrap()
}

fn assert_same(a: &[Batch], b: &[Batch], what: &str) {
    assert_eq!(a.len(), b.len());
    for (k, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.captions, y.captions, "{what}: batch {k}");
        assert_eq!(ids(x), ids(y), "{what}: batch {k}");
        assert!(x.images.equal(&y.images), "{what}: batch {k} images");
        assert!(x.text.ids.equal(&y.text.ids), "{what}: batch {k} tokens");
    }
}

#[test]
fn a_stream_batch_holds_the_shards_pairs_decoded_and_normalised() {
    let made = make_shards("wds-batch");
    let cfg = loader_config(8, 1, "fail");
    let batches = shard_batches(&made, 16, 1, 0, 5);
    let mut seen = Vec::new();
    for b in &batches {
        assert_eq!(b.images.size(), [8, 3, SIZE as i64, SIZE as i64]);
        assert_eq!(b.text.ids.size()[0], 8);
        assert_eq!(b.text.ids.size(), b.text.mask.size());
        for (k, (id, caption)) in ids(b).into_iter().zip(&b.captions).enumerate() {
            let s = made.scene_of(id, caption);
            let want = made.scenes.load_image(s, SIZE, cfg.mean, cfg.std).unwrap();
            let got = Vec::<f32>::try_from(b.images.get(k as i64).flatten(0, -1)).unwrap();
            let diff = want
                .iter()
                .zip(&got)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "image of scene {s} differs by {diff}");
            seen.push((id, caption.clone()));
        }
    }
    // One epoch is 5 batches: every pair once.
    seen.sort();
    let mut all: Vec<(i64, String)> = made.pairs.iter().map(|p| (p.0, p.1.clone())).collect();
    all.sort();
    assert_eq!(seen, all);
    // Two captions of a JSON sample share its id; text samples hash the key.
    assert!(made.pairs.iter().any(|p| p.0 == 1010));
    assert_eq!(made.pairs.iter().filter(|p| p.0 == 1010).count(), 2);
}

#[test]
fn the_stream_is_fixed_by_the_seed_and_resumes_at_any_batch() {
    let made = make_shards("wds-resume");
    // 13 batches of 8 cross two epoch boundaries (40 pairs an epoch).
    let full = shard_batches(&made, 7, 3, 0, 13);
    assert_same(&full, &shard_batches(&made, 7, 3, 0, 13), "same seed");
    let other = shard_batches(&made, 7, 4, 0, 2);
    assert_ne!(other[0].captions, full[0].captions, "another seed");
    assert_same(
        &full[6..],
        &shard_batches(&made, 7, 3, 6, 7),
        "from batch 6",
    );
    assert_same(
        &full[11..],
        &shard_batches(&made, 7, 3, 11, 2),
        "from batch 11",
    );
    assert_ne!(
        full[0].captions, full[5].captions,
        "epochs are ordered differently"
    );
}

#[test]
fn the_shuffle_buffer_reorders_samples_across_shards() {
    let made = make_shards("wds-buffer");
    let order = |buffer: usize, seed: u64| -> Vec<usize> {
        let shards = Shards::resolve(&made.pattern, "test", buffer).unwrap();
        let mut s = PairStream::new(shards, Some(seed), OnError::Fail, Default::default());
        s.peek_order(40)
            .unwrap()
            .iter()
            .map(|(id, c)| made.scene_of(*id, c))
            .collect()
    };
    let sequential = order(1, 5);
    let descents = |o: &[usize]| o.windows(2).filter(|w| w[1] < w[0]).count();
    // Buffer 1: whole shards in a shuffled order, samples in archive order.
    assert!(descents(&sequential) <= 2, "{sequential:?}");
    assert!(
        (1..5).any(|seed| order(1, seed)[0] != 0),
        "the shard order depends on the seed"
    );
    let shuffled = order(40, 5);
    assert!(descents(&shuffled) > 8, "{shuffled:?}");
    let (mut a, mut b) = (sequential.clone(), shuffled.clone());
    a.sort();
    b.sort();
    assert_eq!(a, b, "the same pairs");
}

#[test]
fn load_any_reads_shards_and_annotation_files() {
    let made = make_shards("wds-load");
    let ds = load_any(&made.pattern, None, None).unwrap();
    assert_eq!((ds.len(), ds.images.len()), (40, 30));
    for p in &ds.pairs {
        let s = made.scene_of(ds.image_ids[p.image], &p.caption);
        assert_eq!(
            ds.load_rgb(p.image, SIZE).unwrap(),
            made.scenes.load_rgb(s, SIZE).unwrap()
        );
    }
    let one = made.dir.join("train-000001.tar");
    let ds = load_any(one.to_str().unwrap(), None, None).unwrap();
    assert_eq!((ds.len(), ds.images.len()), (20, 10));
    let e = load_any(&made.pattern, None, Some("test")).unwrap_err();
    assert!(e.to_string().contains("split"), "{e}");

    let ann = made.dir.join("ann.jsonl");
    image::RgbImage::new(8, 8)
        .save(made.dir.join("a.png"))
        .unwrap();
    std::fs::write(
        &ann,
        "{\"image\": \"a.png\", \"caption\": [\"x\", \"y\"]}\n",
    )
    .unwrap();
    let ds = load_any(ann.to_str().unwrap(), None, None).unwrap();
    assert_eq!(ds.len(), 2);
}

#[test]
fn a_pattern_with_a_missing_shard_names_key_pattern_and_path() {
    let made = make_shards("wds-missing");
    let pattern = format!("{}/train-{{000000..000003}}.tar", made.dir.display());
    let shards = format!("data.shards=\"{pattern}\"");
    let loaded = micro_layers(&["data.source=\"webdataset\"", &shards])
        .load()
        .unwrap();
    let e = vlmatch::setup::train_source(&loaded)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.shards"), "{e}");
    assert!(e.contains(&pattern), "{e}");
    assert!(e.contains("train-000003.tar not found"), "{e}");
    // Without data.shards at all, the config does not load.
    let e = micro_layers(&["data.source=\"webdataset\""])
        .load()
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("data.shards"), "{e}");
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("time_s");
            v
        })
        .collect()
}

#[test]
fn training_streams_shards_and_resumes_exactly() {
    let made = make_shards("wds-train");
    let shards = format!("data.shards=\"{}\"", made.pattern);
    let held = format!("data.heldout_annotations=\"{}\"", made.pattern);
    let sets = [
        "data.source=\"webdataset\"",
        &shards,
        &held,
        "data.shuffle_buffer=12",
        "train.steps=6",
        "train.checkpoint_every=2",
    ];
    let full = run(&made.dir.join("full"), &sets, None).unwrap();
    assert_eq!(full.last_step, 6);
    assert!(full.logged.iter().all(|m| m["data_skipped"] == 0));
    let e = full
        .eval
        .expect("held-out evaluation on the materialised shards");
    assert_eq!((e.retrieval.images, e.retrieval.captions), (30, 40));

    let cut = made.dir.join("cut");
    run(&cut, &sets, Some(5)).unwrap();
    let resumed = resume(&cut).unwrap();
    assert_eq!(resumed.start_step, 4);
    assert_eq!(metrics(&made.dir.join("full")), metrics(&cut));
}

/// Eight one-color images named by `train.jsonl`, line 2 naming `bad`.
fn annotations_with(name: &str, bad: &str) -> (PathBuf, PathBuf) {
    let dir = scratch(name);
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut lines = String::new();
    for i in 0..8u8 {
        let file = format!("{i}.png");
        image::RgbImage::from_pixel(12, 12, image::Rgb([30 * i, 200 - 20 * i, 90]))
            .save(images.join(&file))
            .unwrap();
        let file = if i == 1 { bad.to_string() } else { file };
        lines.push_str(&format!(
            "{{\"image\": \"{file}\", \"caption\": \"a picture number {i}\"}}\n"
        ));
    }
    std::fs::write(images.join("corrupt.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let ann = dir.join("train.jsonl");
    std::fs::write(&ann, lines).unwrap();
    (ann, images)
}

fn annotation_sets(ann: &Path, images: &Path, on_error: &str) -> Vec<String> {
    vec![
        "data.source=\"annotations\"".into(),
        format!("data.annotations=\"{}\"", ann.display()),
        format!("data.image_root=\"{}\"", images.display()),
        format!("data.on_error=\"{on_error}\""),
        "train.batch_size=4".into(),
        "train.steps=4".into(),
        "eval.at_end=false".into(),
    ]
}

#[test]
fn a_missing_image_fails_by_default_and_is_dropped_with_skip() {
    let (ann, images) = annotations_with("on-error-missing", "gone.png");
    let sets = annotation_sets(&ann, &images, "fail");
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let loaded = micro_layers(&refs).load().unwrap();
    let e = vlmatch::setup::datasets(&loaded).err().unwrap().to_string();
    assert!(e.contains(&format!("{}:2", ann.display())), "{e}");
    assert!(e.contains("gone.png not found"), "{e}");
    assert!(e.contains("data.on_error = \"skip\""), "{e}");

    let sets = annotation_sets(&ann, &images, "skip");
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let loaded = micro_layers(&refs).load().unwrap();
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    assert_eq!((ds.len(), ds.skipped), (7, 1));
    let s = run(&ann.with_file_name("run"), &refs, None).unwrap();
    assert_eq!(s.last_step, 4);
    assert!(s.logged.iter().all(|m| m["data_skipped"] == 1));
}

#[test]
fn a_corrupt_image_fails_by_default_and_is_replaced_with_skip() {
    let (ann, images) = annotations_with("on-error-corrupt", "corrupt.png");
    let sets = annotation_sets(&ann, &images, "fail");
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let e = run(&ann.with_file_name("fail"), &refs, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("corrupt.png"), "{e}");
    assert!(e.contains(&format!("{}:2", ann.display())), "{e}");
    assert!(e.contains("data.on_error = \"skip\""), "{e}");

    let sets = annotation_sets(&ann, &images, "skip");
    let refs: Vec<&str> = sets.iter().map(String::as_str).collect();
    let s = run(&ann.with_file_name("skip"), &refs, None).unwrap();
    assert_eq!(s.last_step, 4);
    // Two epochs of two batches: the corrupt pair came up twice.
    assert_eq!(s.logged.last().unwrap()["data_skipped"], 2);
}

/// A shard whose sample 1 has a corrupt image and sample 2 no caption.
fn bad_shard(name: &str) -> PathBuf {
    let made = make_shards(name);
    let mut tar = Vec::new();
    for i in 0..8 {
        let key = format!("bad{i}");
        let image = if i == 1 {
            b"not an image".to_vec()
        } else {
            png(made.scenes.load_rgb(i, SIZE).unwrap())
        };
        tar_entry(&mut tar, &format!("{key}.jpg"), &image);
        if i != 2 {
            tar_entry(
                &mut tar,
                &format!("{key}.txt"),
                format!("caption {i}").as_bytes(),
            );
        }
    }
    tar_end(&mut tar);
    let path = made.dir.join("bad.tar");
    std::fs::write(&path, tar).unwrap();
    path
}

#[test]
fn bad_shard_samples_fail_by_default_and_are_skipped_with_skip() {
    let path = bad_shard("wds-bad");
    let pattern = path.to_str().unwrap();
    let e = load_any(pattern, None, None).unwrap_err().to_string();
    assert!(e.contains(pattern), "{e}");
    assert!(e.contains("`bad2` has no caption"), "{e}");
    assert!(e.contains("data.on_error = \"skip\""), "{e}");
    let ds = load_any_with(pattern, None, None, OnError::Skip).unwrap();
    assert_eq!((ds.len(), ds.skipped), (7, 1));
    let e = ds.load_rgb(1, SIZE).unwrap_err().to_string();
    assert!(
        e.contains("bad.tar/bad1.jpg"),
        "names shard and member: {e}"
    );

    let stream = |on_error: &str| {
        let cfg = loader_config(7, 1, on_error);
        let shards = Shards::resolve(pattern, "test", 4).unwrap();
        Loader::from_source(
            Source::Shards(shards),
            Arc::new(Tokenizer::builtin()),
            cfg,
            0,
        )
        .unwrap()
    };
    let e = stream("fail").next_batch().unwrap_err().to_string();
    assert!(e.contains("bad.tar: sample `bad2` has no caption"), "{e}");
    let mut loader = stream("skip");
    for _ in 0..3 {
        let b = loader.next_batch().unwrap();
        assert_eq!(b.images.size()[0], 7);
        assert!(!b.captions.contains(&"caption 1".to_string()));
    }
    // Per epoch (one batch): the captionless sample, and the corrupt image.
    assert_eq!(loader.skipped(), 6);
}

/// An image whose header claims more pixels than `data.max_image_pixels`
/// is refused before any pixel is decoded, naming the file, its size and
/// the key; under `on_error = "skip"` it is dropped and counted.
#[test]
fn an_image_over_the_pixel_limit_is_refused_before_decoding() {
    let dir = scratch("pixel-limit");
    // A real 64 x 64 PNG, and a PNG header that claims 100000 x 100000 (a
    // decompression bomb's header; its data would not even decode).
    let png = dir.join("small.png");
    image::RgbImage::from_pixel(64, 64, image::Rgb([200, 30, 30]))
        .save(&png)
        .unwrap();
    let mut bomb = std::fs::read(&png).unwrap();
    bomb[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    bomb[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    // The IHDR chunk's CRC over its type and data, as a real header has.
    let crc = crc32fast::hash(&bomb[12..29]);
    bomb[29..33].copy_from_slice(&crc.to_be_bytes());
    let bomb_path = dir.join("bomb.png");
    std::fs::write(&bomb_path, &bomb).unwrap();
    use vlmatch::data::loader::decode_resized_within as decode;
    let pil = 2 * 89_478_485;
    let e = decode(&bomb_path, "test", 32, pil).unwrap_err().to_string();
    assert!(
        e.contains("bomb.png")
            && e.contains("100000 x 100000")
            && e.contains("data.max_image_pixels"),
        "{e}"
    );
    assert_eq!(decode(&png, "test", 32, pil).unwrap().len(), 32 * 32 * 3);
    // The key lowers the limit for real images too.
    let e = decode(&png, "test", 32, 1000).unwrap_err().to_string();
    assert!(e.contains("64 x 64 = 4096 pixels"), "{e}");
}
