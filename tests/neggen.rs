//! NegGen: golden tagging, the change property (only noun/adjective words
//! change, same word count, never the caption itself), the positive filter,
//! and training with NegGen negatives in FG-ITM.

mod common;
use common::*;
use neggen::{
    candidate_words, default_tags_vec, fill, is_positive, mark_candidates, piece_masks, plan,
    realise, BrillTagger,
};
use proptest::prelude::*;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};
use vlmatch::tokenizer::{Codec, Tokenizer};
use vlmatch_core::TextCodec;

/// Each line: a caption, a tab, the caption with NegGen's candidate words in
/// brackets (written by `cargo run -p vlmatch-neggen --example tag_captions`).
#[test]
fn tagging_of_coco_like_captions_is_unchanged() {
    let tagger = BrillTagger::new();
    let golden = std::fs::read_to_string(fixture("tagging.txt")).unwrap();
    let mut n = 0;
    for line in golden.lines() {
        let (caption, marked) = line.split_once('\t').unwrap();
        let ours = mark_candidates(caption, &tagger, &default_tags_vec());
        assert_eq!(ours, marked, "tags changed for `{caption}`");
        n += 1;
    }
    assert!(n >= 30, "only {n} golden captions");
}

fn codec() -> Codec {
    Codec {
        tokenizer: Arc::new(Tokenizer::builtin()),
        max_len: 64,
    }
}

const WORDS: [&str; 16] = [
    "a", "red", "blue", "small", "circle", "square", "dog", "man", "on", "the", "table", "left",
    "of", "and", "green", "tree",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// With any generator (random logits here), a negative keeps the word
    /// count, changes only words tagged noun or adjective, and is never the
    /// caption itself.
    #[test]
    fn negatives_change_only_noun_and_adjective_words(
        picks in prop::collection::vec(0usize..16, 1..10),
        seed in 0i64..10_000,
    ) {
        let caption = picks.iter().map(|&i| WORDS[i]).collect::<Vec<_>>().join(" ");
        let codec = codec();
        let tagger = BrillTagger::new();
        let tags = default_tags_vec();
        let cands = candidate_words(&caption, &tagger, &tags);
        prop_assume!(!cands.is_empty());
        tch::manual_seed(seed);
        let k = 1 + (seed as usize) % cands.len();
        let chosen: Vec<usize> = cands.iter().copied().take(k).collect();
        let p = plan(&caption, &chosen, &codec).unwrap();
        let masks = piece_masks(&codec, Device::Cpu);
        let v = codec.vocab_size();
        let filled = fill(std::slice::from_ref(&p), codec.special(), &masks, 1.0, 0, Device::Cpu, |t| {
            Ok(Tensor::randn([t.ids.size()[0], t.ids.size()[1], v], (Kind::Float, Device::Cpu)) * 3.0)
        })
        .unwrap();
        let negative = realise(&p, &filled[0], &codec);
        let a: Vec<&str> = caption.split(' ').collect();
        let b: Vec<&str> = negative.split(' ').collect();
        prop_assert_eq!(a.len(), b.len(), "`{}` -> `{}`", caption, negative);
        prop_assert_ne!(&negative, &caption);
        for i in 0..a.len() {
            if a[i] != b[i] {
                prop_assert!(chosen.contains(&i) && cands.contains(&i), "word {} changed in `{}` -> `{}`", i, caption, negative);
            }
        }
    }
}

#[test]
fn the_filter_drops_a_candidate_that_is_a_caption_of_the_image() {
    let captions = vec![
        "A red circle on the left".to_string(),
        "a blue circle on the left".to_string(),
        "a dog".to_string(),
    ];
    let ids = [7, 7, 8];
    // Generated from caption 0 by swapping red -> blue: that is caption 1 of the same image.
    assert!(is_positive(
        "a blue  circle on the left",
        7,
        &captions,
        &ids
    ));
    // The same text is a fine negative for another image.
    assert!(!is_positive(
        "a blue circle on the left",
        8,
        &captions,
        &ids
    ));
    assert!(!is_positive(
        "a green circle on the left",
        7,
        &captions,
        &ids
    ));
}

