//! ALBEF's momentum distillation (`[momentum]`, `src/momentum.rs`): the
//! EMA hook, the queues and their positives, checkpoints that hold both,
//! exact resume, and the queue-size error.

mod common;
use common::*;
use std::collections::HashMap;
use std::sync::Arc;
use tch::Tensor;
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::momentum::MomentumTrainer;
use vlmatch_core::Forward;

/// MoD over the micro model: batch 8, a queue of four batches.
const MOD: [&str; 2] = ["momentum.enabled=true", "momentum.queue_size=32"];

fn with_mod(extra: &[&'static str]) -> Vec<&'static str> {
    MOD.iter().chain(extra).copied().collect()
}

fn metrics(dir: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("time_s");
            v
        })
        .collect()
}

fn checkpoint(dir: &std::path::Path, step: i64) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(
        dir.join("checkpoints")
            .join(format!("step-{step:08}.safetensors")),
    )
    .unwrap()
    .into_iter()
    .collect()
}

/// The micro model's assembly and its momentum copy, built as the trainer
/// builds them.
fn build(
    sets: &[&str],
) -> (
    vlmatch_registry::Assembly,
    MomentumTrainer,
    Arc<vlmatch::tokenizer::Tokenizer>,
    vlmatch_registry::LoadedConfig,
) {
    let loaded = micro_layers(sets).load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    tch::manual_seed(7);
    let (asm, env) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let m = MomentumTrainer::build(&loaded, &env, &asm, 1, Some(10))
        .unwrap()
        .expect("momentum.enabled");
    (asm, m, tok, loaded)
}

#[test]
fn momentum_update_is_the_ema_of_applied_steps_only() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, m, _, _) = build(&MOD);
    let theta: HashMap<String, Tensor> = asm.vs.variables().into_iter().collect();
    let followed: Vec<String> = m.followed().map(String::from).collect();
    for role in [
        "vision_encoder.",
        "text_encoder.",
        "fusion.",
        "vision_proj.",
        "text_proj.",
    ] {
        assert!(
            followed.iter().any(|n| n.starts_with(role)),
            "{role} not followed: {followed:?}"
        );
    }
    assert!(
        !followed.iter().any(|n| n == "temp"),
        "the temperature is not an EMA"
    );
    let saved = |m: &MomentumTrainer| -> HashMap<String, Tensor> {
        vlmatch::hooks::state_tensors("momentum", m)
            .into_iter()
            .map(|(n, t)| (n, t.copy()))
            .collect()
    };
    // Starts as a copy of the trained weights.
    let m0 = saved(&m);
    for n in &followed {
        assert!(
            m0[&format!("momentum.model.{n}")].equal(&theta[n]),
            "{n} not copied"
        );
    }
    // Move theta, then a skipped step leaves m alone and an applied one
    // moves it by (1 - mu).
    tch::no_grad(|| {
        for n in &followed {
            let _ = theta[n].shallow_clone().g_add_scalar_(1.0);
        }
    });
    m.after_step(&Tensor::from(false));
    let m1 = saved(&m);
    for n in &followed {
        let k = format!("momentum.model.{n}");
        assert!(m1[&k].equal(&m0[&k]), "{n} moved on a skipped step");
    }
    m.after_step(&Tensor::from(true));
    let m2 = saved(&m);
    for n in &followed {
        let k = format!("momentum.model.{n}");
        let want = &m0[&k] * 0.995 + &theta[n] * 0.005;
        assert!(
            m2[&k].allclose(&want, 1e-6, 1e-7, false),
            "{n}: not m = mu m + (1 - mu) theta"
        );
        assert!(!m2[&k].equal(&m0[&k]));
    }
}

