//! The METER-style co-attention fusion (`model.fusion.plugin =
//! "co_attention"`): a drop-in fusion that trains with the baseline and the
//! full-method objectives, ignores padding, lets each stream read the other,
//! and whose `forward_cls` shortcut is exact.

mod common;
use common::*;
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::train::{TrainOptions, TrainSummary};
use vlmatch_core::{Encoded, Forward};
use vlmatch_registry::{Assembly, ModelEnv};

/// The only change from the micro model: the fusion plugin and its keys
/// (switching the plugin drops the micro file's cross-attention keys).
const CO: [&str; 4] = [
    "model.fusion.plugin=\"co_attention\"",
    "model.fusion.num_hidden_layers=1",
    "model.fusion.num_attention_heads=2",
    "model.fusion.intermediate_size=64",
];

const STEPS: usize = 40;

fn train_co(preset: Option<&str>, name: &str) -> TrainSummary {
    let steps = format!("train.steps={STEPS}");
    let mut sets = CO.to_vec();
    sets.extend([
        steps.as_str(),
        "train.checkpoint_every=0",
        "eval.at_end=false",
    ]);
    let mut layers = micro_layers(&sets);
    if let Some(p) = preset {
        layers.files.insert(
            0,
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{p}.toml")),
        );
    }
    train_exclusive(TrainOptions {
        layers,
        run_dir: Some(scratch(name)),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap()
}

fn assert_all_fall(name: &str, s: &TrainSummary, keys: &[&str]) {
    for key in keys {
        let v: Vec<f64> = s
            .logged
            .iter()
            .map(|m| {
                m[*key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: no `{key}` in {m:?}"))
            })
            .collect();
        assert_eq!(v.len(), STEPS);
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: `{key}` not finite: {v:?}"
        );
        let head = v[..8].iter().sum::<f64>() / 8.0;
        let tail = v[STEPS - 8..].iter().sum::<f64>() / 8.0;
        assert!(
            tail < head,
            "{name}: `{key}` did not fall ({head:.4} -> {tail:.4})"
        );
    }
}

#[test]
fn co_attention_trains_with_the_baseline_objectives() {
    let s = train_co(None, "co-attention-baseline");
    assert_all_fall("baseline", &s, &["loss", "itc", "itm", "mlm"]);
}

#[test]
fn co_attention_trains_with_the_vlmatch_objectives() {
    let s = train_co(Some("vlmatch"), "co-attention-vlmatch");
    assert_all_fall("vlmatch", &s, &["loss", "itc", "fgitm", "gen", "rtd"]);
}

/// A co-attention micro model (image width 48, text width 32, so the two
/// input transforms differ) and a batch of `b` pairs.
fn model(sets: &[&str], b: usize) -> (Assembly, ModelEnv, vlmatch_core::Batch) {
    let mut all = CO.to_vec();
    all.push("model.image.hidden_size=48");
    all.extend(sets);
    let loaded = micro_layers(&all).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    tch::manual_seed(7);
    let (asm, env) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, b, None);
    let idx: Vec<usize> = (0..b).map(|i| i * 5).collect();
    let batch = make_batch(&ds, &tok, &cfg, &idx).unwrap();
    (asm, env, batch)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// `max |a - b|` relative to `max |a|`. At initialisation (weights of std
/// 0.02, width 32) one stream moves the other by 3e-4 to 4e-3 of its scale;
/// a dependence that is absent leaves the output bit-identical, so `1e-5`
/// tells the two apart, well above float rounding.
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_diff(a, b) / a.abs().max().double_value(&[]).max(1e-12)
}

#[test]
fn parameters_have_per_stream_hf_names_and_the_fusion_keeps_the_text_width() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _, _) = model(&[], 2);
    let vars = asm.vs.variables();
    for name in [
        "fusion.text_transform.weight",
        "fusion.image_transform.weight",
        "fusion.token_type_embeddings.weight",
        "fusion.text_layer.0.attention.self.query.weight",
        "fusion.text_layer.0.crossattention.self.key.weight",
        "fusion.text_layer.0.output.LayerNorm.bias",
        "fusion.image_layer.0.attention.output.dense.weight",
        "fusion.image_layer.0.crossattention.output.LayerNorm.weight",
        "fusion.image_layer.0.intermediate.dense.weight",
        "fusion.text_pooler.dense.weight",
        "fusion.image_pooler.dense.weight",
        "fusion.pool_proj.weight",
    ] {
        assert!(
            vars.contains_key(name),
            "no `{name}` in {:?}",
            vars.keys()
                .filter(|k| k.starts_with("fusion."))
                .collect::<Vec<_>>()
        );
    }
    assert_eq!(vars["fusion.image_transform.weight"].size(), [32, 48]);
    assert_eq!(vars["fusion.pool_proj.weight"].size(), [32, 64]);
    assert_eq!(vars["fusion.token_type_embeddings.weight"].size(), [2, 32]);
    assert_eq!(asm.model.fusion.hidden_size(), 32);
}

