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

    // vlmatch's own outputs on fixed inputs, for the Python side.
    let layers = vlmatch_registry::ConfigLayers {
        base: Some(vlmatch_registry::config::base_from_file(&run_dir.join("config.toml")).unwrap()),
        files: vec![],
        env: false,
        sets: vec![],
    };
    let loaded = layers.load().unwrap();
    let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let (mut asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    vlmatch::checkpoint::load(&vlmatch::checkpoint::latest(&run_dir).unwrap(), &mut asm.vs)
        .unwrap();
    tch::manual_seed(5);
    let pixels = Tensor::randn([3, 3, 16, 16], (Kind::Float, tch::Device::Cpu));
    let texts = [
        "a red circle on a gray background",
        "two squares",
        "A zebra!",
    ];
    let batch = tok.text_batch(&texts, 24, tch::Device::Cpu);
    let (vit_out, bert_out) = tch::no_grad(|| {
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
            ("vit_expected", vit_out),
            ("input_ids", batch.ids.shallow_clone()),
            ("attention_mask", batch.mask.shallow_clone()),
            ("bert_expected", bert_out),
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
        return;
    };
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/check_export.py");
    let o = std::process::Command::new(python)
        .arg(script)
        .arg(&out)
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
}

#[test]
fn export_of_a_missing_run_names_it() {
    let dir = scratch("export-missing");
    let err = vlmatch::commands::export::export_run(&dir.join("nope"), &dir.join("out"), &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope"), "{err}");
}
