//! Training from HuggingFace-layout checkpoints through config alone:
//! `model.*.init`, ALBEF's split of one BERT into text and fusion layers,
//! the vocabulary taken from the checkpoint, and a load report.

mod common;
use common::*;
use std::sync::Arc;
use vlmatch::pretrained::apply_inits;
use vlmatch_registry::ConfigLayers;

fn layers(sets: &[&str]) -> ConfigLayers {
    ConfigLayers {
        base: Some(vlmatch::run::preset(fixture("hf-init.toml").to_str().unwrap()).unwrap()),
        files: vec![],
        env: false,
        sets: sets.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn albef_initialisation_loads_text_fusion_and_image_weights() {
    let loaded = layers(&[]).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    assert_eq!(tok.vocab_size(), 73, "the tokenizer is the checkpoint's");
    assert!(
        tok.origin().ends_with("tokenizer.json"),
        "model.text.init's tokenizer.json is preferred to its vocab.txt: {}",
        tok.origin()
    );
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let vars = asm.vs.variables();
    let reports = apply_inits(&loaded, &vars).unwrap();
    let by_role = |r: &str| {
        reports
            .iter()
            .find(|x| x.role == r)
            .unwrap_or_else(|| panic!("no {r} report"))
    };

    let text = by_role("text encoder");
    // Embeddings (3 tables + LayerNorm) and one layer of 16 tensors.
    assert_eq!(
        (text.applied, text.missing.len(), text.mismatched.len()),
        (5 + 16, 0, 0),
        "{text}"
    );
    assert!(
        text.unused
            .iter()
            .all(|n| !n.starts_with("encoder.layer.1.")),
        "layer 1 feeds the fusion: {text}"
    );

    let fusion = by_role("fusion encoder");
    assert_eq!((fusion.applied, fusion.missing.len()), (16, 0), "{fusion}");
    assert!(
        !fusion.new.is_empty() && fusion.new.iter().all(|n| n.contains(".crossattention.")),
        "{fusion}"
    );

    let image = by_role("image encoder");
    assert_eq!(
        (image.missing.len(), image.mismatched.len()),
        (0, 0),
        "{image}"
    );

    // The applied values are the checkpoint's: fusion layer 0 is BERT layer 1.
    let ckpt = vlmatch::pretrained::read_checkpoint(&fixture("hf/bert-h48-3heads-vocab")).unwrap();
    let theirs = &ckpt["encoder.layer.1.attention.self.query.weight"];
    assert!(vars["fusion.layer.0.attention.self.query.weight"].equal(theirs));
}

#[test]
fn a_preset_built_on_checkpoints_trains() {
    let dir = scratch("hf-init-train");
    let s = train_exclusive(vlmatch::train::TrainOptions {
        layers: layers(&["eval.at_end=false"]),
        run_dir: Some(dir),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert_eq!(s.last_step, 4);
    assert!(s
        .logged
        .iter()
        .all(|m| m["loss"].as_f64().unwrap().is_finite()));
}

#[test]
fn init_errors_name_key_and_checkpoint() {
    let contradicting = layers(&["model.text.hidden_size=64"]).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&contradicting).unwrap());
    let err = vlmatch::setup::model(&contradicting, &tok)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("`model.text.hidden_size` = 64 contradicts")
            && err.contains("hidden_size = 48"),
        "{err}"
    );

    let too_deep = layers(&["model.text.num_hidden_layers=5"]).load().unwrap();
    let err = vlmatch::setup::model(&too_deep, &tok)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("the checkpoint has 2 layers"), "{err}");
}

#[test]
fn vit_at_another_resolution_gets_bicubic_position_embeddings_like_pytorch() {
    // The checkpoint is for 40 px (5x5 patches); train at 48 px (6x6).
    let loaded = layers(&["data.image_size=48"]).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let vars = asm.vs.variables();
    let reports = apply_inits(&loaded, &vars).unwrap();
    let image = reports.iter().find(|r| r.role == "image encoder").unwrap();
    assert_eq!(image.interpolated.len(), 1, "{image}");
    assert!(
        image.mismatched.is_empty() && image.missing.is_empty(),
        "{image}"
    );
    let golden: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(fixture("pos_embed_5x5_to_6x6.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ours = &vars["vision_encoder.embeddings.position_embeddings"];
    let diff = (ours - &golden["output"]).abs().max().double_value(&[]);
    assert!(
        diff < 1e-5,
        "differs from torch.nn.functional.interpolate(bicubic) by {diff}"
    );
}

#[test]
fn data_vocab_names_a_tokenizer_json_a_vocab_txt_or_a_directory() {
    let hf = fixture("hf/bert-h48-3heads-vocab");
    let bpe = fixture("hf/tokenizer-roberta-bpe/tokenizer.json");
    let tok = |vocab: &std::path::Path| {
        let set = format!("data.vocab={}", vocab.display());
        vlmatch::setup::tokenizer(&layers(&[&set]).load().unwrap())
    };
    let t = tok(&bpe).unwrap();
    assert_eq!((t.origin(), t.vocab_size()), (bpe.to_str().unwrap(), 300));
    assert_eq!(t.token(t.special.cls), "<s>");
    let t = tok(&hf.join("vocab.txt")).unwrap();
    assert!(t.hf().is_none() && t.origin().ends_with("vocab.txt"));
    let t = tok(&hf).unwrap();
    assert!(t.hf().is_some() && t.origin().ends_with("tokenizer.json"));
    let missing = hf.join("no-such-tokenizer.json");
    let err = tok(&missing).err().unwrap().to_string();
    assert!(err.contains("no-such-tokenizer.json"), "{err}");
}