#[test]
fn padding_does_not_change_fused_states_at_real_positions() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, env, batch) = model(&["model.fusion.num_hidden_layers=2"], 2);
    let m = &asm.model;
    let dev = m.device;
    tch::no_grad(|| {
        let image = m
            .image
            .forward_t(vlmatch_core::EncoderInput::Image(&batch.images), false)
            .unwrap();
        let image = image.select(&Tensor::from_slice(&[0i64, 0]).to_device(dev));
        // The same caption alone and padded by a longer one in its batch,
        // through the text encoder and the fusion.
        let short = "a red circle";
        let alone = env.text.encode(&[short, short], dev);
        let padded = env.text.encode(
            &[
                short,
                "a big blue square next to a small green triangle on the left",
            ],
            dev,
        );
        let l = alone.ids.size()[1];
        assert!(padded.ids.size()[1] > l + 3);
        let fuse = |t: &vlmatch_core::TextBatch| {
            let text = m
                .text
                .forward_t(vlmatch_core::EncoderInput::Text(t), false)
                .unwrap();
            m.fuse(&text, &image, false).unwrap().hidden.get(0)
        };
        let d = max_diff(&fuse(&alone), &fuse(&padded).narrow(0, 0, l));
        assert!(d < 1e-5, "padding changed the fused caption by {d}");

        // Garbage states at padded positions change nothing either.
        let text = m
            .text
            .forward_t(vlmatch_core::EncoderInput::Text(&batch.text), false)
            .unwrap();
        let (b, l, w) = text.hidden.size3().unwrap();
        let junk = Encoded {
            hidden: Tensor::cat(
                &[
                    &text.hidden,
                    &(Tensor::randn([b, 5, w], (Kind::Float, dev)) * 10.0),
                ],
                1,
            ),
            mask: Tensor::cat(&[&text.mask, &text.mask.zeros_like().narrow(1, 0, 5)], 1),
        };
        let full = m.fuse(&text, &image, false).unwrap().hidden;
        let more = m.fuse(&junk, &image, false).unwrap().hidden.narrow(1, 0, l);
        let real = text.mask.to_kind(Kind::Float).unsqueeze(-1);
        let d = max_diff(&(&full * &real), &(&more * &real));
        assert!(d < 1e-5, "padding states leaked into the fusion by {d}");
    });
}

