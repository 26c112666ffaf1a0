//! Activation checkpointing (`train.activation_checkpointing`): every loss
//! and every parameter's gradient equal the plain path's within 1e-6 in
//! fp32 (relative to the tensor's scale where it passes 1), for `"all"` and for lists of roles, with dropout 0 and 0.1 (the
//! recomputation replays the masks), over two accumulated micro-batches,
//! with momentum distillation (whose momentum encoders run without
//! gradient: checkpointing is a no-op there), in bf16, and with the
//! co-attention fusion; the layers are really recomputed; a bad value is an
//! error naming the key. On 2 Gloo ranks a checkpointed run logs the plain
//! run's losses and gradient norms; `dist/tests/multiprocess.rs`
//! (`checkpoint_reducer_2_ranks`) checks the reducer's hooks with
//! checkpointed layers.

mod common;
use common::*;
use std::sync::Arc;
use tch::{Kind, Tensor};
use vlmatch::data::loader::{make_batch, LoaderConfig};
use vlmatch::momentum::MomentumTrainer;
use vlmatch_core::checkpoint::recomputed;
use vlmatch_core::Forward;
use vlmatch_registry::ConfigLayers;

/// Two layers per stack, so that a checkpointed layer's input is another
/// checkpointed layer's output.
const DEPTH: [&str; 3] = [
    "model.image.num_hidden_layers=2",
    "model.text.num_hidden_layers=2",
    "model.fusion.num_hidden_layers=2",
];

/// Dropout 0.1 after every sub-layer and on the attention probabilities of
/// every stack.
const DROPOUT: [&str; 6] = [
    "model.image.hidden_dropout_prob=0.1",
    "model.image.attention_probs_dropout_prob=0.1",
    "model.text.hidden_dropout_prob=0.1",
    "model.text.attention_probs_dropout_prob=0.1",
    "model.fusion.hidden_dropout_prob=0.1",
    "model.fusion.attention_probs_dropout_prob=0.1",
];

/// What one configuration computes on two micro-batches.
struct Pass {
    /// Each micro-batch's named losses.
    losses: Vec<(String, f64)>,
    /// Every parameter's gradient, summed over the micro-batches, by name.
    grads: Vec<(String, Tensor)>,
    /// Layers recomputed in backward.
    recomputed: u64,
}

/// The micro model (with `extra` config files) and `sets`, built from seed
/// 7; two micro-batches of 8 pairs (images repeating), each through every
/// objective and backward, gradients accumulating. With `[momentum]`, the
/// momentum model is attached at a step where `alpha` is past zero.
fn pass(extra: &[&str], sets: &[&str]) -> Pass {
    let mut layers: ConfigLayers = micro_layers(sets);
    layers.files.extend(
        extra
            .iter()
            .map(|f| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(f)),
    );
    let loaded = layers.load().unwrap();
    let tok = Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    tch::manual_seed(7);
    let (asm, env) = vlmatch::setup::model(&loaded, &tok).unwrap();
    let momentum = MomentumTrainer::build(&loaded, &env, &asm, 1, Some(4)).unwrap();
    if let Some(m) = &momentum {
        m.before_step(3);
        assert!(m.momentum.alpha() > 0.0);
    }
    let (ds, _) = vlmatch::setup::datasets(&loaded).unwrap();
    let cfg = LoaderConfig::new(&loaded.config.data, 8, None);
    let before = recomputed();
    let mut losses = Vec::new();
    tch::manual_seed(5);
    for rows in [[0, 1, 3, 4, 6, 9, 12, 15], [2, 5, 7, 8, 10, 11, 13, 14]] {
        let batch = make_batch(&ds, &tok, &cfg, &rows).unwrap();
        let mut fwd = Forward::new(&asm.model, &batch, true);
        if let Some(m) = &momentum {
            fwd = fwd.with_momentum(&m.momentum);
        }
        let mut total = Tensor::zeros([], (Kind::Float, tch::Device::Cpu));
        for o in &asm.objectives {
            for (name, loss) in o.objective.forward(&fwd, 3).unwrap().losses {
                losses.push((name, loss.double_value(&[])));
                total += loss * o.weight;
            }
        }
        total.backward();
    }
    let mut grads: Vec<(String, Tensor)> = asm
        .vs
        .variables()
        .into_iter()
        .filter(|(_, v)| v.grad().defined())
        .map(|(k, v)| (k, v.grad().to_kind(Kind::Double)))
        .collect();
    grads.sort_by(|a, b| a.0.cmp(&b.0));
    Pass {
        losses,
        grads,
        recomputed: recomputed() - before,
    }
}

