//! The fine-grained held-out suite of the built-in data
//! (`src/data/finegrained.rs`): every negative differs from its caption in
//! exactly its kind's way and is false of its scene by the scene model's
//! truth function, over seeds; and the held-out evaluation and `eval --task
//! matching` report matching per kind.

mod common;
use common::*;
use proptest::prelude::*;
use vlmatch::data::finegrained::{case, Attr, Kind, Statement};
use vlmatch::data::synthetic::Scene;

/// The words of `text`, without the commas of a list.
fn words(text: &str) -> Vec<&str> {
    text.split(' ').map(|w| w.trim_end_matches(',')).collect()
}

/// The attribute whose words hold both `a` and `b`.
fn attr_of(a: &str, b: &str) -> Option<Attr> {
    Attr::ALL
        .into_iter()
        .find(|x| x.value(a).is_some() && x.value(b).is_some())
}

/// Whether some object of `scene` has value `word` of attribute `a`.
fn in_scene(scene: &Scene, a: Attr, word: &str) -> bool {
    let v = a.value(word).unwrap();
    scene.objects.iter().any(|o| match a {
        Attr::Color => o.color == v,
        Attr::Size => o.size == v,
        Attr::Shape => o.shape == v,
    })
}

/// Checks that `negative` differs from `caption` exactly as `kind` says,
/// on their words alone; `Err` says how it does not.
fn differs_as(kind: Kind, scene: &Scene, caption: &str, negative: &str) -> Result<(), String> {
    let (c, n) = (words(caption), words(negative));
    if c.len() != n.len() {
        return Err("different numbers of words".into());
    }
    let diff: Vec<usize> = (0..c.len()).filter(|&i| c[i] != n[i]).collect();
    let one = |diff: &[usize]| match diff {
        [i] => Ok((c[*i], n[*i])),
        _ => Err(format!("{} words differ, not one", diff.len())),
    };
    match kind {
        Kind::Color | Kind::Size | Kind::Shape | Kind::Absent => {
            let (old, new) = one(&diff)?;
            let a = attr_of(old, new).ok_or(format!("`{old}` -> `{new}`: not one attribute"))?;
            let want = match kind {
                Kind::Color => Some(Attr::Color),
                Kind::Size => Some(Attr::Size),
                Kind::Shape => Some(Attr::Shape),
                _ => None,
            };
            if want.is_some_and(|w| w != a) {
                return Err(format!("`{old}` -> `{new}` changes another attribute"));
            }
            // A swapped value is another object's; an absent one no object's.
            if in_scene(scene, a, new) != (kind != Kind::Absent) {
                return Err(format!("`{new}` is (not) in the scene"));
            }
        }
        Kind::Binding => {
            let [i, j] = diff[..] else {
                return Err(format!("{} words differ, not two", diff.len()));
            };
            if attr_of(c[i], c[j]).is_none() || (n[i], n[j]) != (c[j], c[i]) {
                return Err(format!("`{}`, `{}` not exchanged", c[i], c[j]));
            }
        }
        Kind::Relation => {
            let pair = one(&diff)?;
            let pairs = [("left", "right"), ("right", "left")];
            let vertical = [("above", "below"), ("below", "above")];
            if !pairs.contains(&pair) && !vertical.contains(&pair) {
                return Err(format!("{pair:?} is not a relation exchanged"));
            }
        }
        Kind::Count => {
            let counts = ["one", "two", "three"];
            let i = *diff.first().ok_or("nothing differs")?;
            if !counts.contains(&c[i]) || !counts.contains(&n[i]) {
                return Err(format!("`{}` -> `{}` is not a count", c[i], n[i]));
            }
            // Beside the count only the noun's number may change with it.
            let noun = |w: &str| if w == "one" { "shape" } else { "shapes" };
            if diff.iter().any(|&k| k != i && k != i + 1)
                || (c[i + 1], n[i + 1]) != (noun(c[i]), noun(n[i]))
            {
                return Err("more than the count changed".into());
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over seeds and scenes: every case's caption is true of its scene and
    /// its negative false, read back from their words; the negative differs
    /// exactly as its kind says; the texts parse back to the statements.
    #[test]
    fn every_negative_differs_as_its_kind_and_is_false(seed in any::<u64>(), index in any::<u64>()) {
        let scene = Scene::generate(seed, index);
        for kind in Kind::ALL {
            let Some(c) = case(&scene, index, kind) else {
                // Only the kinds that need two objects may be missing.
                prop_assert!(
                    !matches!(kind, Kind::Count | Kind::Absent),
                    "no {kind:?} case for {scene:?}"
                );
                continue;
            };
            prop_assert_eq!(c.kind, kind);
            let (ct, nt) = (c.caption.text(), c.negative.text());
            prop_assert_eq!(Statement::parse(&ct), Some(c.caption.clone()), "{}", ct);
            prop_assert_eq!(Statement::parse(&nt), Some(c.negative.clone()), "{}", nt);
            prop_assert!(Statement::parse(&ct).unwrap().holds(&scene), "{kind:?}: `{ct}` false of {scene:?}");
            prop_assert!(!Statement::parse(&nt).unwrap().holds(&scene), "{kind:?}: `{nt}` true of {scene:?}");
            if let Err(e) = differs_as(kind, &scene, &ct, &nt) {
                prop_assert!(false, "{:?}: `{}` vs `{}`: {}", kind, ct, nt, e);
            }
            // Drawn from the suite's own seed: the same case again.
            prop_assert_eq!(case(&scene, index, kind), Some(c));
        }
        // One object: nothing to swap with, bind or relate.
        if scene.objects.len() == 1 {
            for kind in [Kind::Color, Kind::Size, Kind::Shape, Kind::Binding, Kind::Relation] {
                prop_assert!(case(&scene, index, kind).is_none());
            }
        }
    }

    /// The truth function agrees with the scene model's own captions: every
    /// caption of the training data that the suite's grammar reads (the
    /// object list, the pairwise relations) is true of its scene.
    #[test]
    fn the_scene_models_own_captions_hold(seed in any::<u64>(), index in any::<u64>()) {
        let scene = Scene::generate(seed, index);
        let mut read = 0;
        for text in scene.captions(seed ^ index, 64) {
            if let Some(s) = Statement::parse(&text) {
                prop_assert!(s.holds(&scene), "`{text}` false of {scene:?}");
                read += 1;
            }
        }
        prop_assert!(read >= 1, "no caption of {scene:?} read");
    }
}

#[test]
fn the_truth_function_tells_the_cases_apart() {
    // A scene where several kinds each have one answer.
    let scene = (0..)
        .map(|i| Scene::generate(5, i))
        .find(|s| s.objects.len() == 3)
        .unwrap();
    let parse = |t: &str| Statement::parse(t).unwrap_or_else(|| panic!("`{t}` unread"));
    let mut kinds = 0;
    for kind in Kind::ALL {
        if let Some(c) = case(&scene, 0, kind) {
            kinds += 1;
            assert!(parse(&c.caption.text()).holds(&scene));
            assert!(!parse(&c.negative.text()).holds(&scene));
        }
    }
    assert!(kinds >= 3, "{scene:?}");
    // Words outside the grammar are not a statement.
    for text in [
        "a small red circle",
        "a red circle on a gray background",
        "a picture of one shapes on a gray background",
        "a small red circle next to a large blue square",
        "a small pink circle on a gray background",
    ] {
        assert_eq!(Statement::parse(text), None, "{text}");
    }
}

/// The held-out dataset of the micro config's built-in data.
fn heldout() -> vlmatch::data::Dataset {
    let loaded = micro_layers(&[]).load().unwrap();
    vlmatch::setup::datasets(&loaded).unwrap().1.unwrap()
}

#[test]
fn the_heldout_suite_counts_every_scene_once_per_kind() {
    let ds = heldout();
    let suite = vlmatch::eval::matching_cases(&ds).unwrap();
    let kinds: Vec<&str> = suite.skipped_scenes.keys().map(String::as_str).collect();
    let mut want: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
    want.sort_unstable();
    assert_eq!(kinds, want);
    for kind in Kind::ALL {
        let made = suite.cases.iter().filter(|c| c.kind == Some(kind)).count();
        assert_eq!(
            made + suite.skipped_scenes[kind.as_str()],
            ds.images.len(),
            "{kind:?}"
        );
    }
    assert_eq!(suite.skipped_scenes["count"], 0);
    assert_eq!(suite.skipped_scenes["absent"], 0);
    // The same cases every time.
    assert_eq!(
        vlmatch::eval::matching_cases(&ds).unwrap().cases,
        suite.cases
    );
}

#[test]
fn heldout_and_eval_matching_report_per_kind() {
    let dir = scratch("finegrained");
    let run_dir = dir.join("run");
    let s = run(
        &run_dir,
        &["train.steps=3", "train.checkpoint_every=3"],
        None,
    )
    .unwrap();
    let held = s.eval.expect("held-out evaluation at the end");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("eval-heldout.json")).unwrap())
            .unwrap();
    // `matching` keeps its keys; per kind adds the same keys.
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    let matching_keys = [
        "itc_acc",
        "itm_acc",
        "pairs",
        "rtd_chance",
        "rtd_pairs",
        "rtd_top1",
    ];
    assert_eq!(keys(&json["matching"]), matching_keys);
    let by_kind = json["matching_by_kind"].as_object().unwrap();
    assert!(by_kind.len() >= 5, "{json}");
    let (mut pairs, mut itm) = (0, 0.0);
    for (kind, m) in by_kind {
        assert!(Kind::parse(kind).is_some(), "{kind}");
        assert_eq!(keys(m), matching_keys);
        let n = m["pairs"].as_u64().unwrap();
        let skipped = json["matching_skipped_scenes"][kind].as_u64().unwrap();
        assert_eq!(n + skipped, 16, "{kind}: every held-out scene once");
        pairs += n;
        itm += n as f64 * m["itm_acc"].as_f64().unwrap();
    }
    assert_eq!(held.matching.pairs as u64, pairs);
    assert!((held.matching.itm_acc * pairs as f64 - itm).abs() < 1e-6);

    // The suite dumped by `preview` is a pairs file with kinds: `eval
    // --task matching` on it reports what the held-out evaluation did.
    let dump = dir.join("heldout");
    vlmatch::commands::preview::preview(micro_layers(&[]), "heldout", None, &dump).unwrap();
    let data = |path: &std::path::Path| vlmatch::commands::eval::DataArg {
        path: path.to_path_buf(),
        image_root: Some(dump.clone()),
        split: None,
        labels: None,
    };
    let _turn = TRAINING.lock().unwrap_or_else(|e| e.into_inner());
    let m = vlmatch::commands::eval::eval_task(
        &run_dir,
        "matching",
        &data(&dump.join("matching.jsonl")),
        &[],
        false,
    )
    .unwrap();
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        a["pairs"] == b["pairs"]
            && ["itm_acc", "itc_acc", "rtd_top1"]
                .iter()
                .all(|k| (a[k].as_f64().unwrap() - b[k].as_f64().unwrap()).abs() < 1e-9)
    };
    assert!(close(&m, &json["matching"]), "{m} vs {json}");
    assert_eq!(
        keys(&m["matching_by_kind"]),
        keys(&json["matching_by_kind"])
    );
    for (kind, want) in by_kind {
        assert!(
            close(&m["matching_by_kind"][kind], want),
            "{kind}: {m} vs {json}"
        );
    }

    let text = std::fs::read_to_string(dump.join("matching.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(2).collect();
    // A line without a kind counts in the overall numbers only.
    let mut first: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    first.as_object_mut().unwrap().remove("kind");
    let second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
    let mixed = dir.join("mixed.jsonl");
    std::fs::write(&mixed, format!("{first}\n{second}\n")).unwrap();
    let m = vlmatch::commands::eval::eval_task(&run_dir, "matching", &data(&mixed), &[], false)
        .unwrap();
    assert_eq!(m["pairs"], 2, "{m}");
    let kinds = m["matching_by_kind"].as_object().unwrap();
    assert_eq!(kinds.len(), 1, "{m}");
    assert_eq!(kinds[second["kind"].as_str().unwrap()]["pairs"], 1, "{m}");

    // A kind that is not one, or not a string, names the file and line.
    for (bad, says) in [
        (
            "\"colour\"",
            "`kind` \"colour\" is not a kind: expected one of color, size",
        ),
        ("3", "`kind` must be a string"),
    ] {
        let mut second: serde_json::Value = serde_json::from_str(lines[1]).unwrap();
        second["kind"] = serde_json::from_str(bad).unwrap();
        let file = dir.join("bad-kind.jsonl");
        std::fs::write(&file, format!("{}\n{second}\n", lines[0])).unwrap();
        let err =
            vlmatch::commands::eval::eval_task(&run_dir, "matching", &data(&file), &[], false)
                .unwrap_err()
                .to_string();
        assert!(
            err.contains(&format!("{}:2: {says}", file.display())),
            "{err}"
        );
    }
}
