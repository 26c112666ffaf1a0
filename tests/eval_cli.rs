//! `vlmatch eval` on a trained run: retrieval with ITM re-ranking and
//! matching on explicit triples, from annotation files with real images.

mod common;
use common::*;

fn write_data(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let images = dir.join("images");
    std::fs::create_dir_all(&images).unwrap();
    let colors = [
        ("red", [220u8, 40, 40]),
        ("green", [40, 170, 60]),
        ("blue", [40, 80, 220]),
        ("yellow", [235, 215, 40]),
    ];
    let mut ann = String::new();
    let mut triples = String::new();
    for (name, rgb) in colors {
        image::RgbImage::from_pixel(16, 16, image::Rgb(rgb))
            .save(images.join(format!("{name}.png")))
            .unwrap();
        ann.push_str(&format!(
            "{{\"image\": \"{name}.png\", \"caption\": [\"a {name} square\", \"{name}\"]}}\n"
        ));
        triples.push_str(&format!(
            "{{\"image\": \"{name}.png\", \"caption\": \"a {name} square\", \"negative\": \"a {} square\"}}\n",
            if name == "red" { "blue" } else { "red" }
        ));
    }
    std::fs::write(dir.join("ann.jsonl"), ann).unwrap();
    std::fs::write(dir.join("triples.jsonl"), triples).unwrap();
    (dir.join("ann.jsonl"), dir.join("triples.jsonl"))
}

fn data_arg(path: &std::path::Path, images: &std::path::Path) -> vlmatch::commands::eval::DataArg {
    vlmatch::commands::eval::DataArg {
        path: path.to_path_buf(),
        image_root: Some(images.to_path_buf()),
        split: None,
        labels: None,
    }
}