/// `checkpointed` against `plain`: the same losses and gradients within
/// `tol`, or what differs, and the largest difference seen. A tensor's
/// difference is relative to its scale where that passes 1 (`max |g|`):
/// where gradient contributions meet in another order (the text encoder's
/// states feed several objectives), fp32 rounds a sum of magnitude 10
/// differently by one unit in the last place, 1.9e-6.
fn differences(plain: &Pass, checkpointed: &Pass, tol: f64) -> (Vec<String>, f64) {
    let (mut bad, mut worst) = (Vec::new(), 0.0f64);
    assert_eq!(plain.losses.len(), checkpointed.losses.len());
    for ((name, a), (_, b)) in plain.losses.iter().zip(&checkpointed.losses) {
        let d = (a - b).abs() / a.abs().max(1.0);
        worst = worst.max(d);
        if d > tol {
            bad.push(format!("loss {name}: {a} plain vs {b} checkpointed"));
        }
    }
    let names = |p: &Pass| p.grads.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(
        names(plain),
        names(checkpointed),
        "parameters with a gradient"
    );
    for ((name, a), (_, b)) in plain.grads.iter().zip(&checkpointed.grads) {
        let scale = a.abs().max().double_value(&[]).max(1.0);
        let d = (a - b).abs().max().double_value(&[]) / scale;
        worst = worst.max(d);
        if d > tol {
            bad.push(format!(
                "gradient of {name} differs by {d:.3e} (scale {scale:.2})"
            ));
        }
    }
    (bad, worst)
}

