//! Limits on what data may make vlmatch read or hold (issue 25): tar
//! members over `data.max_image_bytes` / `data.max_text_bytes` are refused
//! from their header, before any of their data is read; captions are cut to
//! `data.max_caption_bytes` before tokenising; a tokenizer whose vocabulary
//! has an id beyond its size is an error naming the file; caption lists over
//! `data.max_captions_per_image` are refused.
//!
//! A counting global allocator records, for the thread that asks, the
//! largest single allocation, so the tests can show that a header claiming a
//! huge size allocates nothing of that size.

mod common;
use common::*;
use proptest::prelude::*;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use vlmatch::data::annotations::{self, AnnotationLimits};
use vlmatch::data::webdataset::{load_shards_with, MemberLimits, PairStream, Shards};
use vlmatch::data::OnError;
use vlmatch::tokenizer::Tokenizer;

/// The system allocator, recording the largest allocation of the threads
/// that turned recording on ([`largest_allocation`]).
struct Counting;

thread_local! {
    static RECORDING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn record(size: usize) {
    let _ = RECORDING.try_with(|on| {
        if on.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// `f`'s result and the largest single allocation this thread made in it.
fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    RECORDING.with(|on| on.set(true));
    let out = f();
    RECORDING.with(|on| on.set(false));
    (out, LARGEST.with(Cell::get))
}

fn png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_pixel(8, 8, image::Rgb([10, 200, 30]))
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

/// A shard of `good` complete samples (keys `g0..`), then `tail` bytes.
fn shard(dir: &Path, name: &str, good: usize, tail: &[u8]) -> PathBuf {
    let mut tar = Vec::new();
    for i in 0..good {
        tar_entry(&mut tar, &format!("g{i}.png"), &png());
        tar_entry(
            &mut tar,
            &format!("g{i}.txt"),
            format!("caption {i}").as_bytes(),
        );
    }
    tar.extend_from_slice(tail);
    tar_end(&mut tar);
    let path = dir.join(name);
    std::fs::write(&path, tar).unwrap();
    path
}

#[test]
fn a_member_whose_header_claims_a_tebibyte_is_refused_naming_it() {
    let dir = scratch("limits-tib");
    let mut tail = Vec::new();
    tar_entry(&mut tail, "big.png", &png());
    tail.extend_from_slice(&tar_header("big.txt", 1 << 40));
    tail.extend_from_slice(b"a short caption");
    tail.resize(tail.len().div_ceil(512) * 512, 0);
    let path = shard(&dir, "huge.tar", 2, &tail);
    let pattern = path.display().to_string();

    let (result, largest) =
        largest_allocation(|| load_shards_with(&pattern, OnError::Fail, MemberLimits::default()));
    let e = result.expect_err("refused").to_string();
    assert!(
        e.contains("huge.tar") && e.contains("big.txt") && e.contains("data.max_text_bytes"),
        "{e}"
    );
    assert!(largest < 2 << 20, "largest allocation {largest} bytes");

    // Skipping: the good samples load, the refused one is counted.
    let ds = load_shards_with(&pattern, OnError::Skip, MemberLimits::default()).unwrap();
    assert_eq!((ds.pairs.len(), ds.skipped), (2, 1));

    // The training stream refuses it too, naming shard and member.
    let shards = Shards::resolve(&pattern, "test", 1).unwrap();
    let mut stream = PairStream::new(shards, None, OnError::Fail, Arc::default());
    let e = stream.next_dataset(3).expect_err("refused").to_string();
    assert!(
        e.contains("big.txt") && e.contains("data.max_text_bytes"),
        "{e}"
    );
}

#[test]
fn real_members_over_their_caps_are_refused_before_reading_and_the_shard_goes_on() {
    let dir = scratch("limits-real");
    let mut tail = Vec::new();
    // A real 3 MiB caption (over the default 1 MiB) and, under a lowered
    // image cap, a real image over it; then one more good sample.
    tar_entry(&mut tail, "long.png", &png());
    tar_entry(&mut tail, "long.txt", &vec![b'a'; 3 << 20]);
    tar_entry(&mut tail, "wide.png", &vec![0u8; 200_000]);
    tar_entry(&mut tail, "wide.txt", b"a wide image");
    tar_entry(&mut tail, "last.png", &png());
    tar_entry(&mut tail, "last.txt", b"the last caption");
    let path = shard(&dir, "real.tar", 1, &tail);
    let pattern = path.display().to_string();
    let limits = MemberLimits {
        image_bytes: 100_000,
        ..MemberLimits::default()
    };

    let (result, largest) =
        largest_allocation(|| load_shards_with(&pattern, OnError::Skip, limits));
    let ds = result.unwrap();
    let captions: Vec<&str> = ds.pairs.iter().map(|p| p.caption.as_str()).collect();
    assert_eq!(captions, ["caption 0", "the last caption"]);
    assert_eq!(ds.skipped, 2);
    assert!(largest < 2 << 20, "largest allocation {largest} bytes");

    let e = load_shards_with(&pattern, OnError::Fail, limits)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("real.tar") && e.contains("long.txt") && e.contains("3145728 bytes"),
        "{e}"
    );

    // Streaming, with and without reading images, agrees on what is left.
    let shards = Shards::resolve(&pattern, "test", 1)
        .unwrap()
        .with_limits(limits);
    let skipped = Arc::new(AtomicUsize::new(0));
    let mut stream = PairStream::new(shards, None, OnError::Skip, skipped.clone());
    let order: Vec<String> = stream
        .peek_order(2)
        .unwrap()
        .into_iter()
        .map(|p| p.1)
        .collect();
    assert_eq!(order, ["caption 0", "the last caption"]);
    let ds = stream.next_dataset(2).unwrap();
    assert_eq!(ds.pairs[1].caption, "the last caption");
    assert_eq!(skipped.load(std::sync::atomic::Ordering::Relaxed), 2);
}

#[test]
fn a_caption_list_over_its_cap_is_refused() {
    let dir = scratch("limits-captions");
    let mut tail = Vec::new();
    tar_entry(&mut tail, "many.png", &png());
    let json = serde_json::json!({ "caption": vec!["a cat"; 11] });
    tar_entry(&mut tail, "many.json", json.to_string().as_bytes());
    let path = shard(&dir, "many.tar", 1, &tail);
    let limits = MemberLimits {
        captions: 10,
        ..MemberLimits::default()
    };
    let pattern = path.display().to_string();
    let e = load_shards_with(&pattern, OnError::Fail, limits)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("many.json") && e.contains("data.max_captions_per_image"),
        "{e}"
    );
    let ds = load_shards_with(&pattern, OnError::Fail, MemberLimits::default()).unwrap();
    assert_eq!(ds.pairs.len(), 12);
}

#[test]
fn annotation_lines_and_caption_lists_over_their_caps_are_refused_naming_the_line() {
    let dir = scratch("limits-annotations");
    image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
    let long = serde_json::json!({"image": "a.png", "caption": "x".repeat(2 << 20)});
    let many = serde_json::json!({"image": "a.png", "caption": vec!["a cat"; 1001]});
    let good = serde_json::json!({"image": "a.png", "caption": "a good caption"});
    let path = dir.join("ann.jsonl");
    std::fs::write(&path, format!("{long}\n{many}\n{good}\n")).unwrap();

    let e = annotations::load_checked(&path, None, None, OnError::Fail)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("ann.jsonl") && e.contains(":1") && e.contains("data.max_line_bytes"),
        "{e}"
    );
    let ds = annotations::load_checked(&path, None, None, OnError::Skip).unwrap();
    assert_eq!((ds.pairs.len(), ds.skipped), (1, 2));

    // Raised line cap: the long line loads; the caption list is still over.
    let limits = AnnotationLimits {
        line_bytes: 4 << 20,
        ..AnnotationLimits::default()
    };
    let e = annotations::load_checked_within(&path, None, None, OnError::Fail, limits)
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains(":2")
            && e.contains("1001 captions")
            && e.contains("data.max_captions_per_image"),
        "{e}"
    );
    let ds = annotations::load_checked_within(&path, None, None, OnError::Skip, limits).unwrap();
    assert_eq!((ds.pairs.len(), ds.skipped), (2, 1));
}