#[test]
fn eval_reports_reranked_retrieval_and_matching() {
    let dir = scratch("eval-cli");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=4", "eval.at_end=false"], None).unwrap();
    let (ann, triples) = write_data(&dir);
    let images = dir.join("images");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());

    let r = vlmatch::commands::eval::eval_task(
        &run_dir,
        "retrieval",
        &data_arg(&ann, &images),
        &["eval.k=3".into()],
        false,
    )
    .unwrap();
    assert_eq!(
        (
            r["images"].as_u64(),
            r["captions"].as_u64(),
            r["k"].as_u64()
        ),
        (Some(4), Some(8), Some(3))
    );
    for key in ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"] {
        let v = r[key].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{key} = {v}");
    }
    // With k covering every candidate, each query's target is re-ranked
    // among at most 8, so recall at 10 is 1 by construction.
    let all = vlmatch::commands::eval::eval_task(
        &run_dir,
        "retrieval",
        &data_arg(&ann, &images),
        &["eval.k=8".into()],
        false,
    )
    .unwrap();
    assert_eq!(
        (all["tr_r10"].as_f64(), all["ir_r10"].as_f64()),
        (Some(1.0), Some(1.0)),
        "{all}"
    );
    let sum: f64 = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"]
        .iter()
        .map(|k| r[*k].as_f64().unwrap())
        .sum();
    assert!((r["rsum"].as_f64().unwrap() - 100.0 * sum).abs() < 1e-9);
    assert_eq!(r["step"].as_i64(), Some(4));
    assert!(run_dir.join("eval-retrieval.json").is_file());

    let m = vlmatch::commands::eval::eval_task(
        &run_dir,
        "matching",
        &data_arg(&triples, &images),
        &[],
        false,
    )
    .unwrap();
    assert_eq!(m["pairs"].as_u64(), Some(4));
    assert!((0.0..=1.0).contains(&m["itm_acc"].as_f64().unwrap()));
    assert!(run_dir.join("eval-matching.json").is_file());
    // Token-level localisation: every negative differs in one of 3 words.
    assert_eq!(m["rtd_pairs"].as_u64(), Some(4), "{m}");
    assert!(
        (m["rtd_chance"].as_f64().unwrap() - 1.0 / 3.0).abs() < 1e-9,
        "{m}"
    );
    let top1 = m["rtd_top1"].as_f64().unwrap();
    assert!([0.0, 0.25, 0.5, 0.75, 1.0].contains(&top1), "{m}");

    // Zero-shot: each image against the four color labels.
    let labels = dir.join("labels.txt");
    std::fs::write(
        &labels,
        "a red square\na green square\na blue square\na yellow square\n",
    )
    .unwrap();
    let zs = dir.join("zeroshot.jsonl");
    std::fs::write(
        &zs,
        ["red", "green", "blue", "yellow"]
            .iter()
            .map(|c| format!("{{\"image\": \"{c}.png\", \"label\": \"a {c} square\"}}\n"))
            .collect::<String>(),
    )
    .unwrap();
    let mut arg = data_arg(&zs, &images);
    arg.labels = Some(labels.clone());
    let z =
        vlmatch::commands::eval::eval_task(&run_dir, "zeroshot", &arg, &["eval.k=4".into()], false)
            .unwrap();
    assert_eq!(
        (z["images"].as_u64(), z["labels"].as_u64(), z["k"].as_u64()),
        (Some(4), Some(4), Some(4))
    );
    // With four candidates, top-5 always holds the right one.
    assert_eq!(
        (z["itc_top5"].as_f64(), z["itm_top5"].as_f64()),
        (Some(1.0), Some(1.0)),
        "{z}"
    );
    for key in ["itc_top1", "itm_top1"] {
        let v = z[key].as_f64().unwrap();
        assert!([0.0, 0.25, 0.5, 0.75, 1.0].contains(&v), "{key} = {v}");
    }
    // k = 1: ITM re-ranks nothing, so its top-1 is ITC's.
    let z1 =
        vlmatch::commands::eval::eval_task(&run_dir, "zeroshot", &arg, &["eval.k=1".into()], false)
            .unwrap();
    assert_eq!(z1["itm_top1"], z1["itc_top1"], "{z1}");
    std::fs::write(&labels, "[\"a red square\"]").unwrap();
    let err =
        vlmatch::commands::eval::eval_task(&run_dir, "zeroshot", &arg, &[], false).unwrap_err();
    assert!(err.to_string().contains("not among the --labels"), "{err}");
    arg.labels = None;
    let err =
        vlmatch::commands::eval::eval_task(&run_dir, "zeroshot", &arg, &[], false).unwrap_err();
    assert!(err.to_string().contains("needs --labels"), "{err}");

    let err = vlmatch::commands::eval::eval_task(
        &run_dir,
        "matching",
        &data_arg(&ann, &images),
        &[],
        false,
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a string field `negative`"),
        "{err}"
    );
    let err =
        vlmatch::commands::eval::eval_task(&run_dir, "bogus", &data_arg(&ann, &images), &[], false)
            .unwrap_err();
    assert!(
        err.to_string().contains(
            "expected `retrieval`, `matching`, `zeroshot`, `vqa`, `snli-ve`, `nlvr2` or `heldout`"
        ),
        "{err}"
    );
    let err =
        vlmatch::commands::eval::eval_task(&run_dir, "vqa", &data_arg(&ann, &images), &[], false)
            .unwrap_err();
    assert!(err.to_string().contains("finetune --task vqa"), "{err}");
    // The run's own held-out set (built-in data), as training reports it.
    let h = vlmatch::commands::eval::eval_task(
        &run_dir,
        "heldout",
        &data_arg(std::path::Path::new(""), &images),
        &[],
        false,
    )
    .unwrap();
    assert!(h["matching"]["pairs"].as_u64().unwrap() > 0, "{h}");
    assert!(h["retrieval"]["i2t_r1"].as_f64().is_some(), "{h}");
    let err = vlmatch::commands::eval::eval_task(
        &run_dir,
        "retrieval",
        &data_arg(std::path::Path::new(""), &images),
        &[],
        false,
    )
    .unwrap_err();
    assert!(err.to_string().contains("needs --data"), "{err}");
}