/// Each of `cases` (name, config files, settings) with and without
/// `activation` against the plain path; `all_roles` where the setting
/// covers every role (it must recompute more layers than a list).
fn check(cases: &[(&str, &[&str], Vec<&str>)], activation: &[(&str, bool)], tol: f64) {
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    for (name, files, sets) in cases {
        let plain = pass(files, sets);
        assert_eq!(
            plain.recomputed, 0,
            "{name}: the plain path recomputes nothing"
        );
        assert!(
            plain.grads.len() > 40,
            "{name}: {} gradients",
            plain.grads.len()
        );
        let mut counts = Vec::new();
        for (setting, all_roles) in activation {
            let set = format!("train.activation_checkpointing={setting}");
            let mut with = sets.clone();
            with.push(&set);
            let ckpt = pass(files, &with);
            assert!(
                ckpt.recomputed > 0,
                "{name}, {setting}: no layer recomputed"
            );
            counts.push((ckpt.recomputed, *all_roles));
            let (bad, worst) = differences(&plain, &ckpt, tol);
            eprintln!(
                "{name}, {setting}: {} layers recomputed; losses and gradients differ by \
                 {worst:.2e} at most",
                ckpt.recomputed
            );
            for d in bad {
                failures.push(format!("{name}, {setting}: {d}"));
            }
        }
        let most = counts.iter().map(|c| c.0).max().unwrap_or(0);
        for (count, all_roles) in counts {
            assert_eq!(
                all_roles,
                count == most,
                "{name}: recomputed layers {count} of {most}"
            );
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn with(base: &[&'static str], more: &[&'static str]) -> Vec<&'static str> {
    base.iter().chain(more).copied().collect()
}

#[test]
fn gradients_equal_the_plain_path_without_and_with_dropout() {
    check(
        &[
            ("dropout 0", &[], with(&DEPTH, &[])),
            ("dropout 0.1", &[], with(&DEPTH, &DROPOUT)),
        ],
        &[
            ("all", true),
            (r#"["image","fusion"]"#, false),
            (r#"["text"]"#, false),
        ],
        1e-6,
    );
}

#[test]
fn gradients_equal_the_plain_path_with_momentum_distillation() {
    check(
        &[
            (
                "MoD",
                &["configs/mod.toml"],
                with(&DEPTH, &["momentum.queue_size=32"]),
            ),
            (
                "MoD, dropout 0.1",
                &["configs/mod.toml"],
                with(&DEPTH, &with(&DROPOUT, &["momentum.queue_size=32"])),
            ),
        ],
        &[("all", true), (r#"["fusion"]"#, false)],
        1e-6,
    );
}

/// The co-attention fusion's two streams, each a checkpointed stack.
#[test]
fn gradients_equal_the_plain_path_with_the_co_attention_fusion() {
    check(
        &[(
            "co-attention",
            &[],
            with(
                &DEPTH[..2],
                &[
                    "model.fusion.plugin=\"co_attention\"",
                    "model.fusion.num_hidden_layers=2",
                    "model.fusion.num_attention_heads=2",
                    "model.fusion.intermediate_size=64",
                ],
            ),
        )],
        &[("all", true), (r#"["fusion"]"#, false)],
        1e-6,
    );
}

/// bf16 computes the same products in both paths (the fp32 master
/// weights are cast inside the recomputed layer as in the first run).
#[test]
fn gradients_equal_the_plain_path_in_bf16() {
    check(
        &[("bf16", &[], with(&DEPTH, &["train.precision=\"bf16\""]))],
        &[("all", true)],
        1e-6,
    );
}

#[test]
fn a_bad_value_is_an_error_naming_the_key() {
    for (value, says) in [
        (r#"["text","vision"]"#, "unknown role \"vision\""),
        (r#"["text","text"]"#, "listed twice"),
        ("\"some\"", "expected \"none\", \"all\" or a list of roles"),
        ("3", "expected \"none\", \"all\" or a list of roles"),
    ] {
        let set = format!("train.activation_checkpointing={value}");
        let err = match micro_layers(&[&set]).load() {
            Ok(_) => panic!("{value} was accepted"),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("train.activation_checkpointing") && err.contains(says),
            "{value}: {err}"
        );
    }
}

/// `vlmatch train` on the micro model as `world` ranks on loopback, as
/// torchrun starts them, with `sets`; waits up to 4 minutes. Returns
/// metrics.jsonl without the wall time.
fn train_ranks(
    dir: &std::path::Path,
    world: usize,
    sets: &[&str],
) -> Vec<serde_json::Map<String, serde_json::Value>> {
    std::fs::create_dir_all(dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut args: Vec<String> = ["train", "--quiet", "--preset", "tiny", "--config"]
        .map(String::from)
        .to_vec();
    args.push(fixture("micro.toml").display().to_string());
    args.extend(["--run-dir".into(), dir.join("run").display().to_string()]);
    for s in ["eval.at_end=false", "train.dist.timeout=60"]
        .iter()
        .chain(sets)
    {
        args.extend(["--set".to_string(), s.to_string()]);
    }
    let mut procs: Vec<std::process::Child> = (0..world)
        .map(|rank| {
            let log = |what: &str| std::fs::File::create(dir.join(format!("rank{rank}.{what}")));
            std::process::Command::new(env!("CARGO_BIN_EXE_vlmatch"))
                .args(&args)
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env_remove("TORCHELASTIC_USE_AGENT_STORE")
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdin(std::process::Stdio::null())
                .stdout(log("out").unwrap())
                .stderr(log("err").unwrap())
                .spawn()
                .expect("start vlmatch")
        })
        .collect();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(240);
    for (rank, p) in procs.iter_mut().enumerate() {
        let status = loop {
            if let Some(s) = p.try_wait().unwrap() {
                break Some(s);
            }
            if std::time::Instant::now() > deadline {
                break None;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        if status.is_none_or(|s| !s.success()) {
            for q in procs.iter_mut() {
                let _ = q.kill();
            }
            let err = std::fs::read_to_string(dir.join(format!("rank{rank}.err")));
            panic!(
                "rank {rank} failed ({status:?}): {}",
                err.unwrap_or_default()
            );
        }
    }
    jsonl_without_time(&dir.join("run").join("metrics.jsonl"))
}

/// On 2 Gloo ranks with dropout 0.1 and 2 accumulated micro-batches, a
/// checkpointed run logs the plain run's losses and gradient norms: at the
/// first step within 1e-6 (relative), later within 1e-5 (AdamW spreads the
/// rounding of the steps before).
#[test]
fn two_ranks_with_accumulation_log_the_plain_run() {
    let root = scratch("checkpointing-2-ranks");
    let sets = with(
        &DEPTH,
        &with(
            &DROPOUT,
            &[
                "train.steps=3",
                "train.accum_steps=2",
                "train.checkpoint_every=0",
            ],
        ),
    );
    let plain = train_ranks(&root.join("plain"), 2, &sets);
    let mut all = sets.clone();
    all.push("train.activation_checkpointing=\"all\"");
    let ckpt = train_ranks(&root.join("all"), 2, &all);
    assert_eq!(plain.len(), 3, "one line per step");
    assert_eq!(plain.len(), ckpt.len());
    for (i, (a, b)) in plain.iter().zip(&ckpt).enumerate() {
        let tol = if i == 0 { 1e-6 } else { 1e-5 };
        for key in ["loss", "itc", "itm", "mlm", "grad_norm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            let d = (x - y).abs() / x.abs().max(1.0);
            assert!(
                d <= tol,
                "step {}: `{key}` {x} plain vs {y} checkpointed",
                i + 1
            );
        }
    }
}