#[test]
fn a_ten_megabyte_caption_is_cut_and_tokenises() {
    let tok = Tokenizer::builtin();
    let max_len = 30;
    let huge = "a red circle ".repeat(10_000_000 / 13 + 1);
    assert!(huge.len() >= 10_000_000);
    let ids = tok.encode(&huge, max_len);
    assert_eq!(ids.len(), max_len);
    assert_eq!(ids, tok.encode(&huge[..64 * max_len], max_len));
    let (ids_w, _) = tok.encode_words(&huge, max_len);
    assert_eq!(ids_w, ids);

    // Cut at a character boundary: two-byte characters over an odd cap.
    let accents = "é".repeat(1000);
    let mut tok = Tokenizer::builtin();
    tok.max_caption_bytes = Some(7);
    assert_eq!(tok.caption_prefix(&accents, max_len), "ééé");
    assert_eq!(tok.encode(&accents, max_len), tok.encode("ééé", max_len));

    // A tokenizer.json's tokenizer is cut the same way.
    let hf = fixture("hf/bert-h48-3heads-vocab/tokenizer.json");
    let tok = Tokenizer::from_tokenizer_json(&hf).unwrap();
    let ids = tok.encode(&huge, max_len);
    assert_eq!(ids.len(), max_len);

    // A batch carries the cut caption, so the samplers' caption preps
    // (NegGen's tagging) never see the 10 MB either.
    let dir = scratch("limits-huge-caption");
    image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
    let line = serde_json::json!({"image": "a.png", "caption": huge});
    let path = dir.join("ann.jsonl");
    std::fs::write(&path, format!("{line}\n")).unwrap();
    let limits = AnnotationLimits {
        line_bytes: 16 << 20,
        ..AnnotationLimits::default()
    };
    let ds = annotations::load_checked_within(&path, None, None, OnError::Fail, limits).unwrap();
    let loaded = micro_layers(&[]).load().unwrap();
    let cfg = vlmatch::data::loader::LoaderConfig::new(&loaded.config.data, 1, None);
    let tok = Tokenizer::builtin();
    let batch = vlmatch::data::loader::make_batch(&ds, &tok, &cfg, &[0]).unwrap();
    let cap = 64 * cfg.max_len;
    assert_eq!(batch.captions[0].len(), cap);
    assert_eq!(batch.captions[0], huge[..cap]);
}

