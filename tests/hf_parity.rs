//! HuggingFace parity: every fixture under tests/fixtures/hf/ (and under each
//! directory listed in VLMATCH_HF_FIXTURES, colon-separated) loads into the
//! plugin its `config.json`'s `model_type` names (`bert`, `vit`, `roberta`;
//! `clip` or `clip_vision_model`: `clip_vit`) and reproduces `transformers`' `last_hidden_state`
//! within 1e-4 (and, for a `BertForMaskedLM` or `RobertaForMaskedLM`
//! fixture with `logits`, the `mlm_head` or `roberta_lm_head` plugin its MLM
//! logits). A fixture with `texts.json` must tokenise those texts (padded
//! to the longest) to exactly its `input_ids` and `attention_mask`, with its
//! `tokenizer.json` and with its `vocab.txt`, whichever it has, and group the
//! tokens into words as its `word_ids` do; a fixture with a `tokenizer.json`
//! and no `config.json` checks only that. Fixtures:
//! tests/golden/make_hf_fixtures.py.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, Tensor};
use vlmatch::pretrained::{apply_layout, read_checkpoint};
use vlmatch_registry::{Kind as PluginKind, Registry};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> Vec<PathBuf> {
    let mut roots = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf")];
    if let Ok(extra) = std::env::var("VLMATCH_HF_FIXTURES") {
        roots.extend(
            extra
                .split(':')
                .filter(|s| !s.is_empty())
                .map(PathBuf::from),
        );
    }
    let mut out = Vec::new();
    for root in roots {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
            .unwrap_or_else(|e| panic!("fixture directory {}: {e}", root.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("config.json").is_file() || p.join("tokenizer.json").is_file())
            .collect();
        dirs.sort();
        out.extend(dirs);
    }
    out
}

/// Load `dir`'s weights into `vs`, where `plugins` (an encoder and maybe
/// its LM head) are built at the root, through the checkpoint layouts they
/// registered: every parameter must be loaded by one of them.
fn load(dir: &Path, vs: &nn::VarStore, plugins: &[(PluginKind, &str)]) -> Result<(), String> {
    let registry = Registry::from_inventory().unwrap();
    let ckpt = read_checkpoint(dir).map_err(|e| e.to_string())?;
    let vars: HashMap<String, Tensor> = vs.variables();
    let mut missing: Option<std::collections::HashSet<String>> = None;
    let section = serde_json::json!({});
    for (kind, name) in plugins {
        let layout = registry
            .layout(*kind, name)
            .ok_or_else(|| format!("{kind} `{name}` registers no checkpoint layout"))?;
        let r = apply_layout(
            "fixture", dir, &ckpt, &vars, "", layout, "fixture", &section,
        );
        if !r.mismatched.is_empty() {
            return Err(format!("{r}"));
        }
        let m: std::collections::HashSet<String> = r.missing.into_iter().collect();
        missing = Some(match missing {
            None => m,
            Some(before) => before.intersection(&m).cloned().collect(),
        });
    }
    match missing {
        Some(m) if !m.is_empty() => Err(format!("{}: not loaded: {m:?}", dir.display())),
        _ => Ok(()),
    }
}

fn compare(dir: &Path, name: &str, got: &Tensor, expected: &Tensor) -> Result<(), String> {
    if got.size() != expected.size() {
        return Err(format!(
            "{}: `{name}` has shape {:?}, expected {:?}",
            dir.display(),
            got.size(),
            expected.size()
        ));
    }
    let diff = (got - expected).abs().max().double_value(&[]);
    if diff > TOLERANCE {
        return Err(format!(
            "{}: `{name}` differs by up to {diff:.3e} (tolerance {TOLERANCE:.0e})",
            dir.display()
        ));
    }
    Ok(())
}

/// Tokenise `texts.json` with the fixture's `tokenizer.json` and its
/// `vocab.txt` (lowercased, as `transformers`' `BertTokenizer` does), each
/// that it has: exactly `input_ids` and `attention_mask`, and, where the
/// fixture has `word_ids`, the same grouping of tokens into words.
fn check_tokenizers(dir: &Path, expected: &HashMap<String, Tensor>) -> Result<(), String> {
    if !dir.join("texts.json").is_file() {
        return Ok(());
    }
    let texts: Vec<String> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("texts.json")).unwrap()).unwrap();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let ids = &expected["input_ids"];
    let mask = &expected["attention_mask"];
    let files = ["tokenizer.json", "vocab.txt"].map(|f| dir.join(f));
    let files: Vec<&PathBuf> = files.iter().filter(|f| f.is_file()).collect();
    if files.is_empty() {
        return Err(format!(
            "{}: texts.json without tokenizer.json or vocab.txt",
            dir.display()
        ));
    }
    for file in files {
        let tok =
            vlmatch::tokenizer::Tokenizer::from_path(file, true).map_err(|e| e.to_string())?;
        let batch = tok.text_batch(&refs, 512, Device::Cpu);
        if !batch.ids.equal(ids) || !batch.mask.equal(mask) {
            return Err(format!(
                "{}: tokenising texts.json gives {:?}, expected input_ids {:?}",
                file.display(),
                Vec::<i64>::try_from(batch.ids.flatten(0, 1)).unwrap(),
                Vec::<i64>::try_from(ids.flatten(0, 1)).unwrap()
            ));
        }
        let Some(word_ids) = expected.get("word_ids") else {
            continue;
        };
        for (row, text) in refs.iter().enumerate() {
            // transformers' word index of each token, renumbered in order of
            // appearance; vlmatch's is the index of the word span holding it.
            let want: Vec<i64> = Vec::try_from(word_ids.get(row as i64)).unwrap();
            let mut seen: Vec<i64> = Vec::new();
            let want: Vec<i64> = want
                .iter()
                .map(|&w| {
                    if w < 0 {
                        return -1;
                    }
                    if !seen.contains(&w) {
                        seen.push(w);
                    }
                    seen.iter().position(|&s| s == w).unwrap() as i64
                })
                .collect();
            let (row_ids, words) = tok.encode_words(text, 512);
            let mut got = vec![-1i64; want.len()];
            for (i, (_, span)) in words.iter().enumerate() {
                for p in span.clone() {
                    got[p] = i as i64;
                }
            }
            if row_ids != tok.encode(text, 512) || got != want {
                return Err(format!(
                    "{}: {text:?} groups tokens into words {got:?}, expected {want:?} ({words:?})",
                    file.display()
                ));
            }
        }
    }
    Ok(())
}

