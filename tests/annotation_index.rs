//! The annotation index (`vlmatch::data::index`) returns what the JSON
//! loader returns: the same pairs, images, ids and skipped entries, for JSON
//! lines and JSON arrays, and so the same batches for a seed; it is cached
//! beside the file and rebuilt when the file changes.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use vlmatch::data::annotations::{load_checked_within, AnnotationLimits};
use vlmatch::data::index::AnnotationIndex;
use vlmatch::data::loader::{Loader, LoaderConfig};
use vlmatch::data::{Dataset, OnError};
use vlmatch::tokenizer::Tokenizer;

/// Four small images in `dir/images`.
fn images(dir: &Path) -> PathBuf {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    for i in 0..4u8 {
        image::RgbImage::from_pixel(12, 12, image::Rgb([40 * i, 90, 200 - 30 * i]))
            .save(images.join(format!("{i}.png")))
            .unwrap();
    }
    images
}

/// Entries good and bad: captions as strings and lists, ids as numbers,
/// strings or absent, an image named twice; a missing caption, a missing
/// image file, a wrong `image_id`, a path escaping the root.
fn entries() -> Vec<String> {
    [
        r#"{"image": "0.png", "caption": "a red square", "image_id": 7}"#,
        r#"{"image": "1.png", "caption": ["two words", "then three words"]}"#,
        r#"{"image": "missing.png", "caption": "not there"}"#,
        r#"{"image": "2.png", "text": "no caption field"}"#,
        r#"{"image": "2.png", "caption": "a named id", "image_id": "coco-2"}"#,
        r#"{"image": "0.png", "caption": "the first image again", "image_id": 7}"#,
        r#"{"image": "3.png", "caption": "bad id", "image_id": 1.5}"#,
        r#"{"image": "../0.png", "caption": "outside the root"}"#,
        r#"{"image": "3.png", "caption": ["x", "y", "z"], "image_id": "coco-3"}"#,
        r#"{"image": "1.png", "caption": "one more of image one, \"quoted\", with [brackets]"}"#,
    ]
    .map(String::from)
    .to_vec()
}

fn same(a: &Dataset, b: &Dataset) {
    assert_eq!(a.name, b.name);
    assert_eq!(format!("{:?}", a.images), format!("{:?}", b.images));
    assert_eq!(a.image_ids, b.image_ids);
    assert_eq!(format!("{:?}", a.pairs), format!("{:?}", b.pairs));
    assert_eq!(a.skipped, b.skipped);
}

fn limits() -> AnnotationLimits {
    AnnotationLimits::default()
}

