//! ALBEF's augmentations (`[data.augment]`, `src/data/augment/`): each op
//! against the reference's output (`tests/golden/make_augment.py`: ALBEF's
//! OpenCV definitions, torchvision's crop and flip), the draws keyed by
//! seed, sample and epoch, and the loader contracts that keying keeps with
//! augmentation on: resuming mid-run and splitting a global batch over
//! ranks give the same batches.

mod common;
use common::*;

use image::RgbImage;
use proptest::prelude::*;
use std::sync::Arc;
use vlmatch::data::augment::{
    apply_op, color, geometry, resample, swap_left_right, AppliedOp, AugKey, Augment, Draws,
};
use vlmatch::data::loader::{make_batch, Loader, LoaderConfig, Source};
use vlmatch::tokenizer::Tokenizer;
use vlmatch_registry::config::{AugmentConfig, AugmentOp};

fn png(name: &str) -> RgbImage {
    image::open(fixture("augment").join(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        .to_rgb8()
}

/// Mean and largest absolute difference, in levels of 255.
fn differences(a: &RgbImage, b: &RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let d: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let mean = d.iter().map(|&v| f64::from(v)).sum::<f64>() / d.len() as f64;
    (mean, d.iter().copied().max().unwrap_or(0))
}

/// Every fixture case within its tolerance: the flip exactly; colour ops
/// within 1/255 everywhere; geometric ops (shear, translate, rotate,
/// resized crop) within 1/255 on average and 8/255 at most.
#[test]
fn ops_match_albef_and_torchvision() {
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("augment").join("manifest.json")).unwrap(),
    )
    .unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 20, "the fixture lists every op");
    let mut failures = Vec::new();
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let input = png(case["input"].as_str().unwrap());
        let expect = png(case["output"].as_str().unwrap());
        let args = &case["args"];
        let arg = |k: &str| args[k].as_f64().unwrap();
        let op = |op| apply_op(&input, AppliedOp { op, arg: 0.0 });
        let value = |op| {
            apply_op(
                &input,
                AppliedOp {
                    op,
                    arg: arg("value"),
                },
            )
        };
        let got = match case["op"].as_str().unwrap() {
            "hflip" => geometry::hflip(&input),
            "autocontrast" => op(AugmentOp::Autocontrast),
            "equalize" => op(AugmentOp::Equalize),
            "brightness" => color::brightness(&input, arg("factor")),
            "sharpness" => color::sharpness(&input, arg("factor")),
            "shear_x" => value(AugmentOp::ShearX),
            "shear_y" => value(AugmentOp::ShearY),
            "translate_x" => value(AugmentOp::TranslateX),
            "translate_y" => value(AugmentOp::TranslateY),
            "rotate" => value(AugmentOp::Rotate),
            "resized_crop" => {
                let n = |k: &str| args[k].as_u64().unwrap() as usize;
                let size = n("size");
                resample::resized_crop(
                    &input,
                    (n("left"), n("top"), n("width"), n("height")),
                    size,
                    size,
                )
            }
            other => panic!("unknown op {other} in the fixture"),
        };
        let (mean, max) = differences(&got, &expect);
        let ok = match case["tolerance"].as_str().unwrap() {
            "exact" => max == 0,
            "color" => max <= 1,
            "geometric" => mean <= 1.0 && max <= 8,
            t => panic!("unknown tolerance {t}"),
        };
        eprintln!("{name}: mean {mean:.4}, max {max} (of 255)");
        if !ok {
            failures.push(format!("{name}: mean {mean:.4}, max {max}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Sharpness clamps where ALBEF's unclipped cast would wrap: a bright
/// pixel on a dark ground sharpened past 255 stays white.
#[test]
fn sharpness_clamps_instead_of_wrapping() {
    let mut img = RgbImage::new(3, 3);
    img.put_pixel(1, 1, image::Rgb([250, 250, 250]));
    let out = color::sharpness(&img, 1.9);
    // 5/13 of 250 rounds to 96; 96 + 1.9 * (250 - 96) = 388.6, over 255.
    assert_eq!(out.get_pixel(1, 1).0, [255, 255, 255]);
    assert_eq!(out.get_pixel(0, 0).0, [0, 0, 0], "the border is kept");
}

#[test]
fn flipped_captions_swap_left_and_right() {
    assert_eq!(
        swap_left_right("a red circle left of a blue square, Right side; LEFT."),
        "a red circle right of a blue square, Left side; RIGHT."
    );
    // Whole words only.
    assert_eq!(
        swap_left_right("leftover bright rightmost"),
        "leftover bright rightmost"
    );
}

/// ALBEF's pretraining recipe, on.
fn albef() -> AugmentConfig {
    AugmentConfig {
        crop: true,
        crop_scale: [0.2, 1.0],
        flip: 0.5,
        randaug_n: 2,
        randaug_m: 7.0,
        ..AugmentConfig::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For any seed, sample and epoch: the output has the configured size,
    /// the crop lies inside the image, and every draw is a function of
    /// (seed, sample, epoch) alone: another `Augment` built from the same
    /// config and seed draws and produces the same, whatever it drew before.
    #[test]
    fn draws_are_functions_of_seed_sample_and_epoch(
        seed in any::<u64>(),
        sample in any::<u64>(),
        epoch in 0u64..1000,
        w in 1usize..40,
        h in 1usize..40,
        size in 1usize..24,
        swap in any::<bool>(),
    ) {
        let mut cfg = albef();
        cfg.flip_swap_left_right = swap;
        let a = Augment::new(&cfg, seed).unwrap();
        let b = Augment::new(&cfg, seed).unwrap();
        let key = AugKey { sample, epoch };
        // `b` draws for other keys first: nothing carries over.
        let _ = b.draws(AugKey { sample: sample ^ 1, epoch }, w, h);
        let d: Draws = a.draws(key, w, h);
        prop_assert_eq!(&d, &b.draws(key, w, h));
        let (left, top, cw, ch) = d.crop.unwrap();
        prop_assert!(cw >= 1 && ch >= 1 && left + cw <= w && top + ch <= h, "{:?}", d.crop);
        prop_assert!(d.ops.len() <= 2);
        let img = RgbImage::from_fn(w as u32, h as u32, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 5) as u8, ((x + y) * 3) as u8])
        });
        let out = a.apply(&img, key, size);
        prop_assert_eq!(out.len(), size * size * 3);
        prop_assert_eq!(out, b.apply(&img, key, size));
    }
}

