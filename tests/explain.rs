//! `vlmatch explain`: per-word mismatch probabilities from the VL-RTD
//! discriminator, the ITM score, and the HTML page.

mod common;
use common::*;

#[test]
fn explain_scores_every_word_and_writes_a_page() {
    let dir = scratch("explain");
    let run_dir = dir.join("run");
    let mut layers = micro_layers(&["train.steps=4", "eval.at_end=false"]);
    layers.files.insert(
        0,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vlmatch.toml"),
    );
    train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(run_dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    let image = dir.join("red.png");
    image::RgbImage::from_pixel(20, 20, image::Rgb([220, 40, 40]))
        .save(&image)
        .unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());

    let e = vlmatch::commands::explain::explain_cmd(&run_dir, &image, "A blue square, left.", &[])
        .unwrap();
    let words: Vec<&str> = e.words.iter().map(|w| w.word.as_str()).collect();
    assert_eq!(words, ["a", "blue", "square", ",", "left", "."]);
    for w in &e.words {
        assert!((0.0..=1.0).contains(&w.mismatch), "{w:?}");
    }
    assert!((0.0..=1.0).contains(&e.itm));
    let top = e
        .words
        .iter()
        .max_by(|a, b| a.mismatch.total_cmp(&b.mismatch))
        .unwrap();
    assert_eq!(e.most_suspicious.as_deref(), Some(top.word.as_str()));
    // Deterministic: the same question gives the same answer.
    let again =
        vlmatch::commands::explain::explain_cmd(&run_dir, &image, "A blue square, left.", &[])
            .unwrap();
    assert_eq!(
        serde_json::to_string(&e).unwrap(),
        serde_json::to_string(&again).unwrap()
    );
    // A multi-piece word is one word, scored by its most suspicious piece.
    let z = vlmatch::commands::explain::explain_cmd(&run_dir, &image, "a zebra", &[]).unwrap();
    assert_eq!(z.words.len(), 2);

    let text = vlmatch::explain::render_text(&e);
    assert!(
        text.contains("most suspicious") && text.contains("ITM match probability"),
        "{text}"
    );
    let html = vlmatch::explain::render_html(&e, &image).unwrap();
    assert!(
        html.contains("data:image/png;base64,iVBORw0KGgo"),
        "PNG not embedded"
    );
    for w in ["blue", "square", "left"] {
        assert!(
            html.contains(&format!(">{w}</span>")),
            "{w} not highlighted"
        );
    }
}

#[test]
fn explain_rejects_missing_images_and_empty_text() {
    let dir = scratch("explain-errors");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=2", "eval.at_end=false"], None).unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let missing = dir.join("nope.png");
    let err = vlmatch::commands::explain::explain_cmd(&run_dir, &missing, "a red square", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.png"), "{err}");
    let image = dir.join("x.png");
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(&image)
        .unwrap();
    let err = vlmatch::commands::explain::explain_cmd(&run_dir, &image, "   ", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("no words"), "{err}");
}