/// Check one fixture; the error names the fixture, the tensor and the largest difference.
fn check_fixture(dir: &Path) -> Result<(), String> {
    let expected: HashMap<String, Tensor> =
        Tensor::read_safetensors(dir.join("expected.safetensors"))
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .into_iter()
            .collect();
    check_tokenizers(dir, &expected)?;
    if !dir.join("config.json").is_file() {
        return Ok(());
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vs = nn::VarStore::new(Device::Cpu);
    match config["model_type"].as_str() {
        Some("bert") => {
            let section = bert::BertSection {
                init: Some(dir.to_path_buf()),
                ..Default::default()
            };
            let cfg = section.resolve("fixture").map_err(|e| e.to_string())?;
            let ids = &expected["input_ids"];
            let mask = &expected["attention_mask"];
            let model = bert::Bert::new(
                &vs.root(),
                &cfg,
                cfg.vocab_size.unwrap(),
                ids.size()[1],
                Kind::Float,
            )
            .map_err(|e| e.to_string())?;
            // A BertForMaskedLM fixture (`logits`): the MLM head too, tied
            // to the word embeddings as `mlm_head` is.
            let head = expected.contains_key("logits").then(|| {
                let emb = vlmatch_core::Encoder::word_embeddings(&model).unwrap();
                mlm_head::MlmHead::new(&vs.root(), emb, cfg.layer_norm_eps, Kind::Float)
            });
            let mut plugins = vec![(PluginKind::Encoder, "bert")];
            if head.is_some() {
                plugins.push((PluginKind::Generator, "mlm_head"));
            }
            load(dir, &vs, &plugins)?;
            let out = tch::no_grad(|| model.forward(ids, mask, false));
            compare_text(
                dir,
                &expected,
                out,
                head.as_ref().map(|h| h as &dyn vlmatch_core::Generator),
            )
        }
        Some("vit") => {
            let section = vit::VitSection {
                init: Some(dir.to_path_buf()),
                ..Default::default()
            };
            let cfg = section.resolve("fixture").map_err(|e| e.to_string())?;
            let model = vit::Vit::new(&vs.root(), &cfg, cfg.image_size.unwrap(), Kind::Float)
                .map_err(|e| e.to_string())?;
            load(dir, &vs, &[(PluginKind::Encoder, "vit")])?;
            let out = tch::no_grad(|| model.forward(&expected["pixel_values"], false))
                .map_err(|e| e.to_string())?;
            compare(
                dir,
                "last_hidden_state",
                &out,
                &expected["last_hidden_state"],
            )
        }
        // RobertaModel or RobertaForMaskedLM (`logits`: `roberta_lm_head`).
        Some("roberta") => {
            let section = roberta::RobertaSection {
                init: Some(dir.to_path_buf()),
                ..Default::default()
            };
            let cfg = section.resolve("fixture").map_err(|e| e.to_string())?;
            let ids = &expected["input_ids"];
            let mask = &expected["attention_mask"];
            let model = roberta::Roberta::new(
                &vs.root(),
                &cfg,
                cfg.vocab_size.unwrap(),
                ids.size()[1],
                Kind::Float,
            )
            .map_err(|e| e.to_string())?;
            let head = expected.contains_key("logits").then(|| {
                let emb = vlmatch_core::Encoder::word_embeddings(&model).unwrap();
                roberta::RobertaLmHead::new(&vs.root(), emb, cfg.layer_norm_eps, Kind::Float)
            });
            let mut plugins = vec![(PluginKind::Encoder, "roberta")];
            if head.is_some() {
                plugins.push((PluginKind::Generator, "roberta_lm_head"));
            }
            load(dir, &vs, &plugins)?;
            let out = tch::no_grad(|| model.forward(ids, mask, false));
            compare_text(
                dir,
                &expected,
                out,
                head.as_ref().map(|h| h as &dyn vlmatch_core::Generator),
            )
        }
        // A CLIPVisionModel, or a CLIPModel's vision tower: the encoder's
        // output before `post_layernorm` is `last_hidden_state`, and
        // position 0 of `forward` (post_layernorm applied) `pooler_output`.
        Some("clip_vision_model" | "clip") => {
            let section = clip_vit::ClipVitSection {
                init: Some(dir.to_path_buf()),
                ..Default::default()
            };
            let cfg = section.resolve("fixture").map_err(|e| e.to_string())?;
            let model =
                clip_vit::ClipVit::new(&vs.root(), &cfg, cfg.image_size.unwrap(), Kind::Float)
                    .map_err(|e| e.to_string())?;
            load(dir, &vs, &[(PluginKind::Encoder, "clip_vit")])?;
            let pixels = &expected["pixel_values"];
            let hidden = tch::no_grad(|| model.forward_unnormed(pixels, false))
                .map_err(|e| e.to_string())?;
            compare(
                dir,
                "last_hidden_state",
                &hidden,
                &expected["last_hidden_state"],
            )?;
            let out = tch::no_grad(|| model.forward(pixels, false)).map_err(|e| e.to_string())?;
            compare(
                dir,
                "pooler_output",
                &out.select(1, 0),
                &expected["pooler_output"],
            )
        }
        other => Err(format!(
            "{}: unsupported model_type {other:?}",
            dir.display()
        )),
    }
}

#[test]
fn every_fixture_matches_transformers() {
    let all = fixtures();
    assert!(
        all.len() >= 4,
        "expected the committed fixtures, found {all:?}"
    );
    let failures: Vec<String> = all.iter().filter_map(|d| check_fixture(d).err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        all.len(),
        failures.join("\n")
    );
}

#[test]
fn an_altered_expected_output_fails_naming_fixture_tensor_and_difference() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/vit-40px-p8-3heads");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("altered-fixture-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut expected = Tensor::read_safetensors(src.join("expected.safetensors")).unwrap();
    for (name, t) in &mut expected {
        if name == "last_hidden_state" {
            let bumped = t.copy();
            let _ = bumped.get(0).get(3).get(5).g_add_scalar_(1e-3);
            *t = bumped;
        }
    }
    Tensor::write_safetensors(&expected, dir.join("expected.safetensors")).unwrap();
    let err = check_fixture(&dir).unwrap_err();
    assert!(
        err.contains("altered-fixture") && err.contains("last_hidden_state"),
        "{err}"
    );
    let diff: f64 = err
        .split("differs by up to ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (9e-4..1.1e-3).contains(&diff),
        "reports the largest difference: {err}"
    );
}

/// A text encoder fixture's `last_hidden_state`, then, for a masked-LM
/// fixture, the `logits` of `head` over those states.
fn compare_text(
    dir: &Path,
    expected: &HashMap<String, Tensor>,
    out: Tensor,
    head: Option<&dyn vlmatch_core::Generator>,
) -> Result<(), String> {
    compare(
        dir,
        "last_hidden_state",
        &out,
        &expected["last_hidden_state"],
    )?;
    let Some(head) = head else { return Ok(()) };
    let states = vlmatch_core::Encoded {
        hidden: out,
        mask: expected["attention_mask"].shallow_clone(),
    };
    let logits = tch::no_grad(|| head.logits(&states, false)).map_err(|e| e.to_string())?;
    compare(dir, "logits", &logits, &expected["logits"])
}