/// The key matters: the same sample is augmented differently in another
/// epoch, and other samples of the same epoch differently from it.
#[test]
fn draws_change_with_the_epoch_and_the_sample() {
    let a = Augment::new(&albef(), 7).unwrap();
    let draws = |sample, epoch| a.draws(AugKey { sample, epoch }, 64, 48);
    let by_epoch = (0..32).filter(|&s| draws(s, 0) != draws(s, 1)).count();
    let by_sample = (1..33).filter(|&s| draws(s, 0) != draws(0, 0)).count();
    assert!(
        by_epoch >= 30,
        "{by_epoch} of 32 samples change with the epoch"
    );
    assert!(
        by_sample >= 30,
        "{by_sample} of 32 samples differ from sample 0"
    );
    let other_seed = Augment::new(&albef(), 8).unwrap();
    let by_seed = (0..32)
        .filter(|&s| {
            let k = AugKey {
                sample: s,
                epoch: 0,
            };
            other_seed.draws(k, 64, 48) != a.draws(k, 64, 48)
        })
        .count();
    assert!(
        by_seed >= 30,
        "{by_seed} of 32 samples change with the seed"
    );
    // About half the images flip, and ALBEF's ops are each applied about
    // half the time.
    let flips = (0..400)
        .filter(|&s| {
            a.flips(AugKey {
                sample: s,
                epoch: 0,
            })
        })
        .count();
    assert!((150..250).contains(&flips), "{flips} of 400 flipped");
}

/// Bad `[data.augment]` values are errors naming the key.
#[test]
fn bad_augment_keys_are_named() {
    for (set, key) in [
        (
            "data.augment.crop_scale=[0.5, 0.2]",
            "data.augment.crop_scale",
        ),
        (
            "data.augment.crop_scale=[0.0, 1.0]",
            "data.augment.crop_scale",
        ),
        (
            "data.augment.crop_ratio=[1.5, 0.5]",
            "data.augment.crop_ratio",
        ),
        ("data.augment.flip=1.5", "data.augment.flip"),
        ("data.augment.randaug_m=11", "data.augment.randaug_m"),
        ("data.augment.randaug_n=100", "data.augment.randaug_n"),
        ("data.augment.randaug_ops=[\"posterize\"]", "posterize"),
    ] {
        let e = micro_layers(&[set])
            .load()
            .err()
            .unwrap_or_else(|| panic!("`{set}` was accepted"))
            .to_string();
        assert!(e.contains(key), "`{set}`: {e}");
    }
    let e = micro_layers(&["data.augment.randaug_n=2", "data.augment.randaug_ops=[]"])
        .load()
        .err()
        .expect("no ops with randaug_n > 0 is refused")
        .to_string();
    assert!(e.contains("data.augment.randaug_ops"), "{e}");
    let off = micro_layers(&[]).load().unwrap();
    assert!(!off.config.data.augment.enabled(), "off by default");
}

