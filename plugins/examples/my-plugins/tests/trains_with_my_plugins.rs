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
        base: Some(vlmatch::cli::preset(root.join("configs/tiny.toml").to_str().unwrap()).unwrap()),
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
