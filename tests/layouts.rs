//! Plugins own their checkpoint layout: each encoder and LM head that loads
//! HuggingFace checkpoints registers a `CheckpointLayout` with its factory,
//! and the host loads, fills masks with and exports models only through
//! the registry (`src/pretrained.rs`, `src/export.rs`).

mod common;
use common::*;
use std::collections::HashMap;
use tch::{Device, Kind, Tensor};
use vlmatch_registry::{Kind as PluginKind, Registry};

#[test]
fn the_builtin_encoders_and_heads_register_the_model_types_they_load() {
    let r = Registry::from_inventory().unwrap();
    let types = |kind, name| r.layout(kind, name).map(|l| l.model_types().to_vec());
    assert_eq!(types(PluginKind::Encoder, "bert"), Some(vec!["bert"]));
    assert_eq!(types(PluginKind::Encoder, "roberta"), Some(vec!["roberta"]));
    assert_eq!(types(PluginKind::Encoder, "vit"), Some(vec!["vit"]));
    assert_eq!(
        types(PluginKind::Encoder, "clip_vit"),
        Some(vec!["clip", "clip_vision_model"])
    );
    // ALBEF's fusion takes the upper layers of a BERT (or RoBERTa).
    assert_eq!(
        types(PluginKind::Encoder, "cross_attention"),
        Some(vec!["bert", "roberta"])
    );
    assert_eq!(types(PluginKind::Encoder, "co_attention"), None);
    assert_eq!(types(PluginKind::Generator, "mlm_head"), Some(vec!["bert"]));
    assert_eq!(
        types(PluginKind::Generator, "roberta_lm_head"),
        Some(vec!["roberta"])
    );
    let heads: Vec<&str> = r
        .loading(PluginKind::Generator, "roberta")
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(heads, ["roberta_lm_head"]);
}

/// A RoBERTa masked LM is a fill model too: the host picks `roberta` and
/// `roberta_lm_head` from its `model_type` and reproduces `transformers`'
/// MLM logits.
#[test]
fn a_roberta_masked_lm_loads_through_its_plugins_and_matches_transformers() {
    let dir = fixture("hf/roberta-mlm-h40-5heads");
    let lm = vlmatch::pretrained::load_masked_lm(&dir, Device::Cpu, Kind::Float).unwrap();
    assert!(lm.report.contains("MLM head"), "{}", lm.report);
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors"))
            .unwrap()
            .into_iter()
            .collect();
    let ids = &expected["input_ids"];
    let mask = &expected["attention_mask"];
    let batch = vlmatch_core::TextBatch {
        ids: ids.shallow_clone(),
        mask: mask.shallow_clone(),
    };
    let logits = tch::no_grad(|| {
        let states = lm
            .encoder
            .forward_t(vlmatch_core::EncoderInput::Text(&batch), false)
            .unwrap();
        lm.head.logits(&states, false).unwrap()
    });
    // Padded positions are unspecified; compare real tokens.
    let real = mask.to_kind(Kind::Bool).unsqueeze(-1);
    let diff = (logits - &expected["logits"])
        .abs()
        .masked_select(&real)
        .max()
        .double_value(&[]);
    assert!(diff < 1e-4, "MLM logits differ by {diff}");
    assert!(lm.store.variables().values().all(|t| !t.requires_grad()));
}

/// The generator owns the LM-head layouts it loads: `mlm_head` (BERT's
/// `cls.predictions.*`) given a RoBERTa text checkpoint is an error naming
/// the generator, the checkpoint's model type and the generator that loads it.
#[test]
fn a_generator_of_another_family_is_an_error_naming_both() {
    let roberta = fixture("hf/roberta-mlm-h40-5heads");
    let init = format!("model.text.init={}", roberta.display());
    let loaded = micro_layers(&[
        "model.text.plugin=\"roberta\"",
        &init,
        "model.fusion.num_attention_heads=5",
        "data.max_len=24",
    ])
    .load()
    .unwrap();
    let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let err = vlmatch::pretrained::apply_inits(&loaded, &asm.vs.variables())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("generator `mlm_head`")
            && err.contains("`roberta` checkpoint")
            && err.contains("`roberta_lm_head`"),
        "{err}"
    );
}
