//! The positive relation (`vlmatch_core::positives`): duplicate captions and
//! duplicate images are positives of each other, no sampler draws one as a
//! negative, and distinct pairs stay negatives. Checked on random batches
//! with a plain re-statement of the rule, and through the real loader.

mod common;
use proptest::prelude::*;
use std::collections::BTreeMap;
use tch::{Kind, Tensor};
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::data::{Dataset, Pair};
use vlmatch::tokenizer::Tokenizer;
use vlmatch_core::{Batch, PositiveRule, TextBatch};

/// A batch of `captions` (token ids without padding, padded here to `len`)
/// with the given image ids and image keys.
fn batch(
    captions: &[Vec<i64>],
    len: usize,
    ids: &[i64],
    keys: &[i64],
    rule: PositiveRule,
) -> Batch {
    let b = captions.len() as i64;
    let mut tok = Vec::new();
    let mut mask = Vec::new();
    for c in captions {
        for l in 0..len {
            tok.push(c.get(l).copied().unwrap_or(0));
            mask.push(i64::from(l < c.len()));
        }
    }
    Batch {
        images: Tensor::zeros([b, 3, 2, 2], (Kind::Float, tch::Device::Cpu)),
        text: TextBatch::new(
            Tensor::from_slice(&tok).view([b, len as i64]),
            Tensor::from_slice(&mask).view([b, len as i64]),
        ),
        image_ids: Tensor::from_slice(ids),
        image_keys: Tensor::from_slice(keys),
        positive_rule: rule,
        sample_keys: Tensor::arange(b, (Kind::Int64, tch::Device::Cpu)),
        sample_keys_host: (0..b).collect(),
        captions: vec![String::new(); captions.len()],
        pairs: Vec::new(),
        prepared: BTreeMap::new(),
    }
}

fn matrix(t: &Tensor) -> Vec<Vec<bool>> {
    let n = t.size()[0];
    (0..n)
        .map(|i| Vec::<bool>::try_from(t.get(i)).unwrap())
        .collect()
}