#[test]
fn json_lines_index_gives_the_loaders_pairs_skipped_lines_included() {
    let dir = scratch("index-lines");
    let root = images(&dir);
    let mut text: Vec<u8> = b"\xef\xbb\xbf".to_vec();
    for (i, e) in entries().iter().enumerate() {
        text.extend_from_slice(e.as_bytes());
        text.extend_from_slice(if i % 3 == 0 { b"\r\n" } else { b"\n" });
        if i == 4 {
            text.extend_from_slice(b"\n   \n{not json}\n\xff\xfe not utf-8\n");
        }
    }
    let path = dir.join("train.jsonl");
    std::fs::write(&path, &text).unwrap();
    let want = load_checked_within(&path, Some(&root), None, OnError::Skip, limits()).unwrap();
    assert_eq!(want.skipped, 6, "the bad lines are skipped by the loader");
    let ix = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
    assert!(!ix.cached);
    assert_eq!(ix.cache, Some(dir.join(".train.jsonl.vlmatch-index")));
    let got = ix.to_dataset().unwrap();
    same(&want, &got);
    assert_eq!(
        (ix.len(), ix.image_count()),
        (want.len(), want.images.len())
    );
    let per_caption =
        std::fs::metadata(ix.cache.as_ref().unwrap()).unwrap().len() as f64 / ix.len() as f64;
    eprintln!("index: {per_caption:.1} bytes per caption on this small file");

    // From the cache, the same again.
    let again = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
    assert!(again.cached);
    same(&want, &again.to_dataset().unwrap());

    // Under data.on_error = "fail" both refuse, naming the same line.
    let e1 = load_checked_within(&path, Some(&root), None, OnError::Fail, limits())
        .unwrap_err()
        .to_string();
    let e2 = AnnotationIndex::open(&path, Some(&root), OnError::Fail, limits())
        .err()
        .unwrap()
        .to_string();
    assert_eq!(e1, e2);

    // A changed file is indexed anew.
    let mut more = text.clone();
    more.extend_from_slice(br#"{"image": "3.png", "caption": "appended"}"#);
    std::fs::write(&path, &more).unwrap();
    let changed = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
    assert!(!changed.cached);
    let want = load_checked_within(&path, Some(&root), None, OnError::Skip, limits()).unwrap();
    same(&want, &changed.to_dataset().unwrap());
    assert_eq!(want.pairs.last().unwrap().caption, "appended");
}

#[test]
fn json_array_index_gives_the_loaders_pairs_and_batches() {
    let dir = scratch("index-array");
    let root = images(&dir);
    let text = format!("[\n  {}\n]\n", entries().join(",\n  "));
    let path = dir.join("train.json");
    std::fs::write(&path, text).unwrap();
    let want = load_checked_within(&path, Some(&root), None, OnError::Skip, limits()).unwrap();
    assert_eq!(want.skipped, 4);
    let ix = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
    let got = ix.to_dataset().unwrap();
    same(&want, &got);

    // The same batches for a seed, through the training loader.
    let loaded = micro_layers(&[]).load().unwrap();
    let tok = Arc::new(Tokenizer::builtin());
    let cfg = LoaderConfig::new(&loaded.config.data, 4, Some(11));
    let mut a = Loader::new(Arc::new(want), tok.clone(), cfg.clone(), 0).unwrap();
    let mut b = Loader::new(Arc::new(got), tok, cfg, 0).unwrap();
    for _ in 0..5 {
        let (x, y) = (a.next_batch().unwrap(), b.next_batch().unwrap());
        assert_eq!(x.captions, y.captions);
        assert!(x.images.equal(&y.images));
        assert!(x.image_ids.equal(&y.image_ids));
        assert!(x.text.ids.equal(&y.text.ids));
    }

    // A document that is not JSON, or not UTF-8, is refused by both with
    // the same error, naming the file and line.
    let not_json = b"[{\"image\": \"0.png\", \"caption\": \"x\"},\n, ]".to_vec();
    let not_utf8 = b"[{\"image\": \"0.png\",\n \"caption\": \"\xc3\x28\"}]".to_vec();
    for (text, what) in [(not_json, "invalid JSON"), (not_utf8, "invalid UTF-8")] {
        std::fs::write(&path, text).unwrap();
        let want = load_checked_within(&path, Some(&root), None, OnError::Skip, limits())
            .unwrap_err()
            .to_string();
        let e = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits())
            .err()
            .unwrap()
            .to_string();
        assert_eq!(e, want);
        assert!(e.contains(what) && e.contains("train.json:2"), "{e}");
    }
}

