//! The example plugins register, and the tiny preset trains with them named
//! in config: `conv_stem` as the image encoder, `shuffled_words` as an extra
//! FG-ITM negative source.

use my_plugins as _;
use std::path::Path;
use vlmatch_registry::{ConfigLayers, Kind, Registry};

#[test]
fn plugins_register_next_to_the_builtins() {
    let r = Registry::from_inventory().unwrap();
    assert!(r.names(Kind::Encoder).contains(&"conv_stem"));
    assert!(r.names(Kind::NegativeSampler).contains(&"shuffled_words"));
    let e = r.get(Kind::Encoder, "conv_stem", "test").unwrap();
    assert_eq!(e.origin, "my-plugins");
}

#[test]
fn tiny_preset_trains_with_the_plugins_from_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("my-plugins-{}", std::process::id()));
    let layers = ConfigLayers {
        base: Some(vlmatch::run::preset(root.join("configs/tiny.toml").to_str().unwrap()).unwrap()),
        files: vec![
            root.join("tests/fixtures/micro.toml"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("my-plugins.toml"),
        ],
        env: false,
        sets: vec!["train.steps=5".into(), "eval.at_end=false".into()],
    };
    let s = vlmatch::train::train(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert_eq!(s.last_step, 5);
    let m = &s.logged[4];
    assert!(m["itm_acc_shuffled_words"].is_number(), "{m:?}");
    let ckpt =
        tch::Tensor::read_safetensors(dir.join("checkpoints/step-00000005.safetensors")).unwrap();
    assert!(ckpt
        .iter()
        .any(|(k, _)| k == "model.vision_encoder.conv1.weight"));
}

/// `conv_stem` registered its own weight map: vlmatch starts it from a
/// `conv_stem` checkpoint (names `stem.conv1.*`, `embeddings.cls_token`, ...)
/// through `model.image.init`, refuses a checkpoint of another model type
/// naming both, and exports it back under the checkpoint's names.
#[test]
fn conv_stem_loads_and_exports_its_own_checkpoint_layout() {
    use tch::{Kind, Tensor};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../..");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("conv-stem-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    tch::manual_seed(11);
    let r = |shape: &[i64]| Tensor::randn(shape, (Kind::Float, tch::Device::Cpu));
    let theirs = vec![
        ("stem.conv1.weight".to_string(), r(&[32, 3, 3, 3])),
        ("stem.conv1.bias".to_string(), r(&[32])),
        ("stem.conv2.weight".to_string(), r(&[32, 32, 3, 3])),
        ("stem.conv2.bias".to_string(), r(&[32])),
        ("embeddings.cls_token".to_string(), r(&[1, 1, 32])),
        // Not conv_stem's: skipped by its map.
        ("classifier.weight".to_string(), r(&[10, 32])),
    ];
    Tensor::write_safetensors(&theirs, dir.join("model.safetensors")).unwrap();
    let config = |model_type: &str| {
        std::fs::write(
            dir.join("config.json"),
            format!(r#"{{"model_type": "{model_type}", "hidden_size": 32}}"#),
        )
        .unwrap()
    };
    config("conv_stem");
    let layers = || ConfigLayers {
        base: Some(vlmatch::run::preset(root.join("configs/tiny.toml").to_str().unwrap()).unwrap()),
        files: vec![
            root.join("tests/fixtures/micro.toml"),
            Path::new(env!("CARGO_MANIFEST_DIR")).join("my-plugins.toml"),
        ],
        env: false,
        sets: vec![format!("model.image.init={}", dir.display())],
    };
    let loaded = layers().load().unwrap();
    let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let vars = asm.vs.variables();
    let reports = vlmatch::pretrained::apply_inits(&loaded, &vars).unwrap();
    let image = reports.iter().find(|r| r.role == "image encoder").unwrap();
    assert_eq!(
        (image.applied, image.missing.len(), image.unused.len()),
        (5, 0, 0),
        "{image}"
    );
    assert!(vars["vision_encoder.conv2.weight"].equal(&theirs[2].1));
    assert!(vars["vision_encoder.cls_token"].equal(&theirs[4].1));

    // Export writes the checkpoint's names back.
    let out = dir.join("export");
    let e = vlmatch::export::export(&loaded, &tok, &asm.vs, &out).unwrap();
    assert_eq!(e.image.as_deref(), Some(out.join("image").as_path()));
    let exported: std::collections::BTreeMap<String, Tensor> =
        Tensor::read_safetensors(out.join("image/model.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let names: Vec<&str> = exported.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "embeddings.cls_token",
            "stem.conv1.bias",
            "stem.conv1.weight",
            "stem.conv2.bias",
            "stem.conv2.weight"
        ]
    );
    assert!(exported["stem.conv1.weight"].equal(&theirs[0].1));
    let cfg = std::fs::read_to_string(out.join("image/config.json")).unwrap();
    assert!(cfg.contains(r#""model_type": "conv_stem""#), "{cfg}");

    // A checkpoint of another model type is refused, naming both.
    config("vit");
    let loaded = layers().load().unwrap();
    let err = vlmatch::setup::model(&loaded, &tok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`vit` checkpoint") && err.contains("plugin `conv_stem`"),
        "{err}"
    );
}
