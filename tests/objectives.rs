//! Objective behaviour beyond the presets: finite losses for any batch,
//! VL-RTD with its own generator encoder, and configuration errors.

mod common;
use common::*;
use proptest::prelude::*;
use std::sync::Arc;
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch_core::Forward;

fn vlmatch_layers_with(sets: &[&str]) -> vlmatch_registry::ConfigLayers {
    let mut layers = micro_layers(sets);
    layers.files.insert(
        0,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/vlmatch.toml"),
    );
    layers
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    /// Every loss of the full method (ITC, VL-RTD, FG-ITM with hard and
    /// swapped negatives, plus MLM) is finite for any batch of 2 or more,
    /// including batches where every pair shares one image.
    #[test]
    fn losses_are_finite_for_any_batch_size(b in 2usize..10, same_image in any::<bool>(), seed in 0i64..1000) {
        let loaded = vlmatch_layers_with(&["objectives.mlm.enabled=true"]).load().unwrap();
        let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
        let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
        let cfg = LoaderConfig::new(&loaded.config.data, b, None);
        // Captions of one image are consecutive pairs; `same_image` takes the
        // first image's captions repeatedly so no in-batch negative exists.
        let idx: Vec<usize> = if same_image { (0..b).map(|i| i % 3).collect() } else { (0..b).map(|i| i * 3).collect() };
        let batch = make_batch(&ds, &tok, &cfg, &idx).unwrap();
        let fwd = Forward::new(&asm.model, &batch, true);
        let mut names = Vec::new();
        for o in &asm.objectives {
            let out = o.objective.forward(&fwd, 0).unwrap();
            for (name, loss) in out.losses {
                let v = loss.double_value(&[]);
                prop_assert!(v.is_finite(), "{} = {} for batch {} (same image: {})", name, v, b, same_image);
                names.push(name);
            }
        }
        names.sort();
        prop_assert_eq!(names, ["fgitm", "gen", "itc", "mlm", "rtd"]);
    }
}

#[test]
fn rtd_generator_can_have_its_own_text_encoder() {
    let dir = scratch("rtd-own-generator");
    let layers = vlmatch_layers_with(&[
        "train.steps=6",
        "train.checkpoint_every=0",
        "eval.at_end=false",
        "objectives.rtd.share_text_encoder=false",
        "objectives.rtd.generator_text={plugin=\"bert\", hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32}",
    ]);
    let s = train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert!(s
        .logged
        .iter()
        .all(|m| m["gen"].as_f64().unwrap().is_finite()));
    let ckpt =
        tch::Tensor::read_safetensors(dir.join("checkpoints/step-00000006.safetensors")).unwrap();
    let names: Vec<&str> = ckpt.iter().map(|(k, _)| k.as_str()).collect();
    for expected in [
        "model.objectives.rtd.generator_text.embeddings.word_embeddings.weight",
        "model.objectives.rtd.generator_head.cls.predictions.bias",
    ] {
        assert!(
            names.contains(&expected),
            "no `{expected}` among {} tensors",
            names.len()
        );
    }
    let width = ckpt
        .iter()
        .find(|(k, _)| k == "model.objectives.rtd.generator_text.embeddings.word_embeddings.weight")
        .unwrap()
        .1
        .size()[1];
    assert_eq!(
        width, 16,
        "the generator encoder is the narrow one configured"
    );
}

#[test]
fn unshared_generator_without_its_section_is_a_config_error() {
    let loaded = vlmatch_layers_with(&["objectives.rtd.share_text_encoder=false"])
        .load()
        .unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let err = vlmatch::setup::model(&loaded, &tok)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config key `objectives.rtd`"), "{err}");
    assert!(err.contains("generator_text"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(8))]
    /// ITM reads only the fused `[CLS]`; the cross-attention fusion then
    /// skips the other positions in its last layer. The shortcut must give
    /// exactly position 0 of the full fusion, for any batch, fusion depth and
    /// padding, and the same gradients.
    #[test]
    fn fused_cls_equals_position_zero_of_full_fusion(b in 1usize..7, layers in 1i64..4, seed in 0i64..1000) {
        let loaded = micro_layers(&[&format!("model.fusion.num_hidden_layers={layers}")]).load().unwrap();
        let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
        let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
        let cfg = LoaderConfig::new(&loaded.config.data, b, None);
        let idx: Vec<usize> = (0..b).map(|i| (i * 7 + seed as usize) % ds.len()).collect();
        let batch = make_batch(&ds, &tok, &cfg, &idx).unwrap();
        let fwd = Forward::new(&asm.model, &batch, true);
        let (text, image) = (fwd.text().unwrap(), fwd.image().unwrap());
        let full = asm.model.fuse(text, image, true).unwrap();
        let cls = asm.model.fuse_cls(text, image, true).unwrap();
        prop_assert_eq!(cls.hidden.size(), vec![b as i64, 1, full.hidden.size()[2]]);
        let diff = (cls.hidden.squeeze_dim(1) - full.cls()).abs().max().double_value(&[]);
        prop_assert!(diff < 1e-5, "fused [CLS] differs by {}", diff);
        // Gradients of a pair-level loss agree as well.
        let grads = |x: &tch::Tensor| {
            let vars = asm.vs.trainable_variables();
            let g = tch::Tensor::run_backward(&[x.sum(tch::Kind::Float)], &vars, true, false);
            g.into_iter().map(|t| if t.defined() { t.flatten(0, -1) } else { t }).collect::<Vec<_>>()
        };
        let (a, c) = (grads(&full.cls()), grads(&cls.hidden));
        let mut compared = 0;
        for (x, y) in a.iter().zip(&c) {
            prop_assert_eq!(x.defined(), y.defined());
            if x.defined() {
                let d = (x - y).abs().max().double_value(&[]);
                prop_assert!(d < 1e-4, "gradient differs by {}", d);
                compared += 1;
            }
        }
        prop_assert!(compared > 10, "only {} gradients compared", compared);
    }
}

