//! End-to-end training on the micro model: losses fall, metrics are logged,
//! real annotation files train, gradient accumulation counts batches.

mod common;
use common::*;

#[test]
fn micro_training_lowers_the_loss_and_logs_every_objective() {
    let dir = scratch("learns");
    let s = run(&dir, &["train.steps=60", "train.checkpoint_every=0"], None).unwrap();
    let l = losses(&s);
    assert_eq!(l.len(), 60);
    let head: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let tail: f64 = l[55..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(
        tail < head - 0.3,
        "loss did not fall clearly: first {head:.3}, last {tail:.3}"
    );
    for key in [
        "step",
        "loss",
        "lr",
        "itc",
        "itm",
        "itc_acc",
        "itm_acc",
        "grad_norm",
    ] {
        assert!(
            s.logged[0].contains_key(key),
            "metrics lack `{key}`: {:?}",
            s.logged[0]
        );
    }
    let held = s.eval.expect("held-out evaluation at the end");
    let e = &held.retrieval;
    assert_eq!((e.images, e.captions), (16, 48));
    assert!((0.0..=1.0).contains(&e.i2t_r1) && (0.0..=1.0).contains(&e.t2i_r1));
    // On built-in data the fine-grained suite: one case per held-out scene
    // and kind it can make (tests/finegrained.rs checks the suite).
    let loaded = micro_layers(&[]).load().unwrap();
    let suite = vlmatch::setup::datasets(&loaded).unwrap().1.unwrap();
    let cases = vlmatch::eval::matching_cases(&suite).unwrap();
    assert_eq!(held.matching.pairs, cases.cases.len());
    assert!(held.matching.pairs > 16, "{:?}", held.matching);
    let by_kind: usize = held.matching_by_kind.values().map(|m| m.pairs).sum();
    assert_eq!(by_kind, held.matching.pairs);
    assert!((0.0..=1.0).contains(&held.matching.itm_acc));
    assert!(dir.join("eval-heldout.json").is_file());
}

#[test]
fn annotation_files_with_real_images_train_and_evaluate() {
    let dir = scratch("annotations");
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let colors = [
        ("red", [220u8, 40, 40]),
        ("green", [40, 170, 60]),
        ("blue", [40, 80, 220]),
        ("yellow", [235, 215, 40]),
    ];
    let mut lines = String::new();
    for (i, (name, rgb)) in colors.iter().enumerate() {
        let img = image::RgbImage::from_pixel(20, 12, image::Rgb(*rgb));
        let file = format!("{name}.{}", if i % 2 == 0 { "png" } else { "jpg" });
        img.save(images.join(&file)).unwrap();
        lines.push_str(&format!(
            "{{\"image\": \"{file}\", \"caption\": [\"a {name} picture\", \"all {name}\"], \"image_id\": {i}}}\n"
        ));
    }
    let ann = dir.join("train.jsonl");
    std::fs::write(&ann, &lines).unwrap();
    let ann_set = format!("data.annotations=\"{}\"", ann.display());
    let held_set = format!("data.heldout_annotations=\"{}\"", ann.display());
    let root_set = format!("data.image_root=\"{}\"", images.display());
    let s = run(
        &dir.join("run"),
        &[
            "data.source=\"annotations\"",
            &ann_set,
            &held_set,
            &root_set,
            "train.batch_size=4",
            "train.steps=4",
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.last_step, 4);
    let e = s.eval.unwrap();
    assert_eq!((e.retrieval.images, e.retrieval.captions), (4, 8));
    assert_eq!(e.matching.pairs, 8, "every caption names a color");
    // No scene model here: the color swaps, as one kind.
    assert_eq!(e.matching_by_kind.keys().collect::<Vec<_>>(), ["color"]);
    assert_eq!(e.matching_by_kind["color"].pairs, 8);
    assert!(e.matching_skipped_scenes.is_empty());
}

#[test]
fn gradient_accumulation_consumes_accum_steps_batches_per_step() {
    let dir = scratch("accum");
    run(
        &dir,
        &["train.steps=3", "train.accum_steps=2", "eval.at_end=false"],
        None,
    )
    .unwrap();
    let ckpt =
        tch::Tensor::read_safetensors(dir.join("checkpoints/step-00000003.safetensors")).unwrap();
    let batches = ckpt
        .iter()
        .find(|(k, _)| k == "state.batches")
        .unwrap()
        .1
        .int64_value(&[]);
    assert_eq!(batches, 6);
}

#[test]
fn periodic_evaluation_writes_eval_jsonl() {
    let dir = scratch("eval-every");
    run(
        &dir,
        &["train.steps=6", "eval.every=3", "train.checkpoint_every=0"],
        None,
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("eval.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let steps: Vec<i64> = lines.iter().map(|l| l["step"].as_i64().unwrap()).collect();
    assert_eq!(steps, [3, 6]);
    assert!(
        lines[0]["matching"]["itm_acc"].is_number() && lines[0]["retrieval"]["i2t_r1"].is_number()
    );
    assert!(lines[0]["matching_by_kind"]["count"]["itm_acc"].is_number());
}
