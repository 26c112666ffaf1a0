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
}
