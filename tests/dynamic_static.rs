//! One plugin source, two builds: `plugins/examples/dyn-siglip` linked into
//! this test binary (static, `inventory`) and built as a library loaded by
//! the `vlmatch` binary with `--plugin` (dynamic) train bit-identically for
//! 20 steps (its objectives and ITM's negative sampler read the embeddings,
//! the cached states, the fusion, the discriminator, keyed draws, the
//! in-batch candidates and the positive relation through the host's
//! forward); the dynamic run's checkpoint resumes exactly, evaluates and
//! exports when `--plugin` is given again; `vlmatch plugins --plugin`
//! lists the library's plugins of every kind. The library's hook keeps
//! state across the resume and scales the loss before backward.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
// Linked for its `inventory` registrations: the static build.
use vlmatch_dyn_siglip as _;

/// The example library, built once per test binary with the workspace's
/// target directory and lock file.
fn library() -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    BUILT.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--locked", "-p", "vlmatch-dyn-siglip"])
            .current_dir(root)
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building vlmatch-dyn-siglip failed");
    });
    let file = root.join("target/debug/libvlmatch_dyn_siglip.so");
    assert!(file.is_file(), "{} was not built", file.display());
    file
}

fn example_config() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/examples/dyn-siglip/dyn-siglip.toml")
}

const SETS: [&str; 3] = [
    "train.steps=20",
    "train.checkpoint_every=10",
    "eval.at_end=false",
];