/// The cross-attention fusion with its shared keys and values hidden: the
/// trait's default `forward_cls_indexed` (gather each pair's image, then
/// `forward_cls`), the plain path.
struct PlainPairs(std::rc::Rc<dyn vlmatch_core::Encoder>);

impl vlmatch_core::Encoder for PlainPairs {
    fn modality(&self) -> vlmatch_core::Modality {
        self.0.modality()
    }
    fn hidden_size(&self) -> i64 {
        self.0.hidden_size()
    }
    fn forward_t(
        &self,
        input: vlmatch_core::EncoderInput<'_>,
        train: bool,
    ) -> vlmatch_core::Result<vlmatch_core::Encoded> {
        self.0.forward_t(input, train)
    }
    fn forward_cls(
        &self,
        input: vlmatch_core::EncoderInput<'_>,
        train: bool,
    ) -> vlmatch_core::Result<vlmatch_core::Encoded> {
        self.0.forward_cls(input, train)
    }
}

/// Training's ITM groups (hard negatives, whose images are the batch's own,
/// and FG-ITM's swapped texts) fuse each image's keys and values once per
/// layer. That is exact: every loss and every parameter's gradient equals
/// the plain path's within 1e-6 in fp32, with dropout on (both paths draw the
/// same masks) and with images repeated within the batch.
#[test]
fn shared_image_keys_and_values_in_training_are_exact() {
    let loaded = vlmatch_layers_with(&[]).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(11);
    let (mut asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
    // Two captions of image 0 and of image 1, so images repeat.
    let batch = make_batch(&ds, &tok, &cfg, &[0, 1, 3, 4, 6, 9, 12, 15]).unwrap();
    let run = |asm: &vlmatch_registry::Assembly| {
        tch::manual_seed(5);
        for v in asm.vs.trainable_variables() {
            let mut g = v.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let fwd = Forward::new(&asm.model, &batch, true);
        let mut losses = Vec::new();
        let mut total = tch::Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
        for o in &asm.objectives {
            for (name, loss) in o.objective.forward(&fwd, 0).unwrap().losses {
                losses.push((name, loss.double_value(&[])));
                total += loss;
            }
        }
        total.backward();
        let mut grads: Vec<(String, tch::Tensor)> = asm
            .vs
            .variables()
            .into_iter()
            .filter(|(_, v)| v.grad().defined())
            .map(|(k, v)| (k, v.grad().copy()))
            .collect();
        grads.sort_by(|a, b| a.0.cmp(&b.0));
        (losses, grads)
    };
    let (shared_losses, shared_grads) = run(&asm);
    let fusion = asm.model.fusion.clone();
    asm.model.fusion = std::rc::Rc::new(PlainPairs(fusion));
    let (plain_losses, plain_grads) = run(&asm);
    assert!(shared_losses.iter().any(|(n, _)| n == "fgitm"));
    assert_eq!(shared_losses.len(), plain_losses.len());
    for ((name, a), (_, b)) in shared_losses.iter().zip(&plain_losses) {
        assert!((a - b).abs() <= 1e-6, "{name}: {a} shared vs {b} plain");
    }
    assert_eq!(shared_grads.len(), plain_grads.len());
    assert!(shared_grads
        .iter()
        .any(|(k, _)| k.contains("crossattention")));
    for ((name, a), (_, b)) in shared_grads.iter().zip(&plain_grads) {
        let diff = (a - b).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "gradient of {name} differs by {diff}");
    }
}
