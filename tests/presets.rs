//! The four ablation presets: each trains 50 micro steps on the CPU with
//! every one of its losses falling, and they differ as the paper's ablation
//! does (one objective swapped at a time).

mod common;
use common::*;
use std::collections::BTreeSet;
use vlmatch::train::TrainOptions;

fn train_preset(name: &str) -> (Vec<String>, vlmatch::train::TrainSummary) {
    let mut layers = micro_layers(&[
        "train.steps=50",
        "train.checkpoint_every=0",
        "eval.at_end=false",
    ]);
    layers.files.insert(
        0,
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("configs/{name}.toml")),
    );
    let loaded = layers.load().unwrap();
    let enabled: Vec<String> = loaded
        .config
        .objectives
        .iter()
        .filter(|(_, o)| o.enabled)
        .map(|(k, _)| k.clone())
        .collect();
    let s = train_exclusive(TrainOptions {
        layers,
        run_dir: Some(scratch(&format!("preset-{name}"))),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    (enabled, s)
}

fn assert_all_fall(name: &str, s: &vlmatch::train::TrainSummary, keys: &[&str]) {
    for key in keys {
        let v: Vec<f64> = s
            .logged
            .iter()
            .map(|m| {
                m[*key]
                    .as_f64()
                    .unwrap_or_else(|| panic!("{name}: no `{key}`"))
            })
            .collect();
        assert_eq!(v.len(), 50);
        let head = v[..8].iter().sum::<f64>() / 8.0;
        let tail = v[42..].iter().sum::<f64>() / 8.0;
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{name}: `{key}` not finite"
        );
        assert!(
            tail < head,
            "{name}: `{key}` did not fall ({head:.4} -> {tail:.4})"
        );
    }
}

#[test]
fn ablation_presets_train_with_every_loss_falling() {
    let cases: [(&str, &[&str], &[&str]); 4] = [
        ("baseline", &["itc", "itm", "mlm"], &["itc", "itm", "mlm"]),
        ("rtd", &["itc", "itm", "rtd"], &["itc", "itm", "gen", "rtd"]),
        ("fgitm", &["fgitm", "itc", "mlm"], &["itc", "fgitm", "mlm"]),
        (
            "vlmatch",
            &["fgitm", "itc", "rtd"],
            &["itc", "fgitm", "gen", "rtd"],
        ),
    ];
    let mut sets = Vec::new();
    for (name, objectives, losses) in cases {
        let (enabled, s) = train_preset(name);
        assert_eq!(enabled, objectives, "{name}: objectives");
        assert_all_fall(name, &s, losses);
        sets.push(enabled.into_iter().collect::<BTreeSet<_>>());
        if name.contains("fgitm") || name == "vlmatch" {
            // The paper's FG-ITM: NegGen's generated negatives (filled
            // online) beside the in-batch hard negatives.
            assert!(
                s.logged.iter().all(|m| m.contains_key("fgitm_acc_neggen")
                    && m.contains_key("fgitm_acc_hard_negative")
                    && !m.contains_key("fgitm_acc_word_swap")),
                "{name}: {:?}",
                s.logged[0]
            );
            let produced: f64 = s
                .logged
                .iter()
                .map(|m| m["fgitm_neggen_produced"].as_f64().unwrap())
                .sum();
            assert!(produced > 0.0, "{name}: NegGen produced no negative");
        }
    }
    // One setting apart: baseline->rtd swaps MLM for RTD, baseline->fgitm
    // swaps ITM for FG-ITM, and vlmatch has both swaps.
    let diff = |a: &BTreeSet<String>, b: &BTreeSet<String>| a.symmetric_difference(b).count();
    assert_eq!(diff(&sets[0], &sets[1]), 2);
    assert_eq!(diff(&sets[0], &sets[2]), 2);
    assert_eq!(diff(&sets[1], &sets[3]), 2);
    assert_eq!(diff(&sets[2], &sets[3]), 2);
}

fn merged(files: &[&str]) -> serde_json::Value {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let layers = vlmatch_registry::ConfigLayers {
        base: Some(vlmatch::run::preset("tiny").unwrap()),
        files: files.iter().map(|f| root.join(f)).collect(),
        env: false,
        sets: Vec::new(),
    };
    layers
        .load()
        .unwrap()
        .figment
        .extract::<serde_json::Value>()
        .unwrap()
}

/// `configs/wordswap.toml` replaces NegGen by `word_swap` in either preset
/// and changes nothing else; `configs/neggen.toml` restates the presets'
/// NegGen exactly, so it puts it back over `wordswap.toml`.
#[test]
fn wordswap_and_neggen_layers_swap_only_the_generated_negatives() {
    for preset in ["configs/fgitm.toml", "configs/vlmatch.toml"] {
        let plain = merged(&[preset]);
        let swapped = merged(&[preset, "configs/wordswap.toml"]);
        assert_eq!(
            plain["objectives"]["fgitm"]["samplers"],
            serde_json::json!(["hard_negative", "neggen"]),
            "{preset}"
        );
        assert_eq!(
            swapped["objectives"]["fgitm"]["samplers"],
            serde_json::json!(["hard_negative", "word_swap"]),
            "{preset}"
        );
        assert_eq!(swapped["samplers"]["word_swap"]["plugin"], "word_swap");
        // Apart from the sampler list and the added sampler section, the
        // layer leaves the preset as it was.
        let mut undone = swapped.clone();
        undone["objectives"]["fgitm"]["samplers"] =
            plain["objectives"]["fgitm"]["samplers"].clone();
        undone["samplers"]
            .as_object_mut()
            .unwrap()
            .remove("word_swap");
        assert_eq!(undone, plain, "{preset} + wordswap.toml");
        assert_eq!(
            merged(&[preset, "configs/neggen.toml"]),
            plain,
            "{preset} + neggen.toml"
        );
        let back = merged(&[preset, "configs/wordswap.toml", "configs/neggen.toml"]);
        assert_eq!(
            back["objectives"]["fgitm"]["samplers"],
            plain["objectives"]["fgitm"]["samplers"]
        );
    }
}

/// The presets with `configs/wordswap.toml` train, and FG-ITM's generated
/// negatives are `word_swap`'s.
#[test]
fn presets_train_with_the_wordswap_layer() {
    for name in ["fgitm", "vlmatch"] {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut layers = micro_layers(&[
            "train.steps=3",
            "train.checkpoint_every=0",
            "eval.at_end=false",
        ]);
        layers.files.insert(0, root.join("configs/wordswap.toml"));
        layers
            .files
            .insert(0, root.join(format!("configs/{name}.toml")));
        let s = train_exclusive(TrainOptions {
            layers,
            run_dir: Some(scratch(&format!("preset-{name}-wordswap"))),
            resume: None,
            halt_after: None,
            progress: false,
            force: false,
        })
        .unwrap();
        assert_eq!(s.logged.len(), 3);
        assert!(
            s.logged
                .iter()
                .all(|m| m.contains_key("fgitm_acc_word_swap")
                    && !m.contains_key("fgitm_acc_neggen")
                    && m["fgitm"].as_f64().is_some_and(f64::is_finite)),
            "{name}: {:?}",
            s.logged[0]
        );
    }
}