/// 3 shards of 24 scenes each (a PNG and a caption per sample); returns
/// their brace pattern.
fn write_shards(dir: &std::path::Path) -> String {
    let per_shard = 24;
    let scenes = vlmatch::data::Dataset::synthetic("scenes", 3, 0, 3 * per_shard, 1);
    for shard in 0..3 {
        let mut tar = Vec::new();
        for i in 0..per_shard {
            let s = shard * per_shard + i;
            let mut png = std::io::Cursor::new(Vec::new());
            RgbImage::from_raw(24, 24, scenes.load_rgb(s, 24).unwrap())
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

/// With ALBEF's augmentations on (and "left"/"right" swapped in flipped
/// captions), for pairs in memory and for a shard stream: two ranks of 8
/// load exactly the rows of one process's 16, and a loader started at
/// batch 13 (mid-run, in the second epoch for the pairs) gives the batches
/// an uninterrupted one gives there. The augmented batches differ from
/// plain ones, and evaluation's `make_batch` never augments.
#[test]
fn augmented_batches_split_over_ranks_and_resume_exactly() {
    let loaded = micro_layers(&[]).load().unwrap();
    let tok = Arc::new(Tokenizer::builtin());
    let (train, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let train = Arc::new(train);
    let shards = write_shards(&scratch("augment-shards"));
    let source = |what: &str| match what {
        "pairs" => Source::Pairs(train.clone()),
        _ => {
            Source::Shards(vlmatch::data::webdataset::Shards::resolve(&shards, "test", 7).unwrap())
        }
    };
    let mut recipe = albef();
    recipe.flip_swap_left_right = true;
    let plain = |b: usize| LoaderConfig::new(&loaded.config.data, b, Some(5));
    let cfg = |b: usize| plain(b).augmented(&recipe, 5);
    for what in ["pairs", "shards"] {
        let batches = |c: LoaderConfig, start: u64, n: u64| {
            let mut l = Loader::from_source(source(what), tok.clone(), c, start).unwrap();
            (0..n).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>()
        };
        let whole = batches(cfg(16), 0, 16);
        let resumed = batches(cfg(16), 13, 3);
        for (k, r) in resumed.iter().enumerate() {
            let w = &whole[13 + k];
            assert_eq!(r.captions, w.captions, "{what}: batch {} resumed", 13 + k);
            assert!(
                r.images.equal(&w.images),
                "{what}: batch {} images resumed",
                13 + k
            );
        }
        for start in [0u64, 13] {
            let p0 = batches(cfg(8).shard(0, 2), start, 3);
            let p1 = batches(cfg(8).shard(1, 2), start, 3);
            for (k, (a, b)) in p0.iter().zip(&p1).enumerate() {
                let w = &whole[start as usize + k];
                for (part, from) in [(a, 0i64), (b, 8)] {
                    assert_eq!(
                        part.captions,
                        w.captions[from as usize..from as usize + 8],
                        "{what}: batch {}, rows from {from}",
                        start as usize + k
                    );
                    assert!(
                        part.images.equal(&w.images.narrow(0, from, 8)),
                        "{what}: batch {} images, rows from {from}",
                        start as usize + k
                    );
                }
            }
        }
        // Augmentation ran: the same pairs, other pixels (and, for the
        // scenes' positional captions, some swapped words).
        let unaugmented = batches(plain(16), 0, 4);
        for (a, p) in whole.iter().zip(&unaugmented) {
            assert_eq!(a.pairs, p.pairs, "{what}: same pairs");
            assert!(!a.images.equal(&p.images), "{what}: images augmented");
        }
        let swapped = whole
            .iter()
            .zip(&unaugmented)
            .flat_map(|(a, p)| a.captions.iter().zip(&p.captions))
            .filter(|(a, p)| a != p)
            .inspect(|(a, p)| assert_eq!(**a, swap_left_right(p), "{what}: only swaps"))
            .count();
        assert!(
            swapped > 0,
            "{what}: some flipped captions swap left and right"
        );
    }
    // Evaluation batches ignore the loader's augmentation.
    let eval = cfg(4);
    assert!(eval.augment.is_some());
    let a = make_batch(&train, &tok, &eval, &[0, 1, 2, 3]).unwrap();
    let b = make_batch(&train, &tok, &plain(4), &[0, 1, 2, 3]).unwrap();
    assert!(a.images.equal(&b.images) && a.captions == b.captions);
}

/// `configs/augment.toml` is ALBEF's recipe.
#[test]
fn the_albef_config_turns_on_albefs_recipe() {
    let mut layers = micro_layers(&[]);
    layers
        .files
        .push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/augment.toml"));
    let got = layers.load().unwrap().config.data.augment;
    assert_eq!(got, albef());
    assert_eq!(got.randaug_ops, AugmentOp::ALBEF.to_vec());
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
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

/// A micro run with ALBEF's augmentations over 2 epochs (6 batches each),
/// killed after step 7 and resumed from its step-4 checkpoint (mid-epoch),
/// logs and ends exactly as the uninterrupted run; and augmenting changes
/// what it trains on.
#[test]
fn a_resumed_augmented_run_matches_the_uninterrupted_one() {
    let root = scratch("augment-resume");
    let sets = [
        "data.synthetic.train_scenes=16",
        "data.augment.crop=true",
        "data.augment.crop_scale=[0.2, 1.0]",
        "data.augment.flip=0.5",
        "data.augment.flip_swap_left_right=true",
        "data.augment.randaug_n=2",
    ];
    let full = run(&root.join("full"), &sets, None).unwrap();
    assert_eq!(full.last_step, 12);
    let cut = run(&root.join("cut"), &sets, Some(7)).unwrap();
    assert_eq!(cut.last_step, 7);
    let resumed = resume(&root.join("cut")).unwrap();
    assert_eq!(resumed.start_step, 4, "resumes mid-epoch, from step 4");
    let (a, b) = (metrics(&root.join("full")), metrics(&root.join("cut")));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "every logged value, bit for bit");
    let weights = |dir: &str| {
        tch::Tensor::read_safetensors(root.join(dir).join("checkpoints/step-00000012.safetensors"))
            .unwrap()
    };
    let wb: std::collections::HashMap<_, _> = weights("cut").into_iter().collect();
    for (name, t) in weights("full") {
        assert!(t.equal(&wb[&name]), "tensor {name} differs after resume");
    }
    let plain = run(&root.join("plain"), &sets[..1], None).unwrap();
    assert_ne!(
        losses(&plain),
        losses(&full),
        "augmentation changes the batches"
    );
}

/// Image files named by an annotation file go through the same augmented
/// decode path: batches of the configured size, other pixels than plain
/// ones, the same for a loader resumed there; a file that no longer
/// decodes is still an error naming it.
#[test]
fn annotation_images_are_augmented_and_errors_name_the_file() {
    let dir = scratch("augment-files");
    let scenes = vlmatch::data::Dataset::synthetic("scenes", 3, 0, 8, 1);
    let mut lines = String::new();
    for s in 0..8 {
        RgbImage::from_raw(40, 30, {
            let big = scenes.load_rgb(s, 40).unwrap();
            big[..40 * 30 * 3].to_vec()
        })
        .unwrap()
        .save(dir.join(format!("{s}.png")))
        .unwrap();
        let caption = &scenes.pairs[s].caption;
        lines += &format!("{{\"image\": \"{s}.png\", \"caption\": {caption:?}}}\n");
    }
    let ann = dir.join("train.jsonl");
    std::fs::write(&ann, lines).unwrap();
    let ds = Arc::new(vlmatch::data::load_any(ann.to_str().unwrap(), None, None).unwrap());
    let loaded = micro_layers(&[]).load().unwrap();
    let tok = Arc::new(Tokenizer::builtin());
    let plain = |b: usize| LoaderConfig::new(&loaded.config.data, b, Some(3));
    let cfg = |b: usize| plain(b).augmented(&albef(), 3);
    let batches = |c: LoaderConfig, start: u64, n: usize| {
        let mut l = Loader::from_source(Source::Pairs(ds.clone()), tok.clone(), c, start).unwrap();
        (0..n).map(|_| l.next_batch().unwrap()).collect::<Vec<_>>()
    };
    let (aug, base) = (batches(cfg(4), 0, 3), batches(plain(4), 0, 3));
    for (a, p) in aug.iter().zip(&base) {
        assert_eq!(a.images.size(), vec![4, 3, 16, 16]);
        assert_eq!(a.pairs, p.pairs);
        assert!(!a.images.equal(&p.images), "augmented");
    }
    let resumed = batches(cfg(4), 2, 1);
    assert!(
        resumed[0].images.equal(&aug[2].images),
        "resumed at batch 2"
    );
    std::fs::write(dir.join("5.png"), b"not a png").unwrap();
    let mut l = Loader::from_source(Source::Pairs(ds.clone()), tok.clone(), cfg(8), 0).unwrap();
    let e = l.next_batch().unwrap_err().to_string();
    assert!(e.contains("5.png"), "{e}");
}