#[test]
fn a_vocabulary_id_beyond_its_size_is_an_error_naming_the_file() {
    let dir = scratch("limits-vocab");
    let mut j: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("hf/bert-h48-3heads-vocab/tokenizer.json")).unwrap(),
    )
    .unwrap();
    j["model"]["vocab"]["zzzz"] = serde_json::json!(u32::MAX - 3);
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, j.to_string()).unwrap();
    let e = Tokenizer::from_path(&path, true).expect_err("refused");
    let e = e.to_string();
    assert!(
        e.contains(&path.display().to_string()) && e.contains("4294967292") && e.contains("zzzz"),
        "{e}"
    );
    let e = Tokenizer::from_path(&dir, true).expect_err("refused");
    assert!(e.to_string().contains("tokenizer.json"), "{e}");
    // A few unused ids (the fixture has one) are fine; an id just past the
    // bound is not.
    j["model"]["vocab"]["zzzz"] = serde_json::json!(2 * 73 + 1024);
    std::fs::write(&path, j.to_string()).unwrap();
    let e = Tokenizer::from_path(&path, true).expect_err("refused");
    assert!(e.to_string().contains("has id 1170, far past"), "{e}");
    j["model"]["vocab"]["zzzz"] = serde_json::json!(100);
    std::fs::write(&path, j.to_string()).unwrap();
    assert_eq!(Tokenizer::from_path(&path, true).unwrap().vocab_size(), 101);
}