/// One entry of a random file: a kind of good or bad entry, an image, a
/// caption word.
fn entry_text(kind: u8, image: u8, word: &str) -> String {
    let img = format!("{}.png", image % 4);
    match kind % 9 {
        0 => format!(r#"{{"image": "{img}", "caption": "{word}"}}"#),
        1 => format!(r#"{{"image": "{img}", "caption": ["{word}", "{word} two"]}}"#),
        2 => format!(r#"{{"image": "{img}", "caption": "{word}", "image_id": {image}}}"#),
        3 => format!(r#"{{"image": "{img}", "caption": "{word}", "image_id": "n{image}"}}"#),
        4 => format!(r#"{{"image": "gone-{image}.png", "caption": "{word}"}}"#),
        5 => format!(r#"{{"image": "{img}", "text": "{word}"}}"#),
        6 => format!(r#"{{"image": "{img}", "caption": [1, 2]}}"#),
        7 => format!(r#"{{"image": "{img}", "caption": "{word}", "image_id": 0.5}}"#),
        _ => format!(r#"{{"image": "{img}", "caption": "{word} \"with\" [a, {{brace}}]"}}"#),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// For any mix of good and bad entries, as JSON lines (with blank,
    /// unparsable and non-UTF-8 lines, CRLF endings) or as a JSON array, the
    /// index gives what the JSON loader gives, under "skip" and "fail".
    #[test]
    fn the_index_agrees_with_the_loader_on_any_file(
        entries in proptest::collection::vec((0u8..12, 0u8..6, "[a-z]{1,8}"), 1..24),
        array in proptest::bool::ANY,
        crlf in proptest::bool::ANY,
    ) {
        static CASE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = scratch(&format!("index-prop-{n}"));
        let root = images(&dir);
        let eol: &[u8] = if crlf { b"\r\n" } else { b"\n" };
        let mut text = Vec::new();
        let path = if array {
            let items: Vec<String> = entries
                .iter()
                .map(|(k, i, w)| entry_text(*k, *i, w))
                .collect();
            text.extend_from_slice(format!("[{}]", items.join(",\n")).as_bytes());
            dir.join("a.json")
        } else {
            for (k, i, w) in &entries {
                match k {
                    9 => text.extend_from_slice(b"{broken"),
                    10 => text.extend_from_slice(b"\xff\xfe"),
                    11 => {}
                    _ => text.extend_from_slice(entry_text(*k, *i, w).as_bytes()),
                }
                text.extend_from_slice(eol);
            }
            dir.join("a.jsonl")
        };
        std::fs::write(&path, &text).unwrap();
        for on_error in [OnError::Skip, OnError::Fail] {
            let want = load_checked_within(&path, Some(&root), None, on_error, limits());
            let got = AnnotationIndex::open(&path, Some(&root), on_error, limits())
                .and_then(|ix| ix.to_dataset());
            match (want, got) {
                (Ok(a), Ok(b)) => same(&a, &b),
                (Err(a), Err(b)) => proptest::prop_assert_eq!(a.to_string(), b.to_string()),
                (a, b) => proptest::prop_assert!(
                    false,
                    "loader {:?} vs index {:?}",
                    a.map(|d| d.len()),
                    b.map(|d| d.len())
                ),
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A cache is read, never believed: records damaged in place (offsets past
/// the file, an image number past the images, counts that overflow) make
/// the index rebuild from the file, with the loader's pairs, not panic.
#[test]
fn a_damaged_cache_is_rebuilt_not_believed() {
    let dir = scratch("index-damaged-cache");
    let root = images(&dir);
    let path = dir.join("train.jsonl");
    std::fs::write(&path, entries().join("\n") + "\n").unwrap();
    let expected = load_checked_within(&path, Some(&root), None, OnError::Skip, limits()).unwrap();
    let ix = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
    let cache = ix.cache.clone().unwrap();
    drop(ix);
    let good = std::fs::read(&cache).unwrap();
    let header = good.len() - 24 * (expected.images.len() + expected.pairs.len());
    let mut damaged = Vec::new();
    // Every byte of the first image and first pair records set high.
    for record in [header, header + 24 * expected.images.len()] {
        for at in 0..24 {
            let mut b = good.clone();
            b[record + at] = 0xff;
            damaged.push(b);
        }
    }
    // The image and pair counts (header words 6 and 7) made huge.
    for word in [6, 7] {
        let mut b = good.clone();
        b[8 + 8 * word..16 + 8 * word].copy_from_slice(&u64::MAX.to_le_bytes());
        damaged.push(b);
    }
    for b in damaged {
        std::fs::write(&cache, &b).unwrap();
        let ix = AnnotationIndex::open(&path, Some(&root), OnError::Skip, limits()).unwrap();
        same(&ix.to_dataset().unwrap(), &expected);
    }
}