#[test]
fn queued_copies_of_a_batch_are_its_positives_not_negatives() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, m, tok, loaded) = build(&MOD);
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
    let batch = make_batch(&ds, &tok, &cfg, &(0..8).map(|i| i * 3).collect::<Vec<_>>()).unwrap();
    m.before_step(5);
    assert!(
        (m.momentum.alpha() - 0.2).abs() < 1e-12,
        "alpha ramps over 10 steps"
    );
    let b = 8i64;
    // The first pass queues the batch; the second sees its copies.
    for pass in 0..2 {
        let fwd = Forward::new(&asm.model, &batch, true).with_momentum(&m.momentum);
        let c = fwd.momentum_contrast().unwrap().expect("momentum");
        assert_eq!(c.i2t.size(), [b, b + 32]);
        let pos = Vec::<Vec<bool>>::try_from(&c.positives).unwrap();
        let own = batch.positives();
        let own = Vec::<Vec<bool>>::try_from(&own).unwrap();
        for i in 0..b as usize {
            assert_eq!(pos[i][..b as usize], own[i][..], "in-batch positives");
            let queued: Vec<bool> = pos[i][b as usize..b as usize + 8].to_vec();
            if pass == 0 {
                assert!(
                    pos[i][b as usize..].iter().all(|&p| !p),
                    "the empty queue holds no positive"
                );
            } else {
                assert_eq!(
                    queued, own[i],
                    "queued copies of row {i}'s positives are positives"
                );
            }
        }
        // Soft targets: rows sum to one, and with alpha 0.2 a positive
        // gets at least its share of the hard targets' 0.8.
        let t = vlmatch_core::momentum::soft_targets(&c.i2t_m, &c.positives, m.momentum.alpha());
        let sums = Vec::<f32>::try_from(t.sum_dim_intlist(1, false, tch::Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let loss = itc::itc_loss_distilled(c, m.momentum.alpha()).double_value(&[]);
        assert!(loss.is_finite() && loss > 0.0);
        fwd.enqueue_momentum();
    }
    assert_eq!(m.momentum.queue().ptr, 16, "two batches of 8 queued");
}

/// With the momentum model a fresh copy, no queue and alpha 0, the
/// distilled ITC is the plain ITC of the batch: the columns are the batch's
/// own features and the targets the hard ones.
#[test]
fn distilled_itc_reduces_to_plain_itc_for_a_fresh_copy_without_queue_or_alpha() {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, m, tok, loaded) = build(&["momentum.enabled=true", "momentum.queue_size=0"]);
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
    // Consecutive pairs are captions of one scene (three each): positives
    // beyond the diagonal.
    let idx: Vec<usize> = (0..8).collect();
    let batch = make_batch(&ds, &tok, &cfg, &idx).unwrap();
    m.before_step(0);
    assert_eq!(m.momentum.alpha(), 0.0);
    let fwd = Forward::new(&asm.model, &batch, false).with_momentum(&m.momentum);
    let c = fwd.momentum_contrast().unwrap().expect("momentum");
    assert_eq!(c.i2t.size(), [8, 8]);
    let sim = fwd.similarity().unwrap();
    assert!(c.i2t.allclose(&sim.i2t, 1e-5, 1e-6, false));
    assert!(c.i2t_m.allclose(&sim.i2t, 1e-5, 1e-6, false));
    let positives = fwd.positives().unwrap();
    assert!(c.positives.equal(&positives));
    let plain = itc::itc_loss_global(&sim.i2t, &sim.t2i, &positives, &positives);
    let distilled = itc::itc_loss_distilled(c, 0.0);
    assert!(
        (plain.double_value(&[]) - distilled.double_value(&[])).abs() < 1e-5,
        "{plain} vs {distilled}"
    );
    // With alpha 1 the targets are the momentum softmax alone.
    let soft = itc::itc_loss_distilled(c, 1.0).double_value(&[]);
    assert!(soft.is_finite() && soft > 0.0);
}

