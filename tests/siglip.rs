//! SigLIP (`objective "siglip"`, `configs/siglip.toml`) in runs: the layer
//! replaces ITC in every preset, `[momentum]` with it is a config error,
//! ITM's hard negatives are drawn from its similarities, and it trains;
//! its loss is finite and order-free for any batch (proptest).
//! Its loss and gradients against PyTorch are in `golden_losses.rs`, two
//! ranks against one process in `distributed.rs`.

mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use tch::Tensor;
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::train::TrainOptions;
use vlmatch_core::Forward;
use vlmatch_registry::LoadedConfig;

fn config(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The micro model with `configs/<preset>.toml` (if any), then
/// `configs/siglip.toml`, then `extra` files, then `sets`.
fn with_siglip(
    preset: Option<&str>,
    extra: &[&str],
    sets: &[&str],
) -> vlmatch_registry::ConfigLayers {
    let mut layers = micro_layers(sets);
    if let Some(p) = preset {
        layers.files.push(config(&format!("configs/{p}.toml")));
    }
    layers.files.push(config("configs/siglip.toml"));
    layers.files.extend(extra.iter().map(|f| config(f)));
    layers
}

fn enabled(loaded: &LoadedConfig) -> Vec<String> {
    loaded
        .config
        .objectives
        .iter()
        .filter(|(_, o)| o.enabled)
        .map(|(k, _)| k.clone())
        .collect()
}

/// Over the model presets and each experiment preset, the layer turns ITC
/// off and SigLIP on and leaves the other objectives as they were; on the
/// micro model each preset's objectives then give finite losses, SigLIP's
/// among them.
#[test]
fn the_siglip_layer_replaces_itc_in_every_preset() {
    for preset in ["base", "tiny"] {
        let layers = vlmatch_registry::ConfigLayers {
            base: Some(vlmatch::run::preset(preset).unwrap()),
            files: vec![config("configs/siglip.toml")],
            env: false,
            sets: Vec::new(),
        };
        let objectives = enabled(&layers.load().unwrap());
        assert!(
            objectives.contains(&"siglip".to_string()) && !objectives.contains(&"itc".to_string()),
            "{preset}: {objectives:?}"
        );
    }
    for preset in ["baseline", "rtd", "fgitm", "vlmatch"] {
        let without = micro_layers(&[]);
        let mut without_layers = without;
        without_layers
            .files
            .push(config(&format!("configs/{preset}.toml")));
        let before = enabled(&without_layers.load().unwrap());
        let loaded = with_siglip(Some(preset), &[], &[]).load().unwrap();
        let after = enabled(&loaded);
        let mut expected: Vec<String> = before.into_iter().filter(|o| o != "itc").collect();
        expected.push("siglip".into());
        expected.sort();
        assert_eq!(after, expected, "{preset}");

        let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(3);
        let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
        let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
        let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
        let batch = make_batch(&ds, &tok, &cfg, &[0, 1, 3, 6, 9, 12, 15, 18]).unwrap();
        let fwd = Forward::new(&asm.model, &batch, true);
        let mut losses = Vec::new();
        for o in &asm.objectives {
            for (name, loss) in o.objective.forward(&fwd, 0).unwrap().losses {
                let v = loss.double_value(&[]);
                assert!(v.is_finite(), "{preset}: {name} = {v}");
                losses.push(name);
            }
        }
        assert!(
            losses.contains(&"siglip".to_string()),
            "{preset}: {losses:?}"
        );
        assert!(!losses.contains(&"itc".to_string()), "{preset}: {losses:?}");
    }
}

/// `[momentum]` (configs/mod.toml, `momentum.enabled`, or the hook's own
/// `[hooks.momentum]`) with SigLIP stops before training with one message
/// naming both keys; so does a bad `init_scale`.
#[test]
fn siglip_with_momentum_is_a_config_error_naming_the_keys() {
    let cases: [(&[&str], &[&str], &[&str]); 4] = [
        (
            &["configs/mod.toml"],
            &[],
            &["objectives.siglip", "momentum.enabled"],
        ),
        (
            &[],
            &["momentum.enabled=true"],
            &["objectives.siglip", "momentum.enabled"],
        ),
        (
            &[],
            &["hooks.momentum.priority=10"],
            &["objectives.siglip", "`[hooks.momentum]`"],
        ),
        (
            &[],
            &["objectives.siglip.init_scale=0.0"],
            &["objectives.siglip.init_scale", "> 0"],
        ),
    ];
    for (files, sets, expected) in cases {
        let loaded = with_siglip(Some("baseline"), files, sets).load().unwrap();
        let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
        let err = match vlmatch::setup::model(&loaded, &tok) {
            Ok(_) => panic!("{files:?} {sets:?}: built"),
            Err(e) => e.to_string(),
        };
        for part in expected {
            assert!(
                err.contains(part),
                "{files:?} {sets:?}: `{part}` not in: {err}"
            );
        }
        assert!(!err.contains('\n'), "one line: {err}");
    }
    // And through the command line: an error line, not a panic.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(["train", "--quiet", "--config"])
        .arg(fixture("micro.toml"))
        .args(["--config"])
        .arg(config("configs/baseline.toml"))
        .args(["--config"])
        .arg(config("configs/siglip.toml"))
        .args(["--config"])
        .arg(config("configs/mod.toml"))
        .arg("--run-dir")
        .arg(scratch("siglip-mod"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("objectives.siglip") && stderr.contains("momentum.enabled"),
        "{stderr}"
    );
}

/// With SigLIP in place of ITC, the similarities that in-batch hard
/// negatives are drawn from are SigLIP's `t x.y` (its current `t`, not
/// ITC's temperature), and the sampler draws from them.
#[test]
fn itm_hard_negatives_are_drawn_from_siglips_similarities() {
    let loaded = with_siglip(Some("baseline"), &[], &[]).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    tch::manual_seed(4);
    let (asm, _) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let vars = asm.vs.variables();
    let log_scale = &vars["objectives.siglip.logit_scale"];
    let bias = &vars["objectives.siglip.logit_bias"];
    assert!((log_scale.double_value(&[]) - 10f64.ln()).abs() < 1e-6);
    assert_eq!(bias.double_value(&[]), -10.0);
    // As if training had moved t to 3.
    let _ = tch::no_grad(|| log_scale.shallow_clone().fill_(3f64.ln()));
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
    let batch = make_batch(&ds, &tok, &cfg, &[0, 1, 3, 6, 9, 12, 15, 18]).unwrap();
    let fwd = Forward::new(&asm.model, &batch, true);
    let (i2t, t2i, _) = fwd.negative_candidates().unwrap();
    let (x, y) = fwd.embeds().unwrap();
    let expected = x.matmul(&y.tr()) * 3.0;
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    assert!(diff(&i2t, &expected) < 1e-5, "i2t: {i2t} vs {expected}");
    assert!(diff(&t2i, &expected.tr()) < 1e-5);
    let itc = &fwd.similarity().unwrap().i2t;
    assert!(diff(&i2t, itc) > 1e-3, "not ITC's similarities");
    // ITM, whose hard negatives come from them, and SigLIP give finite
    // losses on this forward.
    let mut names = Vec::new();
    for o in &asm.objectives {
        for (name, loss) in o.objective.forward(&fwd, 0).unwrap().losses {
            assert!(loss.double_value(&[]).is_finite(), "{name}");
            names.push(name);
        }
    }
    assert_eq!(names, ["itm", "mlm", "siglip"]);
}

/// The baseline with SigLIP in place of ITC trains: SigLIP's, ITM's and
/// MLM's losses fall over 40 micro steps, and `t` and `b` move.
#[test]
fn siglip_trains_with_its_loss_falling() {
    let layers = with_siglip(
        Some("baseline"),
        &[],
        &[
            "train.steps=40",
            "train.checkpoint_every=0",
            "eval.at_end=false",
        ],
    );
    let s = train_exclusive(TrainOptions {
        layers,
        run_dir: Some(scratch("siglip-train")),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    let series = |key: &str| -> Vec<f64> {
        s.logged
            .iter()
            .map(|m| {
                m[key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("no `{key}` in {m:?}"))
            })
            .collect()
    };
    for key in ["siglip", "itm", "mlm"] {
        let v = series(key);
        assert_eq!(v.len(), 40);
        assert!(v.iter().all(|x| x.is_finite()), "{key}: {v:?}");
        let head = v[..8].iter().sum::<f64>() / 8.0;
        let tail = v[32..].iter().sum::<f64>() / 8.0;
        assert!(tail < head, "`{key}` did not fall ({head:.4} -> {tail:.4})");
    }
    let (scale, bias) = (series("siglip_scale"), series("siglip_bias"));
    assert!((scale[0] - 10.0).abs() < 0.1, "{scale:?}");
    assert!(
        scale[39] != scale[0] && bias[39] != bias[0],
        "t and b are learnt"
    );
    assert!(!s.logged[0].contains_key("itc"));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// For any batch, features, positive relation, scale (t up to e^10)
    /// and bias, SigLIP's loss is finite and non-negative, its gradients
    /// are finite (no overflow at large logits), and it does not depend on
    /// the order of the pairs.
    #[test]
    fn siglip_is_finite_and_order_free_for_any_batch(
        n in 1i64..12,
        dim in 1i64..8,
        log_scale in -3.0f64..10.0,
        bias in -50.0f64..50.0,
        seed in 0i64..10_000,
    ) {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        tch::manual_seed(seed);
        let unit = |t: Tensor| &t / t.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12);
        let x = unit(Tensor::randn([n, dim], (tch::Kind::Float, tch::Device::Cpu)));
        let y = unit(Tensor::randn([n, dim], (tch::Kind::Float, tch::Device::Cpu)));
        // A symmetric relation holding the diagonal, with random
        // off-diagonal positives.
        let r = Tensor::rand([n, n], (tch::Kind::Float, tch::Device::Cpu)).lt(0.3);
        let positives = r.logical_or(&r.tr()).logical_or(&Tensor::eye(n, (tch::Kind::Bool, tch::Device::Cpu)));
        let x = x.set_requires_grad(true);
        let y = y.set_requires_grad(true);
        let t = Tensor::from(log_scale as f32).set_requires_grad(true);
        let b = Tensor::from(bias as f32).set_requires_grad(true);
        let loss = siglip::siglip_loss(&x, &y, &positives, &t, &b);
        let value = loss.double_value(&[]);
        proptest::prop_assert!(value.is_finite() && value >= 0.0, "loss {}", value);
        loss.backward();
        for (name, g) in [("x", x.grad()), ("y", y.grad()), ("t'", t.grad()), ("b", b.grad())] {
            proptest::prop_assert!(
                g.isfinite().all().int64_value(&[]) == 1,
                "gradient of {} not finite", name
            );
        }
        let perm = Tensor::randperm(n, (tch::Kind::Int64, tch::Device::Cpu));
        let permuted = tch::no_grad(|| {
            siglip::siglip_loss(
                &x.index_select(0, &perm),
                &y.index_select(0, &perm),
                &positives.index_select(0, &perm).index_select(1, &perm),
                &t,
                &b,
            )
            .double_value(&[])
        });
        proptest::prop_assert!(
            (permuted - value).abs() <= 1e-4 * value.abs().max(1.0),
            "{} permuted vs {}", permuted, value
        );
    }
}
