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

#[test]
fn eval_reports_reranked_retrieval_and_matching() {
    let dir = scratch("eval-cli");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=4", "eval.at_end=false"], None).unwrap();
    let (ann, triples) = write_data(&dir);
    let images = dir.join("images");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());

    let r = vlmatch::cli::eval_task(
        &run_dir,
        "retrieval",
        &ann,
        Some(&images),
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
    let all = vlmatch::cli::eval_task(
        &run_dir,
        "retrieval",
        &ann,
        Some(&images),
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

    let m =
        vlmatch::cli::eval_task(&run_dir, "matching", &triples, Some(&images), &[], false).unwrap();
    assert_eq!(m["pairs"].as_u64(), Some(4));
    assert!((0.0..=1.0).contains(&m["itm_acc"].as_f64().unwrap()));
    assert!(run_dir.join("eval-matching.json").is_file());

    let err =
        vlmatch::cli::eval_task(&run_dir, "matching", &ann, Some(&images), &[], false).unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a string field `negative`"),
        "{err}"
    );
    let err =
        vlmatch::cli::eval_task(&run_dir, "vqa", &ann, Some(&images), &[], false).unwrap_err();
    assert!(
        err.to_string()
            .contains("expected `retrieval` or `matching`"),
        "{err}"
    );
}
