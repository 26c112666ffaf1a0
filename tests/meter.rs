//! The METER-style preset (`configs/meter.toml`: `clip_vit` + `roberta` +
//! `co_attention`, `roberta_lm_head`) started from HuggingFace-layout
//! checkpoints by configuration alone: the parity fixtures of a
//! CLIPVisionModel (at another resolution, so its position embeddings are
//! interpolated) and a RobertaForMaskedLM (its tokenizer.json the run's
//! tokenizer, its `lm_head` the generator), and the image normalisation
//! taken from the CLIP checkpoint's `preprocessor_config.json`.

mod common;
use common::*;
use std::sync::Arc;
use vlmatch::pretrained::apply_inits;

fn meter_layers(sets: &[&str]) -> vlmatch_registry::ConfigLayers {
    let mut layers = micro_layers(&[]);
    layers
        .files
        .push(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/meter.toml"));
    let image = format!(
        "model.image.init={}",
        fixture("hf/clip-vision-30px-p6-3heads").display()
    );
    let text = format!(
        "model.text.init={}",
        fixture("hf/roberta-mlm-h40-5heads").display()
    );
    layers.sets = [
        image.as_str(),
        text.as_str(),
        // 36 px: a 6x6 patch grid where the checkpoint has 5x5.
        "data.image_size=36",
        "data.max_len=24",
        "model.embed_dim=16",
        "model.fusion.num_hidden_layers=1",
        "model.fusion.num_attention_heads=5",
        "model.fusion.intermediate_size=64",
    ]
    .iter()
    .chain(sets)
    .map(|s| s.to_string())
    .collect();
    layers
}

#[test]
fn meter_preset_loads_clip_and_roberta_checkpoints() {
    let loaded = meter_layers(&[]).load().unwrap();
    let m = &loaded.config.model;
    assert_eq!(
        (m.image.plugin.as_str(), m.text.plugin.as_str()),
        ("clip_vit", "roberta")
    );
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    assert!(
        tok.origin()
            .ends_with("roberta-mlm-h40-5heads/tokenizer.json"),
        "the RoBERTa checkpoint's byte-level BPE: {}",
        tok.origin()
    );
    assert_eq!((tok.special.cls, tok.special.pad), (0, 1), "<s>, <pad>");
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let vars = asm.vs.variables();
    let reports = apply_inits(&loaded, &vars).unwrap();
    let by_role = |r: &str| {
        reports
            .iter()
            .find(|x| x.role == r)
            .unwrap_or_else(|| panic!("no {r} report in {reports:?}"))
    };
    let image = by_role("image encoder");
    assert!(
        image.missing.is_empty() && image.mismatched.is_empty() && image.unused.is_empty(),
        "{image}"
    );
    assert_eq!(image.interpolated.len(), 1, "{image}");
    assert_eq!(
        vars["vision_encoder.embeddings.position_embedding.weight"].size(),
        [37, 36]
    );
    let text = by_role("text encoder");
    assert!(
        text.missing.is_empty() && text.mismatched.is_empty() && text.unused.is_empty(),
        "{text}"
    );
    // lm_head.dense (2), lm_head.layer_norm (2), lm_head.bias; the decoder is tied.
    let head = by_role("MLM head");
    assert_eq!((head.applied, head.missing.len()), (5, 0), "{head}");
    let ckpt = vlmatch::pretrained::read_checkpoint(&fixture("hf/roberta-mlm-h40-5heads")).unwrap();
    assert!(vars["generator.lm_head.dense.weight"].equal(&ckpt["lm_head.dense.weight"]));
}

#[test]
fn meter_preset_trains_from_clip_and_roberta_checkpoints() {
    let dir = scratch("meter-train");
    let s = train_exclusive(vlmatch::train::TrainOptions {
        layers: meter_layers(&[
            "train.steps=4",
            "train.checkpoint_every=0",
            "eval.at_end=false",
        ]),
        run_dir: Some(dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert_eq!(s.last_step, 4);
    for m in &s.logged {
        for key in ["loss", "itc", "itm", "mlm"] {
            let v = m[key].as_f64();
            assert!(v.is_some_and(f64::is_finite), "{key} in {m:?}");
        }
    }
    let recorded = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        recorded.contains("plugin = \"clip_vit\"") && recorded.contains("plugin = \"roberta\""),
        "{recorded}"
    );
    // The image checkpoint's normalisation, recorded for the run.
    let data: toml::Table = recorded.parse::<toml::Table>().unwrap()["data"]
        .as_table()
        .unwrap()
        .clone();
    assert_eq!(data["mean"].to_string(), "[0.25, 0.5, 0.75]");
    assert_eq!(data["std"].to_string(), "[0.125, 0.25, 0.5]");
}

#[test]
fn image_normalisation_comes_from_the_checkpoint_unless_set() {
    let from_checkpoint = meter_layers(&[]).load().unwrap().config.data;
    assert_eq!(
        (from_checkpoint.mean, from_checkpoint.std),
        ([0.25, 0.5, 0.75], [0.125, 0.25, 0.5]),
        "preprocessor_config.json's image_mean and image_std"
    );
    let set = meter_layers(&["data.mean=[0.5, 0.5, 0.5]"])
        .load()
        .unwrap()
        .config
        .data;
    assert_eq!(
        (set.mean, set.std),
        ([0.5; 3], [0.125, 0.25, 0.5]),
        "an explicit data.mean wins; data.std still the checkpoint's"
    );
    // Without preprocessor_config.json (the ViT fixtures): the default, CLIP's.
    let mut layers = micro_layers(&[]);
    layers.sets.push(format!(
        "model.image.init={}",
        fixture("hf/vit-40px-p8-3heads").display()
    ));
    let default = layers.load().unwrap().config.data;
    assert_eq!(default.mean, [0.481_454_66, 0.457_827_5, 0.408_210_73]);
}

#[test]
fn a_checkpoint_of_another_family_is_an_error_naming_plugin_and_model_type() {
    let roberta = fixture("hf/roberta-mlm-h40-5heads");
    let mut layers = micro_layers(&[]);
    layers
        .sets
        .push(format!("model.text.init={}", roberta.display()));
    let loaded = layers.load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let err = vlmatch::setup::model(&loaded, &tok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`model.text.init`")
            && err.contains("`roberta` checkpoint")
            && err.contains("plugin `bert`"),
        "{err}"
    );
    let section = clip_vit::ClipVitSection {
        init: Some(fixture("hf/vit-40px-p8-3heads")),
        ..Default::default()
    };
    let err = section.resolve("model.image").unwrap_err().to_string();
    assert!(
        err.contains("`vit` checkpoint") && err.contains("plugin `clip_vit`"),
        "{err}"
    );
}