/// `vlmatch ARGS --plugin LIB`.
fn vlmatch(args: &[&str], lib: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(args)
        .arg("--plugin")
        .arg(lib)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

/// `vlmatch train` with the library over micro and the example's config.
fn train_dynamic(dir: &Path, lib: &Path, extra: &[&str]) -> Output {
    let (micro, example) = (fixture("micro.toml"), example_config());
    let mut args = vec!["train", "--quiet", "--config"];
    args.push(micro.to_str().unwrap());
    args.extend(["--config", example.to_str().unwrap()]);
    for s in SETS {
        args.extend(["--set", s]);
    }
    args.extend(["--run-dir", dir.to_str().unwrap()]);
    args.extend(extra);
    vlmatch(&args, lib)
}

/// Every logged value but the wall time, step by step.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
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

fn weights(dir: &Path, step: i64) -> Vec<(String, tch::Tensor)> {
    let mut w =
        tch::Tensor::read_safetensors(dir.join(format!("checkpoints/step-{step:08}.safetensors")))
            .unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn ok(o: &Output, what: &str) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{what}: {stderr}");
    String::from_utf8_lossy(&o.stdout).to_string()
}

#[test]
fn static_and_dynamic_builds_train_alike_and_the_dynamic_run_resumes_evaluates_and_exports() {
    let lib = library();
    let root = scratch("dynamic-static");

    // Static: this binary's registrations.
    let static_dir = root.join("static");
    let mut layers = micro_layers(&SETS);
    layers.files.push(example_config());
    train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(static_dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();

    // Dynamic: the same source as a library in the vlmatch binary.
    let dynamic_dir = root.join("dynamic");
    ok(&train_dynamic(&dynamic_dir, &lib, &[]), "dynamic train");
    let (s, d) = (metrics(&static_dir), metrics(&dynamic_dir));
    assert_eq!(s.len(), 20);
    assert!(
        s.iter().all(|m| m["sigmoid"].is_number()
            && m["pair"].is_number()
            && m["mlm"].is_number()
            && m["itm"].is_number()
            && m["itm_acc_next_caption"].is_number()
            && m["loss_ema"].is_number()
            && m["pair_similarity"].is_number()
            // The library's hook counts optimizer steps in its state.
            && m["loss_ema_steps"].as_f64() == m["step"].as_f64()),
        "{:?}",
        s[0]
    );
    for (x, y) in s.iter().zip(&d) {
        assert_eq!(x, y, "step {} differs between the builds", x["step"]);
    }
    let (ws, wd) = (weights(&static_dir, 20), weights(&dynamic_dir, 20));
    assert_eq!(ws.len(), wd.len());
    for ((n, a), (m, b)) in ws.iter().zip(&wd) {
        assert_eq!(n, m);
        assert!(a.equal(b), "{n} differs between the builds");
    }
    for name in [
        "model.vision_encoder.embeddings.patch_embedding.weight",
        "model.vision_encoder.post_layernorm.bias",
        "model.objectives.sigmoid.logit_scale",
        "optim.m.vision_encoder.embeddings.class_embedding",
        // The library's generator and discriminator (ITM's and RTD's heads
        // sit at the model's root, as the built-in `linear`'s do).
        "model.generator.norm.weight",
        "model.generator.bias",
        "model.pooler.weight",
        "model.pair.bias",
        "optim.v.token.weight",
    ] {
        assert!(
            wd.iter().any(|(n, _)| n == name),
            "{name} is not checkpointed"
        );
    }
    // The library hook's state, under `<hook>.<name>`.
    for name in ["loss_ema.ema", "loss_ema.steps"] {
        assert!(
            wd.iter().any(|(n, _)| n.ends_with(name)),
            "{name} is not checkpointed: {:?}",
            wd.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
    }

    // Killed after step 12 and resumed with --plugin: from step 10, ending
    // as the uninterrupted run (the library hook's average and counter
    // restored across the boundary; its `on_start` checks the counter).
    let cut = root.join("cut");
    let o = train_dynamic(&cut, &lib, &["--fault", "0:12:kill"]);
    assert!(!o.status.success(), "the fault kills the run");
    ok(
        &vlmatch(
            &["train", "--quiet", "--resume", cut.to_str().unwrap()],
            &lib,
        ),
        "resume",
    );
    assert_eq!(
        metrics(&cut),
        d,
        "the resumed run logs what the uninterrupted one did"
    );

    // Evaluation and export need the library again; without it the encoder
    // is unknown.
    let run = dynamic_dir.to_str().unwrap();
    let eval = ["eval", "--quiet", "--task", "heldout", "--checkpoint", run];
    let out = ok(&vlmatch(&eval, &lib), "eval");
    assert!(
        out.lines().last().is_some_and(|l| l.starts_with('{')),
        "{out}"
    );
    let o = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(eval)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("conv_stem"), "{err}");
    let export = root.join("export");
    let out = ok(
        &vlmatch(
            &[
                "export",
                "--checkpoint",
                run,
                "--out",
                export.to_str().unwrap(),
            ],
            &lib,
        ),
        "export",
    );
    assert!(export.join("text/model.safetensors").is_file(), "{out}");

    // The library's encoder exported through its layout, across the
    // boundary (the trained tensors, under the stem's own names), and a new
    // run starts from the export with every tensor applied.
    let image = export.join("image");
    let config = std::fs::read_to_string(image.join("config.json")).unwrap();
    assert!(config.contains("\"vlmatch_conv_stem\""), "{config}");
    let exported = tch::Tensor::read_safetensors(image.join("model.safetensors")).unwrap();
    let trained = weights(&dynamic_dir, 20);
    assert_eq!(exported.len(), 5);
    for (name, t) in &exported {
        let full = format!("model.vision_encoder.{name}");
        let (_, w) = trained.iter().find(|(n, _)| *n == full).unwrap();
        assert!(t.equal(w), "{name} is not the trained tensor");
    }
    let init = format!("model.image.init={:?}", image.to_str().unwrap());
    let started = root.join("started");
    let o = train_dynamic(&started, &lib, &["--set", &init, "--set", "train.steps=1"]);
    let log = ok(&o, "train from the export");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains(&format!(
            "image encoder from {}: 5 applied, 0 missing, 0 new, 0 unused, 0 shape mismatches",
            image.display()
        )),
        "{log}{stderr}"
    );

    // The library's plugins, listed by kind with their origin.
    let listing = ok(&vlmatch(&["plugins"], &lib), "plugins");
    let origin = format!("library {}", lib.canonicalize().unwrap().display());
    let (encoders, objectives) = listing.split_once("objective:").unwrap();
    assert!(
        encoders.contains(&format!("conv_stem            {origin}")),
        "{listing}"
    );
    assert!(
        objectives.contains(&format!("sigmoid_pairs        {origin}")),
        "{listing}"
    );
    for (kind, name) in [
        ("generator", "tied_decoder"),
        ("discriminator", "mlp_heads"),
        ("hook", "loss_ema"),
    ] {
        let section = listing.split_once(&format!("{kind}:\n")).unwrap().1;
        let section = &section[..section.find(":\n").unwrap_or(section.len())];
        assert!(
            section.contains(&format!("{name:<20} {origin}")),
            "{kind} {name} from the library: {listing}"
        );
    }
}

/// `vlmatch train` with the library on `world` ranks on loopback (as
/// torchrun starts them) over micro, the example's config and `sets`; each
/// rank's output under `dir`.
fn train_ranks(dir: &Path, lib: &Path, world: usize, sets: &[&str]) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (micro, example) = (fixture("micro.toml"), example_config());
    let mut children = Vec::new();
    for rank in 0..world {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_vlmatch"));
        cmd.args(["train", "--quiet", "--config"])
            .arg(&micro)
            .arg("--config")
            .arg(&example)
            .arg("--plugin")
            .arg(lib)
            .arg("--run-dir")
            .arg(dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        for s in sets {
            cmd.args(["--set", s]);
        }
        for v in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
            "MASTER_PORT",
        ] {
            cmd.env_remove(v);
        }
        if world > 1 {
            cmd.env("RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string());
        }
        let log = dir.with_extension(format!("rank{rank}.err"));
        cmd.stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap());
        children.push((log, cmd.spawn().expect("vlmatch starts")));
    }
    for (log, mut child) in children {
        let status = child.wait().unwrap();
        let err = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "{}: {err}", log.display());
    }
}

/// What crosses the boundary for data-parallel training: an objective in a
/// library gathers the texts of every rank through the host's collective
/// (with gradient) and reads the positive relation of the global batch, so
/// 2 ranks of 8 train as one process of 16 (the library's encoder too).
#[test]
fn a_library_objective_on_two_ranks_trains_as_one_process_with_the_global_batch() {
    let lib = library();
    let root = scratch("dynamic-ranks");
    let sets = [
        "train.steps=4",
        "train.checkpoint_every=0",
        "train.dist.timeout=60",
        "eval.at_end=false",
        // pair_match draws its captions from the local batch.
        "objectives.pair.enabled=false",
    ];
    let (one, two) = (root.join("1x16"), root.join("2x8"));
    train_ranks(
        &one,
        &lib,
        1,
        &[&sets[..], &["train.batch_size=16"]].concat(),
    );
    train_ranks(
        &two,
        &lib,
        2,
        &[&sets[..], &["train.batch_size=8"]].concat(),
    );
    let (m1, m2) = (metrics(&one), metrics(&two));
    assert_eq!(m1.len(), 4);
    for (a, b) in m1.iter().zip(&m2) {
        for key in ["loss", "sigmoid", "itm", "mlm"] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "step {}: {key} {x} on one process, {y} on 2 ranks",
                a["step"]
            );
        }
    }
}