#[test]
fn momentum_model_and_queues_round_trip_through_a_checkpoint() {
    let dir = scratch("mod-roundtrip");
    let summary = run(&dir, &with_mod(&["eval.at_end=false"]), None).unwrap();
    // alpha ramps over the first epoch (192 pairs / 8 = 24 steps).
    let alphas: Vec<f64> = summary
        .logged
        .iter()
        .map(|l| l["mod_alpha"].as_f64().unwrap())
        .collect();
    for (i, a) in alphas.iter().enumerate() {
        assert!(
            (a - 0.4 * i as f64 / 24.0).abs() < 1e-12,
            "step {}: alpha {a}",
            i + 1
        );
    }
    let saved = checkpoint(&dir, 12);
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let (asm, mut m, _, _) = build(&MOD);
    let loaded =
        vlmatch::checkpoint::load_full(&dir.join("checkpoints/step-00000012.safetensors"), &asm.vs)
            .unwrap();
    let names: Vec<String> = vlmatch::hooks::state_tensors("momentum", &m)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.len() > 10);
    for n in &names {
        assert!(loaded.extra.contains_key(n), "checkpoint lacks {n}");
    }
    let counters = vlmatch::hooks::load_tensors("momentum", &m, &loaded.extra, &dir).unwrap();
    vlmatch::hooks::set_counters("momentum", &mut m, &counters).unwrap();
    for (n, t) in vlmatch::hooks::state_tensors("momentum", &m) {
        assert!(t.equal(&saved[&n]), "{n} does not round-trip");
    }
    // 12 steps of 8 pairs filled the queue of 32 three times: no entry is
    // still empty, and the pointer is back at the start.
    let ids = &saved["momentum.queue.image_ids"];
    assert_eq!(ids.size(), [32]);
    assert_eq!(ids.eq(i64::MIN).sum(tch::Kind::Int64).int64_value(&[]), 0);
    assert_eq!(saved["momentum.queue.ptr"].int64_value(&[]), 0);
    // The momentum model lags the trained one: close, not equal.
    let (k, theta) = (
        "text_encoder.embeddings.word_embeddings.weight",
        &saved["model.text_encoder.embeddings.word_embeddings.weight"],
    );
    let mom = &saved[&format!("momentum.model.{k}")];
    assert!(!mom.equal(theta));
    // A checkpoint without them is refused by name.
    let e = vlmatch::hooks::load_tensors("momentum", &m, &HashMap::new(), &dir)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("lacks `momentum.model.") && e.contains("momentum.enabled"),
        "{e}"
    );
    // A queue pointer outside the queue is refused by name.
    let mut bad = counters.clone();
    bad.insert("momentum.queue.ptr".into(), 32);
    let e = vlmatch::hooks::set_counters("momentum", &mut m, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`momentum.queue.ptr` is 32"), "{e}");
}

#[test]
fn killed_and_resumed_mod_run_matches_uninterrupted_run() {
    let root = scratch("mod-resume");
    let full_dir = root.join("full");
    run(&full_dir, &with_mod(&["eval.at_end=false"]), None).unwrap();
    let cut_dir = root.join("cut");
    run(&cut_dir, &with_mod(&["eval.at_end=false"]), Some(6)).unwrap();
    let resumed = resume(&cut_dir).unwrap();
    assert_eq!(resumed.start_step, 4);
    let (a, b) = (metrics(&full_dir), metrics(&cut_dir));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "metrics differ after resume");
    let (wa, wb) = (checkpoint(&full_dir, 12), checkpoint(&cut_dir, 12));
    assert_eq!(wa.len(), wb.len());
    assert!(wa.keys().any(|k| k.starts_with("momentum.queue.")));
    for (name, t) in &wa {
        assert!(t.equal(&wb[name]), "{name} differs after resume");
    }
}

#[test]
fn mod_changes_training_and_the_default_leaves_it_off() {
    let root = scratch("mod-vs-plain");
    let sets = [
        "train.steps=4",
        "eval.at_end=false",
        "train.checkpoint_every=0",
    ];
    let plain = run(&root.join("plain"), &sets, None).unwrap();
    assert!(plain.logged[0].get("mod_alpha").is_none());
    let mut with: Vec<&str> = sets.to_vec();
    with.extend(MOD);
    let distilled = run(&root.join("mod"), &with, None).unwrap();
    let (p, d) = (losses(&plain), losses(&distilled));
    assert!(d.iter().all(|(_, l)| l.is_finite()));
    // Against [momentum batch; queue] the ITC loss differs from step 1.
    assert_ne!(p[0].1, d[0].1);
}

#[test]
fn a_queue_the_global_batch_does_not_divide_names_the_nearest_sizes() {
    let dir = scratch("mod-queue-size");
    let e = run(
        &dir,
        &["momentum.enabled=true", "momentum.queue_size=20"],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("`momentum.queue_size`")
            && e.contains("global batch 8")
            && e.contains("16 or 24"),
        "{e}"
    );
    let e = run(
        &dir,
        &["momentum.enabled=true", "momentum.queue_size=5"],
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("nearest valid sizes are 8"), "{e}");
    let e = run(&dir, &["momentum.mu=1.5"], None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("momentum.mu"), "{e}");
}