#[test]
fn each_stream_reads_the_other() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, _, batch) = model(&[], 4);
    let m = &asm.model;
    let vars = asm.vs.variables();
    tch::no_grad(|| {
        let fwd = Forward::new(m, &batch, false);
        let (text, image) = (fwd.text().unwrap(), fwd.image().unwrap());
        let base = m.fuse(text, image, false).unwrap().hidden;
        let l = base.size()[1];
        let tokens =
            |x: &Tensor| x.narrow(1, 1, l - 1) * text.mask.narrow(1, 1, l - 1).unsqueeze(-1);
        // Another image: the text tokens change (the text stream's
        // cross-attention reads the image).
        let other_image = Encoded {
            hidden: image.hidden.roll([1], [0]),
            mask: image.mask.shallow_clone(),
        };
        let swapped = m.fuse(text, &other_image, false).unwrap().hidden;
        let d = rel_diff(&tokens(&base), &tokens(&swapped));
        assert!(d > 1e-5, "text tokens ignore the image ({d})");
        // Other words (position 0 kept): the pair summary changes.
        let noise = Tensor::randn_like(&text.hidden) * text.mask.unsqueeze(-1);
        let _ = noise.narrow(1, 0, 1).zero_();
        let other_text = Encoded {
            hidden: &text.hidden + noise,
            mask: text.mask.shallow_clone(),
        };
        let cls = |t: &Encoded, i: &Encoded| m.fuse(t, i, false).unwrap().hidden.select(1, 0);
        let d = rel_diff(&cls(text, image), &cls(&other_text, image));
        assert!(d > 1e-5, "position 0 ignores the words ({d})");

        // With one pooler silenced, position 0 comes from the other stream
        // alone; it still sees both modalities, so each stream reads the
        // other.
        let silence = |stream: &str| {
            let w = &vars[&format!("fusion.{stream}_pooler.dense.weight")];
            let saved = w.copy();
            let _ = w.shallow_clone().zero_();
            saved
        };
        let restore = |stream: &str, saved: Tensor| {
            vars[&format!("fusion.{stream}_pooler.dense.weight")]
                .shallow_clone()
                .copy_(&saved);
        };
        let saved = silence("text");
        let d = rel_diff(&cls(text, image), &cls(&other_text, image));
        assert!(d > 1e-5, "the image stream ignores the text ({d})");
        restore("text", saved);
        let saved = silence("image");
        let d = rel_diff(&cls(text, image), &cls(text, &other_image));
        assert!(d > 1e-5, "the text stream's [CLS] ignores the image ({d})");
        restore("image", saved);
    });
}

#[test]
fn fused_cls_equals_position_zero_of_full_fusion() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    for layers in [1, 3] {
        let (asm, _, batch) = model(&[&format!("model.fusion.num_hidden_layers={layers}")], 5);
        let m = &asm.model;
        let fwd = Forward::new(m, &batch, true);
        let (text, image) = (fwd.text().unwrap(), fwd.image().unwrap());
        let full = m.fuse(text, image, true).unwrap();
        let cls = m.fuse_cls(text, image, true).unwrap();
        assert_eq!(cls.hidden.size(), [5, 1, 32]);
        assert_eq!(cls.mask.size(), [5, 1]);
        let d = max_diff(&cls.hidden.squeeze_dim(1), &full.cls());
        assert!(d < 1e-5, "{layers} layers: fused [CLS] differs by {d}");
        let grads = |x: &Tensor| {
            let vars = asm.vs.trainable_variables();
            Tensor::run_backward(&[x.sum(Kind::Float)], &vars, true, false)
        };
        let (a, c) = (grads(&full.cls()), grads(&cls.hidden));
        let mut compared = 0;
        for (x, y) in a.iter().zip(&c) {
            assert_eq!(x.defined(), y.defined());
            if x.defined() {
                let d = max_diff(x, y);
                assert!(d < 1e-4, "{layers} layers: gradient differs by {d}");
                compared += 1;
            }
        }
        assert!(compared > 20, "only {compared} gradients compared");
    }
}

#[test]
fn bad_co_attention_keys_are_config_errors_naming_the_key() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let err = |sets: &[&str]| {
        let mut all = CO.to_vec();
        all.extend(sets);
        let loaded = micro_layers(&all).load().unwrap();
        let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
        vlmatch::setup::model(&loaded, &tok)
            .err()
            .expect("a config error")
            .to_string()
    };
    let e = err(&["model.fusion.num_attention_heads=3"]);
    assert!(
        e.contains("config key `model.fusion.num_attention_heads`") && e.contains("32"),
        "{e}"
    );
    let e = err(&["model.fusion.hidden_size=48"]);
    assert!(
        e.contains("config key `model.fusion.hidden_size`") && e.contains("text"),
        "{e}"
    );
    let e = err(&["model.fusion.num_hidden_layers=0"]);
    assert!(e.contains("`model.fusion.num_hidden_layers`"), "{e}");
    let e = err(&["model.fusion.num_heads=2"]);
    assert!(e.contains("num_heads"), "{e}");
    // The text width itself is accepted.
    let mut all = CO.to_vec();
    all.push("model.fusion.hidden_size=32");
    let loaded = micro_layers(&all).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    assert!(vlmatch::setup::model(&loaded, &tok).is_ok());
}