/// A Karpathy-format file (`dataset_coco.json` layout) with `--split`.
#[test]
fn karpathy_splits_select_images_for_training_and_evaluation() {
    let dir = scratch("karpathy");
    let images = dir.join("images");
    std::fs::create_dir_all(images.join("val2014")).unwrap();
    let mut entries = Vec::new();
    for (i, (name, split)) in [
        ("red", "train"),
        ("blue", "restval"),
        ("green", "test"),
        ("yellow", "test"),
    ]
    .iter()
    .enumerate()
    {
        image::RgbImage::from_pixel(16, 16, image::Rgb([40 * i as u8, 90, 200]))
            .save(images.join("val2014").join(format!("{name}.jpg")))
            .unwrap();
        entries.push(format!(
            "{{\"filepath\": \"val2014\", \"filename\": \"{name}.jpg\", \"imgid\": {i}, \"split\": \"{split}\", \
              \"sentences\": [{{\"raw\": \"A {name} square.\"}}, {{\"raw\": \"{name} \"}}]}}"
        ));
    }
    let file = dir.join("dataset_coco.json");
    std::fs::write(
        &file,
        format!(
            "{{\"dataset\": \"coco\", \"images\": [{}]}}",
            entries.join(", ")
        ),
    )
    .unwrap();

    let ds = vlmatch::data::annotations::load_split(&file, Some(&images), Some("train,restval"))
        .unwrap();
    assert_eq!((ds.images.len(), ds.pairs.len()), (2, 4));
    assert_eq!(ds.pairs[0].caption, "A red square.");
    let test = vlmatch::data::annotations::load_split(&file, Some(&images), Some("test")).unwrap();
    assert_eq!(test.image_ids, [2, 3]);

    let run_dir = dir.join("run");
    let ann = format!("data.annotations=\"{}\"", file.display());
    let root = format!("data.image_root=\"{}\"", images.display());
    run(
        &run_dir,
        &[
            "data.source=\"annotations\"",
            &ann,
            &root,
            "data.split=\"train,restval\"",
            "train.batch_size=4",
            "train.steps=2",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let mut arg = data_arg(&file, &images);
    arg.split = Some("test".into());
    let r = vlmatch::commands::eval::eval_task(&run_dir, "retrieval", &arg, &[], false).unwrap();
    assert_eq!(
        (r["images"].as_u64(), r["captions"].as_u64()),
        (Some(2), Some(4))
    );

    // A split on a file that is not Karpathy-format is a clear error.
    let (ann_file, _) = write_data(&dir);
    let mut arg = data_arg(&ann_file, &images);
    arg.split = Some("test".into());
    let err = vlmatch::commands::eval::eval_task(&run_dir, "retrieval", &arg, &[], false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a Karpathy-format file"), "{err}");
}

/// `vlmatch preview` writes images, captions and an annotation file that
/// evaluation and NegGen read back.
#[test]
fn preview_writes_an_annotation_file_that_loads() {
    use clap::Parser;
    let dir = scratch("preview");
    let out = dir.join("prev");
    vlmatch::cli::run(vlmatch::cli::Cli::parse_from([
        "vlmatch",
        "preview",
        "--count",
        "3",
        "--out",
        out.to_str().unwrap(),
    ]))
    .unwrap();
    let ds = vlmatch::data::annotations::load(&out.join("annotations.jsonl"), None).unwrap();
    assert_eq!(ds.images.len(), 3);
    assert_eq!(ds.image_ids, [0, 1, 2]);
    let lines = std::fs::read_to_string(out.join("captions.txt")).unwrap();
    assert_eq!(lines.lines().count(), ds.pairs.len());
    assert!(lines.starts_with(&format!("0000.png\t{}", ds.pairs[0].caption)));
}

/// With a `neggen` sampler, `preview` dumps per pair the words NegGen's own
/// tagging may replace (for bench/reference_neggen.py), exactly as NegGen
/// tags the caption, and each vocabulary entry after a determiner; without
/// one, neither.
#[test]
fn preview_dumps_neggen_candidates_when_a_sampler_is_neggen() {
    use clap::Parser;
    use neggen::{default_tags_vec, tagged_candidates, BrillTagger};
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let dir = scratch("preview-neggen");
    let key = format!("neggen.pos_tags:{}", default_tags_vec().join(","));
    let tagger = BrillTagger::new();
    for (config, with) in [(Some("configs/vlmatch.toml"), true), (None, false)] {
        let out = dir.join(if with { "neggen" } else { "plain" });
        let mut args = vec![
            "vlmatch",
            "preview",
            "--count",
            "4",
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(c) = config {
            args.extend(["--config", c]);
        }
        vlmatch::cli::run(vlmatch::cli::Cli::parse_from(args)).unwrap();
        let pairs = std::fs::read_to_string(out.join("pairs.jsonl")).unwrap();
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("meta.json")).unwrap()).unwrap();
        assert_eq!(meta.get("caption_preps_after_a").is_some(), with);
        let mut candidates = 0;
        for line in pairs.lines() {
            let p: serde_json::Value = serde_json::from_str(line).unwrap();
            let Some(preps) = p.get("caption_preps") else {
                assert!(!with, "{line}");
                continue;
            };
            assert!(with, "{line}");
            let caption = p["caption"].as_str().unwrap();
            let want: Vec<(usize, String)> =
                tagged_candidates(caption, &tagger, &default_tags_vec());
            let got: Vec<(usize, String)> = serde_json::from_value(preps[&key].clone()).unwrap();
            assert_eq!(got, want, "{caption}");
            candidates += got.len();
        }
        assert_eq!(candidates > 0, with);
        if with {
            // "circle" is a noun after a determiner; "on" is not.
            let after_a = &meta["caption_preps_after_a"];
            assert_eq!(after_a["circle"][&key], serde_json::json!([[1, "NN"]]));
            assert_eq!(after_a["on"][&key], serde_json::json!([]));
        }
    }
}
