//! Property tests of the parsers that read user input: whatever the bytes,
//! the annotation parser, the tar reader (and the shard loader over it), the
//! brace patterns of shard names, the config layers and the model built from
//! a config return a value or an error, never panic.

mod common;
use common::*;
use proptest::prelude::*;
use serde_json::Value;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use vlmatch::data::annotations;
use vlmatch::data::tar::TarReader;
use vlmatch::data::{webdataset, OnError};

/// A directory with two images the annotation entries may name.
fn images() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = scratch("parsers-props");
        for name in ["a.png", "b.png"] {
            image::RgbImage::new(4, 4).save(dir.join(name)).unwrap();
        }
        dir
    })
}

/// A file of `bytes` in the scratch directory (one name per test).
fn file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = images().join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

/// JSON values biased towards the fields annotation files use.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("JSON numbers are finite", |f| f.is_finite())
            .prop_map(Value::from),
        "\\PC{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "a.png",
            "b.png",
            "missing.png",
            "../a.png",
            "",
            "train"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 5, |inner| {
        let key = prop::sample::select(vec![
            "image",
            "caption",
            "image_id",
            "images",
            "split",
            "filename",
            "filepath",
            "sentences",
            "raw",
            "imgid",
            "question",
            "negative",
            "x",
        ])
        .prop_map(String::from);
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::btree_map(key, inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// An annotation file: JSON lines, a JSON array or one object (Karpathy).
fn annotation_text() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(json(), 0..6).prop_map(|vs| {
            vs.iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join("\n")
                .into_bytes()
        }),
        prop::collection::vec(json(), 0..6)
            .prop_map(|vs| Value::Array(vs).to_string().into_bytes()),
        json().prop_map(|v| v.to_string().into_bytes()),
    ]
}

/// `bytes` with some bytes replaced and possibly cut short.
fn mutated(bytes: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    let n = bytes.len().max(1);
    (
        prop::collection::vec((0..n, any::<u8>()), 0..6),
        prop::option::of(0..=n),
    )
        .prop_map(move |(edits, cut)| {
            let mut b = bytes.clone();
            for (i, v) in edits {
                if i < b.len() {
                    b[i] = v;
                }
            }
            if let Some(c) = cut {
                b.truncate(c);
            }
            b
        })
}

fn load_every_way(path: &Path, split: Option<&str>) {
    for on_error in [OnError::Fail, OnError::Skip] {
        let _ = annotations::load_checked(path, Some(images()), split, on_error);
        let limits = annotations::AnnotationLimits::default();
        let _ = annotations::load_entries(path, Some(images()), "question", on_error, limits);
    }
    let _ = annotations::load_with(path, Some(images()), Some("negative"), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn annotation_parser_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let path = file("random.jsonl", &bytes);
        load_every_way(&path, None);
        load_every_way(&path, Some("train"));
    }

    #[test]
    fn annotation_parser_takes_any_json(
        text in annotation_text().prop_flat_map(mutated),
        split in prop::option::of("[a-z,]{0,8}"),
    ) {
        let path = file("random.json", &text);
        load_every_way(&path, split.as_deref());
    }
}

/// A ustar header for `name` whose 12-byte size field is `size` as given
/// (any bytes: octal, base-256, garbage), with a correct checksum, so the
/// reader gets past the checksum to the size.
fn header(name: &str, size: [u8; 12], kind: u8) -> [u8; 512] {
    let mut h = [0u8; 512];
    let n = name.len().min(100);
    h[..n].copy_from_slice(&name.as_bytes()[..n]);
    h[100..108].copy_from_slice(b"0000644\0");
    h[124..136].copy_from_slice(&size);
    h[156] = kind;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

/// An archive of a few members with random names, data and kinds, some
/// with raw size fields, then mutated.
fn archive() -> impl Strategy<Value = Vec<u8>> {
    let member = (
        prop::sample::select(vec![
            "000.png", "000.txt", "000.json", "001.jpg", "x", "a/b.txt",
        ]),
        prop::collection::vec(any::<u8>(), 0..700),
        prop::sample::select(vec![b'0', b'0', b'0', 0, b'5', b'L', b'x', b'g', b'2']),
        prop::option::of(prop::array::uniform12(any::<u8>())),
    );
    prop::collection::vec(member, 0..5)
        .prop_map(|members| {
            let mut out = Vec::new();
            for (name, data, kind, raw_size) in members {
                match raw_size {
                    Some(size) => {
                        out.extend_from_slice(&header(name, size, kind));
                        out.extend_from_slice(&data);
                    }
                    None if kind == b'0' => tar_entry(&mut out, name, &data),
                    None => {
                        let size = format!("{:011o}\0", data.len());
                        let size: [u8; 12] = size.as_bytes().try_into().unwrap();
                        out.extend_from_slice(&header(name, size, kind));
                        out.extend_from_slice(&data);
                        out.resize(out.len().div_ceil(512) * 512, 0);
                    }
                }
            }
            tar_end(&mut out);
            out
        })
        .prop_flat_map(mutated)
}

fn walk(bytes: &[u8]) {
    let mut reader = TarReader::new(Cursor::new(bytes));
    for i in 0..64 {
        match reader.next_member() {
            Ok(Some(m)) => {
                if i % 2 == 0 {
                    let _ = reader.read_data(&m);
                }
            }
            Ok(None) | Err(_) => break,
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn tar_reader_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        walk(&bytes);
    }

    #[test]
    fn tar_reader_and_shard_loader_take_damaged_archives(bytes in archive()) {
        walk(&bytes);
        let path = file("random.tar", &bytes);
        for on_error in [OnError::Fail, OnError::Skip] {
            let _ = webdataset::load_shards(&path.display().to_string(), on_error);
        }
    }

    #[test]
    fn shard_patterns_take_any_text(pattern in "[a-z0-9{}.,/]{0,24}") {
        let _ = webdataset::expand_braces(&pattern);
    }
}

/// Keys that exist, with a few that do not, for `--set`.
fn config_key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "train.lr",
            "train.min_lr",
            "train.steps",
            "train.batch_size",
            "train.betas",
            "train.grad_clip",
            "train.warmup_steps",
            "data.max_len",
            "data.image_size",
            "data.std",
            "data.source",
            "data.on_error",
            "eval.k",
            "eval.rerank",
            "model.embed_dim",
            "model.image.num_attention_heads",
            "model.image.plugin",
            "model.text.hidden_size",
            "model.fusion",
            "objectives.mlm.mask_ratio",
            "objectives.itm.samplers",
            "samplers.hard_negative.plugin",
            "plugins.paths",
            "train",
        ])
        .prop_map(String::from),
        1 => "[a-z_]{1,8}(\\.[a-z_]{1,8}){0,3}",
    ]
}