/// Random batches drawn from few ids, image keys and captions, so that
/// duplicates of every kind are common. Captions start with [CLS] (2).
fn batches() -> impl Strategy<Value = (Vec<Vec<i64>>, Vec<i64>, Vec<i64>, usize)> {
    (2usize..14).prop_flat_map(|b| {
        (
            prop::collection::vec(
                prop::collection::vec(0i64..4, 0..4).prop_map(|mut c| {
                    c.insert(0, 2);
                    c
                }),
                b,
            ),
            prop::collection::vec(0i64..5, b),
            prop::collection::vec(0i64..5, b),
            0usize..3,
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn duplicates_are_positives_and_distinct_pairs_negatives(
        (captions, ids, keys, extra_pad) in batches(),
        seed in 0i64..1000,
    ) {
        let len = captions.iter().map(Vec::len).max().unwrap() + extra_pad;
        let n = captions.len();
        let identical = batch(&captions, len, &ids, &keys, PositiveRule::Identical);
        let albef = batch(&captions, len, &ids, &keys, PositiveRule::ImageId);
        let pos = matrix(&identical.positives());
        let pos_albef = matrix(&albef.positives());
        for i in 0..n {
            for j in 0..n {
                let expected = ids[i] == ids[j] || keys[i] == keys[j] || captions[i] == captions[j];
                prop_assert_eq!(pos[i][j], expected, "pair ({}, {})", i, j);
                prop_assert_eq!(pos_albef[i][j], ids[i] == ids[j]);
            }
        }

        // The hard-negative sampler never draws a positive, even when the
        // duplicates are by far the most similar (as they are in training).
        tch::manual_seed(seed);
        let mut sim = Tensor::randn([n as i64, n as i64], (Kind::Float, tch::Device::Cpu));
        sim += identical.positives().to_kind(Kind::Float) * 30.0;
        for draw in 0..4i64 {
            for (s, name) in [(&sim, "i2t"), (&sim.tr(), "t2i")] {
                let keys = Tensor::arange(n as i64, (Kind::Int64, tch::Device::Cpu)) + (seed * 8 + draw) * 1000;
                let u = vlmatch_core::random::uniform(&keys, 1).squeeze_dim(1);
                let drawn = Vec::<i64>::try_from(
                    hard_negative::sample_hard_negatives(s, &identical.positives(), &u),
                ).unwrap();
                for (i, &j) in drawn.iter().enumerate() {
                    let any_negative = (0..n).any(|j| !pos[i][j]);
                    if j < 0 {
                        prop_assert!(!any_negative, "{}: row {} has a negative but drew none", name, i);
                    } else {
                        prop_assert!(!pos[i][j as usize], "{}: row {} drew its positive {}", name, i, j);
                    }
                }
            }
        }

        // ITC spreads each row's target over exactly its positives: the
        // loss is minimal (log of the positive count) when similarities put
        // all mass evenly on them, and any positive's logit lowers it.
        let positives = identical.positives();
        let strong = positives.to_kind(Kind::Float) * 50.0;
        let loss = itc::itc_loss(&strong, &positives).double_value(&[]);
        let counts: Vec<f64> = (0..n).map(|i| pos[i].iter().filter(|&&p| p).count() as f64).collect();
        let floor = counts.iter().map(|c| c.ln()).sum::<f64>() / n as f64;
        prop_assert!((loss - floor).abs() < 1e-3, "ITC loss {} vs floor {}", loss, floor);

        // A generated text is a negative for image i unless it is a caption
        // of one of i's positives.
        let rows: Vec<i64> = (0..n as i64).collect();
        let shifted: Vec<Vec<i64>> = (0..n).map(|i| captions[(i + 1) % n].clone()).collect();
        let texts = batch(&shifted, len, &ids, &keys, PositiveRule::Identical).text;
        let flagged = Vec::<bool>::try_from(
            identical.text_is_positive(&Tensor::from_slice(&rows), &texts),
        ).unwrap();
        for i in 0..n {
            let expected = (0..n).any(|j| pos[i][j] && captions[j] == shifted[i]);
            prop_assert_eq!(flagged[i], expected, "text {} for image {}", (i + 1) % n, i);
        }
    }

    #[test]
    fn text_keys_ignore_padding_and_tell_token_sequences_apart(
        a in prop::collection::vec(0i64..30_000, 1..20),
        b in prop::collection::vec(0i64..30_000, 1..20),
        pad in 0usize..5,
    ) {
        let len = a.len().max(b.len()) + pad;
        let one = batch(&[a.clone(), b.clone()], len, &[0, 1], &[0, 1], PositiveRule::Identical);
        let wide = batch(&[a.clone(), b.clone()], len + 3, &[0, 1], &[0, 1], PositiveRule::Identical);
        let k1 = Vec::<i64>::try_from(vlmatch_core::positives::text_keys(&one.text)).unwrap();
        let k2 = Vec::<i64>::try_from(vlmatch_core::positives::text_keys(&wide.text)).unwrap();
        prop_assert_eq!(&k1, &k2);
        prop_assert_eq!(k1[0] == k1[1], a == b);
    }
}

/// Through the real loader: two ids whose images are the same scene, and
/// two scenes that share a caption, are positives; the ALBEF rule keeps
/// only the ids.
#[test]
fn the_loader_marks_identical_images_and_captions() {
    let made = Dataset::synthetic("t", 1234, 0, 3, 1);
    let mut ds = made.clone();
    // Image 3 is image 0 again under another id; pair 4 repeats pair 1's caption for image 2.
    ds.images.push(made.images[0].clone());
    ds.image_ids.push(99);
    ds.pairs = vec![
        Pair {
            image: 0,
            caption: "a red circle".into(),
        },
        Pair {
            image: 1,
            caption: "a blue square".into(),
        },
        Pair {
            image: 2,
            caption: "a green triangle".into(),
        },
        Pair {
            image: 3,
            caption: "a small red circle".into(),
        },
        Pair {
            image: 2,
            caption: "a blue square".into(),
        },
    ];
    let tok = Tokenizer::builtin();
    let data = common::micro_layers(&[]).load().unwrap().config.data;
    for (rule, expected) in [
        (
            "identical",
            [
                [1, 0, 0, 1, 0],
                [0, 1, 0, 0, 1],
                [0, 0, 1, 0, 1],
                [1, 0, 0, 1, 0],
                [0, 1, 1, 0, 1],
            ],
        ),
        (
            "image_id",
            [
                [1, 0, 0, 0, 0],
                [0, 1, 0, 0, 0],
                [0, 0, 1, 0, 1],
                [0, 0, 0, 1, 0],
                [0, 0, 1, 0, 1],
            ],
        ),
    ] {
        let mut data = data.clone();
        data.positives = match rule {
            "identical" => vlmatch_registry::config::Positives::Identical,
            _ => vlmatch_registry::config::Positives::ImageId,
        };
        let cfg = LoaderConfig::new(&data, 5, None);
        let b = make_batch(&ds, &tok, &cfg, &[0, 1, 2, 3, 4]).unwrap();
        let got: Vec<Vec<i64>> = matrix(&b.positives())
            .into_iter()
            .map(|r| r.into_iter().map(i64::from).collect())
            .collect();
        assert_eq!(got, expected.map(|r| r.to_vec()).to_vec(), "rule {rule}");
    }
}
