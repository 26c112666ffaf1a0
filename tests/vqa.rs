//! VQA fine-tuning and evaluation (`vlmatch finetune --task vqa`, `eval
//! --task vqa`) on the built-in questions and on a question file.

mod common;
use common::*;
use vlmatch::vqa::{evaluate, finetune, scene_questions, FinetuneOptions};

fn options(checkpoint: &std::path::Path, data: &str, steps: i64, sets: &[&str]) -> FinetuneOptions {
    FinetuneOptions {
        checkpoint: checkpoint.to_path_buf(),
        data: data.into(),
        image_root: None,
        out: None,
        steps,
        lr: 1e-3,
        batch_size: Some(32),
        sets: sets.iter().map(|s| s.to_string()).collect(),
        progress: false,
        resume: false,
        fault: None,
    }
}

#[test]
fn builtin_questions_have_unique_answers() {
    use vlmatch::data::synthetic::Scene;
    for i in 0..200 {
        let scene = Scene::generate(7, i);
        let qs = scene_questions(&scene, i);
        assert!(!qs.is_empty() && qs.len() <= 3);
        for (q, a, kind) in &qs {
            assert!(q.ends_with('?'), "{q}");
            match *kind {
                "count" => assert_eq!(a, ["one", "two", "three"][scene.objects.len() - 1]),
                "color" | "shape" | "size" | "background" => assert!(!a.is_empty()),
                other => panic!("unknown kind {other}"),
            }
        }
    }
}

/// Fine-tuning beats always answering the most frequent training answer on
/// held-out scenes' questions.
#[test]
fn vqa_finetuning_beats_the_majority_answer() {
    let dir = scratch("vqa-builtin");
    let pre = dir.join("pre");
    run(&pre, &["train.steps=30", "eval.at_end=false"], None).unwrap();
    let sets = [
        "data.synthetic.train_scenes=600",
        "data.synthetic.heldout_scenes=200",
    ];
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let out = finetune(&options(&pre, "builtin", 400, &sets)).unwrap();
    assert_eq!(out, pre.join("vqa"));
    let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
    let r = evaluate(&out, std::path::Path::new("builtin"), None, &sets).unwrap();
    eprintln!("{r:?}");
    assert!(r.questions >= 400, "{r:?}");
    assert!(
        r.accuracy > r.majority_accuracy + 0.05,
        "VQA accuracy {:.3} vs majority-answer {:.3} ({})",
        r.accuracy,
        r.majority_accuracy,
        r.majority_answer
    );
    for kind in ["color", "count", "background"] {
        assert!(r.by_type.contains_key(kind), "{:?}", r.by_type);
    }
    // The CLI path writes the result into the run directory.
    let v = vlmatch::commands::eval::eval_task(
        &out,
        "vqa",
        &vlmatch::commands::eval::DataArg {
            path: "builtin".into(),
            image_root: None,
            split: None,
            labels: None,
        },
        &sets,
        false,
    )
    .unwrap();
    assert_eq!(v["accuracy"].as_f64(), Some(r.accuracy));
    assert!(out.join("eval-vqa.json").is_file());
}

const COLOURS: [&str; 2] = ["red", "blue"];

/// A scratch directory with a 2-step pretraining run in `pre/` and one
/// plain-coloured 16x16 PNG per colour of [`COLOURS`] (`red.png`, ...).
fn pretrained_with_colour_images(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = scratch(name);
    let pre = dir.join("pre");
    run(&pre, &["train.steps=2", "eval.at_end=false"], None).unwrap();
    for (name, rgb) in COLOURS.into_iter().zip([[220u8, 40, 40], [40, 80, 220]]) {
        image::RgbImage::from_pixel(16, 16, image::Rgb(rgb))
            .save(dir.join(format!("{name}.png")))
            .unwrap();
    }
    (dir, pre)
}

/// A question file with answer lists scores answers VQA-style
/// (min(1, annotators / 3)), and a bad answer names the file.
#[test]
fn vqa_files_with_answer_lists() {
    let (dir, pre) = pretrained_with_colour_images("vqa-file");
    let mut lines = String::new();
    for name in COLOURS {
        lines += &format!(
            "{{\"image\": \"{name}.png\", \"question\": \"what color is it?\", \
              \"answer\": [\"{name}\", \"{name}\", \"dark {name}\"]}}\n"
        );
    }
    let file = dir.join("vqa.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let out = finetune(&options(&pre, file.to_str().unwrap(), 30, &[])).unwrap();
    let answers: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(out.join("answers.json")).unwrap()).unwrap();
    assert_eq!(answers.len(), 4, "{answers:?}");
    let r = evaluate(&out, &file, None, &[]).unwrap();
    assert_eq!(r.questions, 2);
    // Every answer in the vocabulary scores 0, 1/3 or 2/3 on these questions.
    let thirds = (r.accuracy * 6.0).round() / 6.0;
    assert!((r.accuracy - thirds).abs() < 1e-9, "{r:?}");
    assert!((r.majority_accuracy - 1.0 / 3.0).abs() < 1e-9, "{r:?}");

    std::fs::write(
        &file,
        "{\"image\": \"red.png\", \"question\": \"q?\", \"answer\": 3}\n",
    )
    .unwrap();
    let err = evaluate(&out, &file, None, &[]).unwrap_err().to_string();
    assert!(
        err.contains("vqa.jsonl") && err.contains("`answer` must be"),
        "{err}"
    );
}

/// With `data.on_error = "skip"`, a question whose image does not decode is
/// replaced in its training batch by another pair with that pair's answer,
/// and left out of evaluation (counted as skipped), not scored as another.
#[test]
fn vqa_skips_questions_whose_image_does_not_decode() {
    let (dir, pre) = pretrained_with_colour_images("vqa-skip");
    let mut lines = String::new();
    for name in COLOURS {
        lines += &format!(
            "{{\"image\": \"{name}.png\", \"question\": \"what color is it?\", \"answer\": \"{name}\"}}\n"
        );
    }
    std::fs::write(dir.join("broken.png"), b"not a png").unwrap();
    lines +=
        "{\"image\": \"broken.png\", \"question\": \"what color is it?\", \"answer\": \"green\"}\n";
    let file = dir.join("vqa.jsonl");
    std::fs::write(&file, &lines).unwrap();
    let skip = ["data.on_error=\"skip\""];
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let out = finetune(&options(&pre, file.to_str().unwrap(), 10, &skip)).unwrap();
    let sets: Vec<String> = skip.iter().map(|s| s.to_string()).collect();
    let r = evaluate(&out, &file, None, &sets).unwrap();
    assert_eq!((r.questions, r.skipped), (3, 1), "{r:?}");
    // Over the two answered questions, each scoring 0 or 1.
    assert!([0.0, 0.5, 1.0].contains(&r.accuracy), "{r:?}");
    // The fine-tuned run keeps the setting; with `fail` the broken image is
    // an error naming it.
    let fail = ["data.on_error=\"fail\"".to_string()];
    let err = evaluate(&out, &file, None, &fail).unwrap_err().to_string();
    assert!(err.contains("broken.png"), "{err}");
}
