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
            let m = &s.logged[0];
            assert!(
                m.contains_key("fgitm_acc_word_swap") && m.contains_key("fgitm_acc_hard_negative"),
                "{m:?}"
            );
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