#[test]
fn fgitm_trains_with_neggen_negatives() {
    let dir = scratch("neggen-train");
    let s = run(
        &dir,
        &[
            "model.generator.plugin=\"mlm_head\"",
            "objectives.itm.samplers=[\"hard_negative\", \"neggen\"]",
            "samplers.neggen.plugin=\"neggen\"",
            "samplers.neggen.filter_after_steps=3",
            // An untrained generator's fills are rarely nouns; this test is
            // about the plumbing, so the fluency check is off.
            "samplers.neggen.pos_check=false",
            "train.steps=5",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.last_step, 5);
    assert!(
        s.logged.iter().all(|m| m["itm_acc_neggen"].is_number()),
        "{:?}",
        s.logged[0]
    );
    // NegGen's counters per batch are in metrics.jsonl: every caption of a
    // batch is seen, and what is produced, dropped or lacks a candidate adds
    // up to no more than the candidates tried.
    let batch = 8.0;
    for m in &s.logged {
        let get = |k: &str| {
            m[format!("itm_neggen_{k}").as_str()]
                .as_f64()
                .unwrap_or(-1.0)
        };
        assert_eq!(get("captions"), batch, "{m:?}");
        let (produced, none, dropped) = (
            get("produced"),
            get("no_candidate"),
            get("dropped_by_filter"),
        );
        assert!(produced >= 0.0 && none >= 0.0 && dropped >= 0.0, "{m:?}");
        assert!(produced + none <= batch, "{m:?}");
    }
    // Before filter_after_steps the ITM filter is off: only candidates
    // equal to a positive caption are dropped.
    assert!(s
        .logged
        .iter()
        .any(|m| m["itm_neggen_produced"].as_f64().unwrap() > 0.0));
}

#[test]
fn offline_neggen_writes_provenance_and_training_reads_it_back() {
    let dir = scratch("neggen-offline");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=3", "eval.at_end=false"], None).unwrap();
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let mut ann = String::new();
    for (name, rgb) in [
        ("red", [220u8, 40, 40]),
        ("blue", [40, 80, 220]),
        ("green", [40, 170, 60]),
    ] {
        image::RgbImage::from_pixel(16, 16, image::Rgb(rgb))
            .save(images.join(format!("{name}.png")))
            .unwrap();
        ann.push_str(&format!(
            "{{\"image\": \"{name}.png\", \"caption\": [\"a small {name} circle on the left\", \"one {name} square\", \"on it\"]}}\n"
        ));
    }
    let data = dir.join("ann.jsonl");
    std::fs::write(&data, ann).unwrap();
    let out = dir.join("negatives.jsonl");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    // Threshold 1: the (untrained) ITM filter keeps everything, so each
    // caption with a noun or adjective yields a line.
    let summary = vlmatch::cli::neggen_offline(
        &run_dir,
        &data,
        Some(&images),
        &out,
        &[
            "samplers.neggen.plugin=\"neggen\"".into(),
            "samplers.neggen.filter_threshold=1.0".into(),
            "samplers.neggen.pos_check=false".into(),
        ],
        false,
    )
    .unwrap();
    drop(_turn);
    assert!(
        summary.contains("9 captions") && summary.contains("3 without a noun/adjective"),
        "{summary}"
    );
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    let tags = default_tags_vec();
    for l in &lines {
        let caption = l["caption"].as_str().unwrap();
        let negative = l["negative"].as_str().unwrap();
        assert_ne!(caption, negative);
        assert!(l["image"].as_str().unwrap().ends_with(".png") && l["image_id"].is_number());
        assert!(l["itm_score"]
            .as_f64()
            .is_some_and(|p| (0.0..=1.0).contains(&p)));
        let words: Vec<&str> = negative.split(' ').collect();
        for m in l["masked_words"].as_array().unwrap() {
            let i = m["index"].as_u64().unwrap() as usize;
            assert!(
                tags.contains(&m["tag"].as_str().unwrap().to_string()),
                "{m}"
            );
            assert_eq!(caption.split(' ').nth(i), m["original"].as_str());
            assert_eq!(Some(words[i]), m["replacement"].as_str());
        }
    }

    // The cache is a negative source for FG-ITM.
    let path = format!("samplers.cache.path=\"{}\"", out.display());
    let s = run(
        &dir.join("from-cache"),
        &[
            "objectives.itm.samplers=[\"hard_negative\", \"cache\"]",
            "samplers.cache.plugin=\"neggen_cache\"",
            &path,
            "data.source=\"annotations\"",
            &format!("data.annotations=\"{}\"", data.display()),
            &format!("data.image_root=\"{}\"", images.display()),
            "train.batch_size=9",
            "train.steps=2",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    assert!(
        s.logged[1]["itm_acc_cache"].is_number(),
        "{:?}",
        s.logged[1]
    );
}

/// NegGen's fluency check: a candidate passes only when its replacements
/// are still nouns or adjectives in the new caption.
#[test]
fn pos_check_rejects_fills_of_another_kind() {
    use neggen::{default_tags_vec, replacements_keep_their_kind, BrillTagger};
    let tagger = BrillTagger::new();
    let tags = default_tags_vec();
    // "a red car on a black background": red (1) and background (6) masked.
    assert!(replacements_keep_their_kind(
        "a blue car on a black table",
        &[1, 6],
        &tagger,
        &tags
    ));
    assert!(!replacements_keep_their_kind(
        "a blue car on a black in",
        &[1, 6],
        &tagger,
        &tags
    ));
    assert!(!replacements_keep_their_kind(
        "a the car on a black table",
        &[1, 6],
        &tagger,
        &tags
    ));
}