#[test]
fn data_limit_keys_have_defaults_and_refuse_zero() {
    let cfg = micro_layers(&[]).load().unwrap().config.data;
    assert_eq!(
        MemberLimits::from_config(&cfg),
        MemberLimits {
            image_bytes: 64 << 20,
            text_bytes: 1 << 20,
            captions: 1000
        }
    );
    assert_eq!(
        AnnotationLimits::from_config(&cfg),
        AnnotationLimits {
            line_bytes: 1 << 20,
            captions: 1000
        }
    );
    assert_eq!(cfg.caption_bytes(), 64 * cfg.max_len as usize);
    for key in [
        "data.max_image_bytes",
        "data.max_text_bytes",
        "data.max_caption_bytes",
        "data.max_line_bytes",
        "data.max_captions_per_image",
    ] {
        let e = micro_layers(&[&format!("{key}=0")])
            .load()
            .err()
            .unwrap_or_else(|| panic!("{key} = 0 accepted"))
            .to_string();
        assert!(e.contains(key), "{e}");
    }
    let cfg = micro_layers(&["data.max_caption_bytes=100"])
        .load()
        .unwrap()
        .config
        .data;
    assert_eq!(cfg.caption_bytes(), 100);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Whatever size a header claims (up to 2^63), for whichever kind of
    /// member, reading the shard returns samples or an error, never panics,
    /// and allocates nothing near the claimed size: at most the 1 MiB text
    /// cap's worth plus buffers.
    #[test]
    fn a_random_huge_size_in_a_header_allocates_nothing_large(
        size in prop_oneof![
            (1u64 << 20)..(1u64 << 34),
            (1u64 << 34)..(1u64 << 63),
        ],
        name in prop::sample::select(vec!["x.txt", "x.json", "x.png", "x.jpg", "x.cls"]),
        body in prop::collection::vec(any::<u8>(), 0..2048),
        skip in any::<bool>(),
    ) {
        let dir = scratch("limits-props");
        let mut tail = Vec::new();
        tail.extend_from_slice(&tar_header(name, size));
        tail.extend_from_slice(&body);
        tail.resize(tail.len().div_ceil(512) * 512, 0);
        let path = shard(&dir, "p.tar", 1, &tail);
        let pattern = path.display().to_string();
        let on_error = if skip { OnError::Skip } else { OnError::Fail };
        let (result, largest) = largest_allocation(|| {
            std::panic::catch_unwind(|| {
                load_shards_with(&pattern, on_error, MemberLimits::default()).map(|d| d.pairs.len())
            })
        });
        prop_assert!(result.is_ok(), "panicked");
        prop_assert!(largest < (1 << 20) + (256 << 10), "largest allocation {largest} bytes");
    }
}

/// The keys reach the readers a run uses: the training annotations
/// (`setup::datasets`) with `data.max_line_bytes` and
/// `data.max_captions_per_image`, and the run's tokenizer with
/// `data.max_caption_bytes`.
#[test]
fn a_runs_config_sets_the_limits_its_readers_use() {
    let dir = scratch("limits-config");
    image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
    let line = serde_json::json!({"image": "a.png", "caption": "a red square on a blue ground"});
    let path = dir.join("ann.jsonl");
    std::fs::write(&path, format!("{line}\n{line}\n")).unwrap();
    let ann = format!("data.annotations=\"{}\"", path.display());
    let sets = [
        "data.source=\"annotations\"",
        ann.as_str(),
        "data.max_line_bytes=20",
    ];
    let loaded = micro_layers(&sets).load().unwrap();
    let Err(e) = vlmatch::setup::datasets(&loaded) else {
        panic!("lines over 20 bytes are refused");
    };
    let e = e.to_string();
    assert!(
        e.contains("data.max_line_bytes") && e.contains("ann.jsonl"),
        "{e}"
    );
    let sets = [
        "data.source=\"annotations\"",
        ann.as_str(),
        "data.max_caption_bytes=5",
    ];
    let loaded = micro_layers(&sets).load().unwrap();
    let (train, _) = vlmatch::setup::datasets(&loaded).unwrap();
    assert_eq!(train.pairs.len(), 2);
    let tok = vlmatch::setup::tokenizer(&loaded).unwrap();
    assert_eq!(tok.max_caption_bytes, Some(5));
    assert_eq!(
        tok.encode("a red square on a blue ground", 32),
        tok.encode("a red", 32),
        "cut to 5 bytes before tokenising"
    );
}

