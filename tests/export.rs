//! `vlmatch export` writes encoders that HuggingFace `transformers` loads and
//! runs to the same outputs (tests/python/check_export.py).

mod common;
use common::*;
use tch::{Kind, Tensor};
use vlmatch_core::EncoderInput;

#[test]
fn export_layout_and_transformers_round_trip() {
    let dir = scratch("export");
    let run_dir = dir.join("run");
    run(&run_dir, &["train.steps=3", "eval.at_end=false"], None).unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let out = dir.join("hf");
    let e = vlmatch::commands::export::export_run(&run_dir, &out, &[]).unwrap();
    assert_eq!(e.image.as_deref(), Some(out.join("image").as_path()));
    assert_eq!(e.text.as_deref(), Some(out.join("text").as_path()));
    for f in [
        "image/config.json",
        "image/model.safetensors",
        "text/config.json",
        "text/model.safetensors",
        "text/vocab.txt",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("image/config.json")).unwrap())
            .unwrap();
    assert_eq!(
        (
            cfg["model_type"].as_str(),
            cfg["image_size"].as_i64(),
            cfg["patch_size"].as_i64()
        ),
        (Some("vit"), Some(16), Some(8))
    );
    // Hub names: no role prefix, the ViT and BERT key layout.
    let text = Tensor::read_safetensors(out.join("text/model.safetensors")).unwrap();
    let names: Vec<&str> = text.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        names.contains(&"embeddings.word_embeddings.weight"),
        "{names:?}"
    );
    assert!(
        names.contains(&"encoder.layer.0.attention.self.query.weight"),
        "{names:?}"
    );

    let r = transformers_round_trip(&run_dir, &out, 16);
    if let Some(r) = r {
        assert_eq!(r["image_class"], "ViTModel");
        assert_eq!(r["text_class"], "BertModel");
    }
}

/// A run with `clip_vit` + `roberta` (the METER preset, from the fixture
/// checkpoints, its tokenizer RoBERTa's byte-level BPE) exports a
/// `CLIPVisionModel` and a `RobertaModel` that `transformers` loads and runs
/// to vlmatch's outputs.
#[test]
fn clip_vit_and_roberta_export_round_trip() {
    let dir = scratch("export-meter");
    let run_dir = dir.join("run");
    let image = format!(
        "model.image.init={}",
        fixture("hf/clip-vision-30px-p6-3heads").display()
    );
    let text = format!(
        "model.text.init={}",
        fixture("hf/roberta-mlm-h40-5heads").display()
    );
    let mut layers = micro_layers(&[]);
    layers
        .files
        .push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/meter.toml"));
    layers.sets = [
        image.as_str(),
        text.as_str(),
        "data.image_size=36",
        "data.max_len=24",
        "model.embed_dim=16",
        "model.fusion.num_hidden_layers=1",
        "model.fusion.num_attention_heads=5",
        "model.fusion.intermediate_size=64",
        "train.steps=2",
        "train.checkpoint_every=0",
        "eval.at_end=false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(run_dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let out = dir.join("hf");
    let e = vlmatch::commands::export::export_run(&run_dir, &out, &[]).unwrap();
    assert_eq!(e.image.as_deref(), Some(out.join("image").as_path()));
    assert_eq!(e.text.as_deref(), Some(out.join("text").as_path()));
    let json = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join(f)).unwrap()).unwrap()
    };
    let (image, text) = (json("image/config.json"), json("text/config.json"));
    assert_eq!(
        (image["model_type"].as_str(), image["image_size"].as_i64()),
        (Some("clip_vision_model"), Some(36))
    );
    assert_eq!(
        (text["model_type"].as_str(), text["pad_token_id"].as_i64()),
        (Some("roberta"), Some(1))
    );
    // The image normalisation the run used (the CLIP checkpoint's).
    assert_eq!(
        json("image/preprocessor_config.json")["image_mean"],
        serde_json::json!([0.25, 0.5, 0.75])
    );
    assert!(out.join("text/tokenizer.json").is_file());
    let r = transformers_round_trip(&run_dir, &out, 36);
    if let Some(r) = r {
        assert_eq!(r["image_class"], "CLIPVisionModel");
        assert_eq!(r["text_class"], "RobertaModel");
    }
}

/// Write vlmatch's own encoder outputs on fixed inputs beside the export
/// in `out` (`check.safetensors`, `texts.json`) and run
/// tests/python/check_export.py on it: its JSON line, or `None` without
/// `BENCH_REFERENCE_PYTHON`.
fn transformers_round_trip(
    run_dir: &std::path::Path,
    out: &std::path::Path,
    image_size: i64,
) -> Option<serde_json::Value> {
    let layers = vlmatch_registry::ConfigLayers {
        base: Some(vlmatch_registry::config::base_from_file(&run_dir.join("config.toml")).unwrap()),
        files: vec![],
        env: false,
        sets: vec![],
    };
    let loaded = layers.load().unwrap();
    let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    vlmatch::checkpoint::load(&vlmatch::checkpoint::latest(run_dir).unwrap(), &asm.vs).unwrap();
    tch::manual_seed(5);
    let pixels = Tensor::randn(
        [3, 3, image_size, image_size],
        (Kind::Float, tch::Device::Cpu),
    );
    let texts = [
        "a red circle on a gray background",
        "two squares",
        "A zebra!",
    ];
    let batch = tok.text_batch(&texts, 24, tch::Device::Cpu);
    let (image_out, text_out) = tch::no_grad(|| {
        (
            asm.model
                .image
                .forward_t(EncoderInput::Image(&pixels), false)
                .unwrap()
                .hidden,
            asm.model
                .text
                .forward_t(EncoderInput::Text(&batch), false)
                .unwrap()
                .hidden,
        )
    });
    Tensor::write_safetensors(
        &[
            ("pixel_values", pixels),
            ("image_expected", image_out),
            ("input_ids", batch.ids.shallow_clone()),
            ("attention_mask", batch.mask.shallow_clone()),
            ("text_expected", text_out),
        ],
        out.join("check.safetensors"),
    )
    .unwrap();
    std::fs::write(
        out.join("texts.json"),
        serde_json::to_string(&texts).unwrap(),
    )
    .unwrap();

    let Some(python) = std::env::var_os("BENCH_REFERENCE_PYTHON") else {
        eprintln!("skipped the transformers round trip: BENCH_REFERENCE_PYTHON is not set (cargo xtask test sets it)");
        return None;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_export.py");
    let o = std::process::Command::new(python)
        .arg(script)
        .arg(out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "round trip failed: {stdout}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    eprintln!("{r}");
    assert_eq!(r["tokens_equal"], true);
    assert!(r["image_max_diff"].as_f64().unwrap() < 1e-4, "{r}");
    assert!(r["text_max_diff"].as_f64().unwrap() < 1e-4, "{r}");
    Some(r)
}

#[test]
fn export_of_a_missing_run_names_it() {
    let dir = scratch("export-missing");
    let err = vlmatch::commands::export::export_run(&dir.join("nope"), &dir.join("out"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
