//! `vlmatch bench` runs end to end and its PyTorch reference builds the same
//! model. These tests check what the benchmark reports, never how fast
//! anything is.

mod common;
use common::*;
use std::path::PathBuf;
use vlmatch::bench::{bench, table, BenchOptions};

fn options(out: PathBuf, reference: Option<(PathBuf, PathBuf)>, sets: &[&str]) -> BenchOptions {
    BenchOptions {
        layers: micro_layers(sets),
        out,
        steps: 2,
        warmup: 1,
        repeats: 2,
        batches: 2,
        data_images: 16,
        data_image_side: 64,
        neggen: true,
        reference,
    }
}

fn positive(v: &serde_json::Value, what: &str) -> f64 {
    let x = v.as_f64().unwrap_or_else(|| panic!("{what} missing: {v}"));
    assert!(x.is_finite() && x > 0.0, "{what} = {x}");
    x
}

#[test]
fn bench_reports_steps_data_and_neggen() {
    let out = scratch("bench-vlmatch-only");
    let r = {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        bench(&options(out.clone(), None, &[])).unwrap()
    };
    positive(&r["step_s"], "step_s");
    assert_eq!(r["step_s_blocks"].as_array().unwrap().len(), 2);
    positive(&r["images_per_s"], "images_per_s");
    positive(&r["data"]["images_per_s"], "data images/s");
    assert_eq!(r["data"]["images"], 16);
    assert!(r["neggen"]["negatives_per_s"].as_f64().unwrap() >= 0.0);
    positive(&r["neggen"]["candidates_per_s"], "NegGen candidates/s");
    assert!(r["neggen"]["candidates"].as_u64() >= r["neggen"]["negatives"].as_u64());
    positive(
        &r["neggen"]["tagging_captions_per_s"],
        "NegGen tagging captions/s",
    );
    assert!(r["last_loss"].as_f64().unwrap().is_finite());
    // Nothing in the step reads the device back (each read syncs a GPU).
    assert_eq!(r["readbacks_per_step"].as_f64(), Some(0.0), "{r}");
    // FLOPs per module: the fused-[CLS] ITM and shared image keys/values
    // execute less than the plain path in the fusion, nothing more anywhere.
    let f = &r["flops"];
    let modules = f["nominal"]["modules"].as_object().unwrap();
    for m in ["vision_encoder", "text_encoder", "fusion", "itc"] {
        assert!(modules.contains_key(m), "{m} missing from {f}");
    }
    for (m, n) in modules {
        let e = f["executed"]["modules"][m.as_str()]["total"]
            .as_f64()
            .unwrap();
        assert!(e <= n["total"].as_f64().unwrap() * (1.0 + 1e-9), "{m}: {f}");
    }
    let fusion = |k: &str| f[k]["modules"]["fusion"]["total"].as_f64().unwrap();
    assert!(fusion("executed") < 0.9 * fusion("nominal"), "{f}");
    assert_eq!(
        f["executed"]["modules"]["text_encoder"],
        f["nominal"]["modules"]["text_encoder"]
    );
    // What a reference needs is on disk, and the JSON matches the return.
    for f in [
        "config.toml",
        "meta.json",
        "init.safetensors",
        "inputs.safetensors",
        "vocab.txt",
        "data/annotations.json",
    ] {
        assert!(out.join(f).exists(), "{f} not written");
    }
    let saved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench.json")).unwrap()).unwrap();
    // serde_json's default float parsing may differ in the last bit.
    let (a, b) = (
        saved["step_s"].as_f64().unwrap(),
        r["step_s"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    let t = table(&r);
    assert!(
        t.contains("train step (ms)") && t.contains("data pipeline"),
        "{t}"
    );
    // The augmented loader rows: both variants timed, every stage measured.
    let l = &r["loader"];
    assert_eq!(l["image_size"], 256);
    for v in ["plain", "randaug"] {
        positive(&l["variants"][v]["images_per_s"], "loader images/s");
        let st = &l["variants"][v]["stages"];
        assert_eq!(st["images"], 16, "{st}");
        for k in vlmatch::bench::loader::STAGES {
            assert!(st["s_per_image"][k].as_f64().unwrap() >= 0.0, "{k}: {st}");
        }
        // This test binary does not count allocations: none reported.
        assert!(st["allocations_per_image"].is_null(), "{st}");
    }
    assert!(
        t.contains("augmented loader") && t.contains("+ RandomAugment(2, 7)"),
        "{t}"
    );
}

/// The PIL/torchvision side of the loader rows (bench/reference_loader.py)
/// runs ALBEF's transform on the same files and reports its rate and stages.
/// Needs torchvision and OpenCV: the golden-augment venv, or
/// VLMATCH_LOADER_PYTHON; skipped without either.
#[test]
fn pil_loader_reference_runs_on_the_same_files() {
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/vlmatch/golden-augment/bin/python"));
    if std::env::var_os("VLMATCH_LOADER_PYTHON").is_none() && !venv.is_some_and(|v| v.exists()) {
        eprintln!("skipped: no Python with torchvision and OpenCV (VLMATCH_LOADER_PYTHON)");
        return;
    }
    let out = scratch("bench-loader-reference");
    let mut o = options(out, None, &[]);
    o.neggen = false;
    {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        bench(&o).unwrap();
    }
    // The reference script's directory is what `rows` looks in.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference.py");
    let python = PathBuf::from("python3");
    let loaded = o.layers.load().unwrap();
    let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
    let lo = vlmatch::bench::loader::Options {
        out: &o.out,
        data_image_side: o.data_image_side,
        repeats: o.repeats,
        reference: Some((&python, &script)),
    };
    let l = vlmatch::bench::loader::rows(&lo, &loaded.config, &tok).unwrap();
    let rf = &l["reference"];
    assert!(rf.get("error").is_none(), "{rf}");
    for v in ["plain", "randaug"] {
        positive(&rf["variants"][v]["images_per_s"], "PIL loader images/s");
        for k in vlmatch::bench::loader::STAGES {
            let x = rf["variants"][v]["stage_s_per_image"][k].as_f64();
            assert!(x.is_some_and(|x| x >= 0.0), "{k}: {rf}");
        }
    }
    let t = vlmatch::bench::loader::lines(&serde_json::json!({ "loader": l }));
    assert!(t.contains("PIL stages"), "{t}");
}

/// The PyTorch reference (bench/reference.py) builds the same model: it loads
/// vlmatch's initial weights by name with `strict=True`, has the same number
/// of parameters, and gives the same ITC loss on the same batch. Runs under
/// `cargo xtask test`, which installs the reference's packages and passes
/// their Python as BENCH_REFERENCE_PYTHON; plain `cargo test` skips it.
#[test]
fn pytorch_reference_builds_the_same_model() {
    let Some(python) = std::env::var_os("BENCH_REFERENCE_PYTHON") else {
        eprintln!("skipped: BENCH_REFERENCE_PYTHON is not set (cargo xtask test sets it)");
        return;
    };
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference.py");
    // The full method's objectives: ITC, ITM with hard and word-swap
    // negatives (the reference emulates word_swap), VL-RTD, and MLM.
    for (name, sets) in [
        ("baseline", vec![]),
        (
            "full",
            vec![
                "objectives.rtd.plugin=\"rtd\"",
                "objectives.rtd.lambda=1.0",
                "objectives.itm.samplers=[\"hard_negative\", \"word_swap\"]",
                "samplers.word_swap.plugin=\"word_swap\"",
            ],
        ),
    ] {
        let out = scratch(&format!("bench-reference-{name}"));
        let r = {
            let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
            bench(&options(
                out,
                Some((PathBuf::from(&python), script.clone())),
                &sets,
            ))
            .unwrap()
        };
        let rf = &r["reference"];
        assert_eq!(rf["parameters"], r["meta"]["parameters"], "{name}");
        let (a, b) = (
            r["init_itc_loss"].as_f64().unwrap(),
            rf["init_itc_loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-5, "{name}: ITC at init {a} vs {b}");
        positive(&rf["step_s"], "reference step_s");
        positive(&rf["flops_per_step"], "reference FLOPs");
        positive(&rf["data"]["images_per_s"], "reference data images/s");
        assert!(rf["last_loss"].as_f64().unwrap().is_finite());
        let t = table(&r);
        assert!(
            t.contains("x (vlmatch better)") || t.contains("x (PyTorch better)"),
            "{t}"
        );
        if name == "full" {
            assert!(rf["note"].as_str().unwrap().contains("word_swap"), "{rf}");
            // Word swaps draw on the host: no read-back in the step either.
            assert_eq!(r["readbacks_per_step"].as_f64(), Some(0.0), "{r}");
        }
        // vlmatch's nominal count (the plain path) is what PyTorch's
        // FlopCounterMode counts on the reference's step; on a CPU its
        // attention kernel has no formula there, so matrix products only.
        // Exactly, but for the emulated word swaps of "full", whose texts
        // are not word_swap's (how many, how long).
        let ours = r["flops"]["nominal"]["matmul"].as_f64().unwrap();
        let theirs = rf["flops_per_step"].as_f64().unwrap();
        let tolerance = if name == "full" { 0.03 } else { 1e-9 };
        assert!(
            (ours - theirs).abs() <= tolerance * theirs,
            "{name}: nominal FLOPs {ours} vs the reference's counter {theirs}"
        );
    }
}

/// A model with no MLM head (the base preset alone is ITC + ITM) gives
/// NegGen nothing to fill with: the benchmark runs and leaves NegGen out.
#[test]
fn bench_without_a_generator_skips_neggen() {
    let out = scratch("bench-no-generator");
    let mut o = options(out, None, &["objectives.mlm.enabled=false"]);
    o.data_images = 0;
    // The tiny preset without its `[model.generator]` section.
    let (name, _, text) = o.layers.base.take().unwrap();
    let (head, tail) = text.split_once("[model.generator]").unwrap();
    let tail = &tail[tail.find("\n[").unwrap()..];
    assert!(!tail.contains("[model.generator]"));
    o.layers.base = Some((name, None, format!("{head}{tail}")));
    let r = {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        bench(&o).unwrap()
    };
    positive(&r["step_s"], "step_s");
    assert!(r.get("neggen").is_none(), "{r}");
}

/// `vlmatch bench --eval`: vlmatch's re-ranking (each pair fused once) and
/// ALBEF's per-query loop in the reference rank the same generated set
/// alike. The vlmatch side always runs; the reference under
/// `cargo xtask test` (BENCH_REFERENCE_PYTHON).
#[test]
fn eval_bench_ranks_like_albefs_loop() {
    use vlmatch::bench::eval::{bench_eval, EvalBenchOptions};
    let python = std::env::var_os("BENCH_REFERENCE_PYTHON").map(PathBuf::from);
    if python.is_none() {
        eprintln!(
            "reference part skipped: BENCH_REFERENCE_PYTHON is not set (cargo xtask test sets it)"
        );
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/reference.py");
    let out = scratch("bench-eval");
    let r = {
        let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
        bench_eval(&EvalBenchOptions {
            layers: micro_layers(&[]),
            out: out.clone(),
            images: 12,
            captions_per_image: 3,
            k: 5,
            reference: python.map(|p| (p, script)),
        })
        .unwrap()
    };
    let v = &r["vlmatch"];
    assert_eq!(
        (v["images"].as_u64(), v["captions"].as_u64()),
        (Some(12), Some(36))
    );
    assert_eq!(v["naive_pairs"].as_u64(), Some(12 * 5 + 36 * 5));
    assert!(v["fused_pairs"].as_u64().unwrap() <= v["naive_pairs"].as_u64().unwrap());
    positive(&r["vlmatch_seconds"], "vlmatch seconds");
    if let Some(reference) = r.get("reference") {
        positive(&reference["seconds"], "reference seconds");
        positive(&r["ratio"], "ratio");
        for k in ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"] {
            let (a, b) = (v[k].as_f64().unwrap(), reference[k].as_f64().unwrap());
            assert!((a - b).abs() <= 0.002, "{k}: vlmatch {a}, reference {b}");
        }
    }
}