/// An image whose read never returns (here a FIFO nobody writes, as a hung
/// network file system would behave): the loader is named after
/// `data.stall_timeout` and fails after three times that, naming the file,
/// instead of waiting forever.
#[test]
fn a_loader_stuck_on_a_file_fails_naming_it() {
    let dir = scratch("limits-stall");
    image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
    let fifo = dir.join("stuck.png");
    std::fs::copy(dir.join("a.png"), &fifo).unwrap();
    let mut lines = String::new();
    for image in ["stuck.png", "a.png", "a.png", "a.png"] {
        let line = serde_json::json!({"image": image, "caption": "a red square"});
        lines.push_str(&format!("{line}\n"));
    }
    let path = dir.join("ann.jsonl");
    std::fs::write(&path, lines).unwrap();
    let ds = annotations::load_checked(&path, None, None, OnError::Fail).unwrap();
    // Listed as a file; by the time the loader reads it, it never answers.
    std::fs::remove_file(&fifo).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let loaded = micro_layers(&[]).load().unwrap();
    let mut cfg = vlmatch::data::loader::LoaderConfig::new(&loaded.config.data, 4, Some(1));
    cfg.stall_timeout = std::time::Duration::from_millis(300);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut loader = vlmatch::data::loader::Loader::new(
            Arc::new(ds),
            Arc::new(Tokenizer::builtin()),
            cfg,
            0,
        )
        .unwrap();
        let _ = tx.send(loader.next_batch().map(|_| ()).map_err(|e| e.to_string()));
    });
    let started = std::time::Instant::now();
    let outcome = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the loader must give up on a file that never reads");
    let e = outcome.expect_err("no batch can be made");
    let waited = started.elapsed().as_secs_f64();
    assert!(
        e.contains(&fifo.display().to_string()) && e.contains("data.stall_timeout"),
        "{e}"
    );
    assert!(
        waited >= 0.9,
        "failed after {waited:.2} s, before 3 x 0.3 s"
    );
}

/// The downstream readers (VQA questions, zero-shot labels) read under the
/// run's limits too, not the defaults.
#[test]
fn vqa_files_are_read_under_the_runs_limits() {
    let dir = scratch("limits-vqa");
    image::RgbImage::new(4, 4).save(dir.join("a.png")).unwrap();
    let line = serde_json::json!({"image": "a.png", "question": "what colour is the square?", "answer": "red"});
    let path = dir.join("vqa.jsonl");
    std::fs::write(&path, format!("{line}\n{line}\n")).unwrap();
    let loaded = micro_layers(&[]).load().unwrap();
    let set = vlmatch::downstream::vqa::load(&path, None, &loaded.config, true).unwrap();
    assert_eq!(set.answers.len(), 2);
    let loaded = micro_layers(&["data.max_line_bytes=20"]).load().unwrap();
    let Err(e) = vlmatch::downstream::vqa::load(&path, None, &loaded.config, true) else {
        panic!("lines over 20 bytes are refused");
    };
    let e = e.to_string();
    assert!(
        e.contains("data.max_line_bytes") && e.contains("vqa.jsonl"),
        "{e}"
    );
}