/// Values as a user might type them, plus any text.
fn config_value() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec![
            "nan", "-nan", "inf", "-inf", "-1", "0", "1", "3", "1e400", "-0.0", "0.5",
            "99999999999999999999", "\"x\"", "\"\"", "[1, 2]", "[]", "[0.9, 1.0]", "{a = 1}",
            "{}", "true", "", "1979-05-27", "'single'", "\"skip\"", "\"vit\"",
        ])
        .prop_map(String::from),
        1 => "\\PC{0,16}",
    ]
}

/// TOML-ish text: lines of sections and assignments, or any text.
fn toml_text() -> impl Strategy<Value = String> {
    let line = prop_oneof![
        "\\[[a-z._]{0,14}\\]",
        (config_key(), config_value()).prop_map(|(k, v)| {
            let k = k.rsplit('.').next().unwrap_or("x").to_string();
            format!("{k} = {v}")
        }),
        "\\PC{0,20}",
    ];
    prop::collection::vec(line, 0..8).prop_map(|lines| lines.join("\n"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn config_layers_take_any_overrides(
        sets in prop::collection::vec((config_key(), config_value()), 0..5),
        malformed in prop::collection::vec("\\PC{0,12}", 0..2),
    ) {
        let mut all: Vec<String> = sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
        all.extend(malformed);
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        if let Ok(loaded) = micro_layers(&all).load() {
            let _ = loaded.config.check_values();
            let _ = loaded.to_toml();
        }
    }

    #[test]
    fn config_layers_take_any_file(text in toml_text()) {
        let path = file("random.toml", text.as_bytes());
        let mut layers = micro_layers(&[]);
        layers.files.push(path);
        if let Ok(loaded) = layers.load() {
            let _ = loaded.to_toml();
        }
        // As the bottom layer (a preset or a run's saved config.toml) too.
        let layers = vlmatch_registry::ConfigLayers {
            base: Some(("random".into(), None, text)),
            ..Default::default()
        };
        let _ = layers.load();
    }
}

/// One of `valid` (four times in five), else one of `edges`.
fn edgy(valid: &[i64], edges: &[i64]) -> impl Strategy<Value = i64> {
    prop_oneof![
        4 => prop::sample::select(valid.to_vec()),
        1 => prop::sample::select(edges.to_vec()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The architecture keys across their edges: the model is built or the
    /// config is refused, never a panic (zero heads used to divide by zero).
    /// Most draws are valid, so that one bad key at a time is common.
    #[test]
    fn models_build_or_refuse_any_architecture(
        heads in (edgy(&[1, 2, 4], &[-1, 0, 3]), edgy(&[1, 2, 4], &[-1, 0, 3]), edgy(&[1, 2, 4], &[-1, 0, 3])),
        widths in (edgy(&[8, 16], &[-8, 0, 6]), edgy(&[8, 16], &[-8, 0, 6])),
        layers in (edgy(&[1, 2], &[-1, 0]), edgy(&[1, 2], &[-1, 0]), edgy(&[1, 2], &[-1, 0])),
        ffn in edgy(&[1, 16], &[-1, 0]),
        patch in edgy(&[4, 8], &[-1, 0, 3]),
        image_size in edgy(&[8, 16], &[-1, 0, 7]),
        max_len in edgy(&[3, 8, 24], &[-1, 0, 2]),
        positions in edgy(&[24, 64], &[0, 2]),
        embed in edgy(&[4, 8], &[-1, 0]),
    ) {
        let sets = [
            format!("model.image.num_attention_heads={}", heads.0),
            format!("model.text.num_attention_heads={}", heads.1),
            format!("model.fusion.num_attention_heads={}", heads.2),
            format!("model.image.hidden_size={}", widths.0),
            format!("model.text.hidden_size={}", widths.1),
            format!("model.image.num_hidden_layers={}", layers.0),
            format!("model.text.num_hidden_layers={}", layers.1),
            format!("model.fusion.num_hidden_layers={}", layers.2),
            format!("model.image.intermediate_size={ffn}"),
            format!("model.fusion.intermediate_size={ffn}"),
            format!("model.image.patch_size={patch}"),
            format!("model.text.max_position_embeddings={positions}"),
            format!("data.image_size={image_size}"),
            format!("data.max_len={max_len}"),
            format!("model.embed_dim={embed}"),
        ];
        let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
        if let Ok(loaded) = micro_layers(&sets).load() {
            let tok = std::sync::Arc::new(vlmatch::setup::tokenizer(&loaded).unwrap());
            let _ = vlmatch::setup::model(&loaded, &tok);
        }
    }
}
