//! The fault suite's bad inputs: config values, annotation lines, images,
//! shards, checkpoints and plugin libraries, each given to the `vlmatch`
//! binary as a user would. Every case must end with
//!
//! - its exit status (2 for config and data errors, 1 for I/O and model
//!   errors, 70 for a panic caught at the top; never 101, an uncaught panic),
//! - exactly one `error: ` line on stderr, naming the key or the file (and
//!   line or member where there is one),
//! - no backtrace (`panicked at`, `stack backtrace`),
//! - no truncated or half-written file in the run directory: nothing named
//!   `*.tmp`, no empty or cut `*.safetensors`, no `*.jsonl` ending mid-line
//!   (the merged `config.toml` written before step 0 is fine).
//!
//! The cases are tables, one test per kind of input so that the kinds run in
//! parallel; most stop at config validation or data loading, before step 0.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::SystemTime;

/// No `--set` beyond the micro model's.
const NO_SETS: &[&str] = &[];

/// [`Case::status`] for "1 or 2": an error, not a panic or a signal.
const ANY_ERROR: i32 = -2;

/// One bad input and what the CLI must say about it.
struct Case {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    status: i32,
    /// Substrings of the error line: the key, the file, the line.
    needles: Vec<String>,
    /// Where the run writes (a fresh run directory, or the run an `eval`
    /// reads); checked for leftovers.
    run_dir: Option<PathBuf>,
}

impl Case {
    /// `vlmatch train` on the micro model (2 steps, no final evaluation)
    /// with `sets`, into a fresh run directory; a config error by default.
    fn train<S: AsRef<str>>(name: &str, sets: &[S]) -> Case {
        let run_dir = root().join("runs").join(name);
        let mut args = vec![
            "train".to_string(),
            "--quiet".into(),
            "--config".into(),
            fixture("micro.toml").display().to_string(),
            "--run-dir".into(),
            run_dir.display().to_string(),
        ];
        for s in [
            "train.steps=2",
            "eval.at_end=false",
            "data.synthetic.train_scenes=16",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(sets.iter().map(|s| s.as_ref().to_string()))
        {
            args.push("--set".into());
            args.push(s);
        }
        Case {
            name: name.to_string(),
            args,
            env: Vec::new(),
            status: 2,
            needles: Vec::new(),
            run_dir: Some(run_dir),
        }
    }

    /// `vlmatch eval --task heldout` of the run directory `dir`, plus `more`.
    fn eval(name: &str, dir: &Path, more: &[&str]) -> Case {
        let mut args: Vec<String> = ["eval", "--quiet", "--task", "heldout", "--checkpoint"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(dir.display().to_string());
        args.extend(more.iter().map(|s| s.to_string()));
        Case {
            name: name.to_string(),
            args,
            env: Vec::new(),
            status: 2,
            needles: Vec::new(),
            run_dir: Some(dir.to_path_buf()),
        }
    }

    fn names(mut self, needles: &[&str]) -> Case {
        self.needles.extend(needles.iter().map(|s| s.to_string()));
        self
    }

    fn names_path(mut self, path: &Path) -> Case {
        self.needles.push(path.display().to_string());
        self
    }

    fn status(mut self, status: i32) -> Case {
        self.status = status;
        self
    }

    /// Layer `file` over the micro model (`--config`, after micro.toml).
    fn config_file(mut self, file: &Path) -> Case {
        self.args
            .splice(4..4, ["--config".to_string(), file.display().to_string()]);
        self
    }

    fn env(mut self, key: &str, value: &str) -> Case {
        self.env.push((key.into(), value.into()));
        self
    }
}

/// This test binary's scratch root, shared by its tests.
fn root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| scratch("bad-inputs"))
}

/// Files of `dir` (recursively) with their size and modification time.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, Option<SystemTime>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = e.metadata() else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else {
                out.insert(path, (meta.len(), meta.modified().ok()));
            }
        }
    }
    out
}

/// What is wrong with a file the run wrote, if anything.
fn half_written(path: &Path, size: u64) -> Option<String> {
    let name = path.file_name()?.to_string_lossy().into_owned();
    if name.contains(".tmp") || name.ends_with('~') {
        return Some("a temporary file".into());
    }
    let bytes = std::fs::read(path).ok()?;
    if name.ends_with(".jsonl") {
        return (!bytes.is_empty() && !bytes.ends_with(b"\n")).then(|| "ends mid-line".into());
    }
    if size == 0 {
        return Some("empty".into());
    }
    if name.ends_with(".safetensors") {
        let header = bytes
            .get(..8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
        let complete = header.is_some_and(|n| n.checked_add(8).is_some_and(|end| end <= size));
        return (!complete).then(|| "a cut safetensors file".into());
    }
    None
}

/// Run every case; returns one message per failed expectation.
fn check(cases: Vec<Case>) {
    let mut failures = Vec::new();
    let mut names = std::collections::BTreeSet::new();
    for case in &cases {
        assert!(names.insert(&case.name), "case `{}` twice", case.name);
        let before = case.run_dir.as_deref().map(listing).unwrap_or_default();
        let out = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
            .args(&case.args)
            .envs(case.env.iter().map(|(k, v)| (k, v)))
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .env("RUST_LOG", "warn")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("the vlmatch binary runs");
        let status = out.status.code().unwrap_or(-1);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let mut fail =
            |why: String| failures.push(format!("[{}] {why}\n  stderr:\n{stderr}", case.name));
        let expected = match case.status {
            ANY_ERROR => status == 1 || status == 2,
            s => status == s,
        };
        if !expected {
            fail(format!("exit status {status}, expected {}", case.status));
        }
        if stderr.contains("panicked at") || stderr.contains("stack backtrace") {
            fail("a panic or backtrace was printed".into());
        }
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("error: "))
            .collect();
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty());
        match errors.as_slice() {
            [line] if last != Some(*line) => fail("the error runs over more than one line".into()),
            [line] => {
                for n in &case.needles {
                    if !line.contains(n.as_str()) {
                        fail(format!("the error line does not name `{n}`"));
                    }
                }
            }
            _ => fail(format!("{} error lines, expected one", errors.len())),
        }
        if let Some(dir) = &case.run_dir {
            for (path, (size, mtime)) in listing(dir) {
                if before.get(&path) == Some(&(size, mtime)) {
                    continue;
                }
                if let Some(why) = half_written(&path, size) {
                    fail(format!("left {}: {why}", path.display()));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn bad_config_values_name_their_key() {
    let heads = "model.image.num_attention_heads";
    let file = root().join("lr.toml");
    std::fs::write(&file, "[train]\nlr = -1.0\n").unwrap();
    let with_file = Case::train("config-file-lr", NO_SETS)
        .config_file(&file)
        .names(&["`train.lr`", "-1"])
        .names_path(&file);
    let not_utf8 = root().join("latin1.toml");
    std::fs::write(&not_utf8, b"[train]\n# caf\xe9\nsteps = 2\n").unwrap();
    let vocab = root().join("vocab.txt");
    std::fs::write(&vocab, b"[PAD]\n[UNK]\ncaf\xe9\n").unwrap();
    // A tokenizer.json whose vocabulary holds an id near u32::MAX (it once
    // aborted the process).
    let mut tok: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixture("hf/bert-h48-3heads-vocab/tokenizer.json")).unwrap(),
    )
    .unwrap();
    tok["model"]["vocab"]["zzzz"] = serde_json::json!(u32::MAX - 3);
    let huge_id = root().join("huge-id-tokenizer.json");
    std::fs::write(&huge_id, tok.to_string()).unwrap();
    let cache_utf8 = root().join("neggen-cache-latin1.jsonl");
    std::fs::write(
        &cache_utf8,
        b"{\"caption\": \"a\", \"negative\": \"b\"}\n{\"caption\": \"caf\xe9\", \"negative\": \"b\"}\n",
    )
    .unwrap();
    let cache_json = root().join("neggen-cache-fields.jsonl");
    std::fs::write(&cache_json, b"{\"caption\": \"a\"}\n").unwrap();
    let neggen_cache = |path: &Path| {
        vec![
            "samplers.cache.plugin=\"neggen_cache\"".to_string(),
            format!("samplers.cache.path=\"{}\"", path.display()),
            "objectives.itm.samplers=[\"hard_negative\", \"cache\"]".into(),
        ]
    };
    let word_swap = [
        "samplers.word_swap.plugin=\"word_swap\"",
        "samplers.word_swap.groups=[[\"red\", \"blue\", \"red\"]]",
        "objectives.itm.samplers=[\"hard_negative\", \"word_swap\"]",
    ];
    check(vec![
        Case::train("image-heads-zero", &[&format!("{heads}=0")]).names(&[heads, "at least 1"]),
        Case::train("image-heads-negative", &[&format!("{heads}=-2")]).names(&[heads]),
        Case::train("image-heads-not-dividing", &[&format!("{heads}=5")]).names(&[
            heads,
            "model.image.hidden_size",
            "32",
        ]),
        Case::train("text-heads-zero", &["model.text.num_attention_heads=0"])
            .names(&["model.text.num_attention_heads"]),
        Case::train("fusion-heads-zero", &["model.fusion.num_attention_heads=0"])
            .names(&["model.fusion.num_attention_heads"]),
        Case::train(
            "fusion-heads-not-dividing",
            &["model.fusion.num_attention_heads=3"],
        )
        .names(&["model.fusion.num_attention_heads", "32"]),
        Case::train("image-layers-zero", &["model.image.num_hidden_layers=0"])
            .names(&["model.image.num_hidden_layers"]),
        Case::train("fusion-layers-zero", &["model.fusion.num_hidden_layers=0"])
            .names(&["model.fusion.num_hidden_layers"]),
        Case::train("text-width-negative", &["model.text.intermediate_size=-4"])
            .names(&["model.text.intermediate_size", "-4"]),
        Case::train("patch-size-zero", &["model.image.patch_size=0"])
            .names(&["model.image.patch_size"]),
        Case::train(
            "dropout-above-one",
            &["model.image.hidden_dropout_prob=1.5"],
        )
        .names(&["model.image.hidden_dropout_prob", "[0, 1)"]),
        Case::train("layer-norm-eps-nan", &["model.text.layer_norm_eps=nan"])
            .names(&["model.text.layer_norm_eps", "NaN"]),
        Case::train("positions-short", &["model.text.max_position_embeddings=8"])
            .names(&["model.text.max_position_embeddings", "data.max_len"]),
        Case::train("embed-dim-zero", &["model.embed_dim=0"]).names(&["model.embed_dim"]),
        Case::train("lr-nan", &["train.lr=nan"]).names(&["`train.lr`", "--set train.lr", "NaN"]),
        Case::train("lr-negative", &["train.lr=-1"]).names(&["`train.lr`", "> 0", "-1"]),
        Case::train("lr-infinite", &["train.lr=inf"]).names(&["`train.lr`", "inf"]),
        Case::train("lr-from-environment", NO_SETS)
            .env("VLMATCH_TRAIN__LR", "-1")
            .names(&["`train.lr`", "VLMATCH_TRAIN__LR"]),
        with_file,
        Case::train("steps-zero", &["train.steps=0"]).names(&["train.steps"]),
        Case::train("batch-size-zero", &["train.batch_size=0"]).names(&["train.batch_size"]),
        Case::train("warmup-negative", &["train.warmup_steps=-1"]).names(&["train.warmup_steps"]),
        Case::train("min-lr-above-lr", &["train.min_lr=1.0"]).names(&["train.min_lr", "train.lr"]),
        Case::train("grad-clip-negative", &["train.grad_clip=-1"]).names(&["train.grad_clip"]),
        Case::train("weight-decay-nan", &["train.weight_decay=nan"]).names(&["train.weight_decay"]),
        Case::train("beta-one", &["train.betas=[0.9, 1.0]"]).names(&["train.betas", "beta2"]),
        Case::train("adam-eps-zero", &["train.eps=0.0"]).names(&["train.eps"]),
        Case::train("max-len-one", &["data.max_len=1"]).names(&[
            "data.max_len",
            "at least 3",
            "got 1",
        ]),
        Case::train("image-size-zero", &["data.image_size=0"]).names(&["data.image_size"]),
        Case::train("std-zero", &["data.std=[0.2, 0.0, 0.3]"]).names(&["data.std", "channel 1"]),
        Case::train("mask-ratio-above-one", &["objectives.mlm.mask_ratio=1.5"])
            .names(&["objectives.mlm.mask_ratio"]),
        Case::train("objective-weight-negative", &["objectives.itm.weight=-1"])
            .names(&["objectives.itm.weight"]),
        Case::train("eval-k-zero", &["eval.k=0"]).names(&["eval.k"]),
        Case::train("word-swap-group-repeats", &word_swap)
            .names(&["samplers.word_swap.groups", "`red`"]),
        Case::train("wrong-type", &["train.steps=\"two\""]).names(&["train.steps"]),
        Case::train("config-file-not-utf8", NO_SETS)
            .config_file(&not_utf8)
            .names(&[&format!("{}:2", not_utf8.display()), "invalid UTF-8"]),
        Case::train(
            "vocab-not-utf8",
            &[&format!("data.vocab=\"{}\"", vocab.display())],
        )
        .names(&[&format!("{}:3", vocab.display()), "invalid UTF-8"]),
        Case::train(
            "tokenizer-id-out-of-range",
            &[&format!("data.vocab=\"{}\"", huge_id.display())],
        )
        .names(&[&huge_id.display().to_string(), "4294967292"]),
        Case::train("neggen-cache-not-utf8", &neggen_cache(&cache_utf8))
            .names(&[&format!("{}:2", cache_utf8.display()), "invalid UTF-8"]),
        Case::train("neggen-cache-bad-line", &neggen_cache(&cache_json))
            .names(&[&format!("{}:1", cache_json.display()), "negative"]),
        Case::train("missing-config-file", NO_SETS)
            .config_file(Path::new("no-such-config.toml"))
            .names(&["no-such-config.toml"]),
    ]);
}

/// `n` x `n` RGB PNG bytes of one color.
fn png(n: u32, color: [u8; 3]) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(n, n, image::Rgb(color));
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

/// CRC-32 (IEEE) of PNG chunks.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A valid PNG header claiming 100000 x 100000 pixels over a few bytes of
/// data: a decompression bomb.
fn png_bomb() -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&100_000u32.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(b"IHDR", &ihdr);
    // A zlib stream of one stored block of 4 zero bytes.
    chunk(
        b"IDAT",
        &[0x78, 0x01, 0x01, 4, 0, 0xfb, 0xff, 0, 0, 0, 0, 0, 4, 0, 1],
    );
    chunk(b"IEND", &[]);
    out
}

/// Images and annotation files for the data cases.
struct AnnotationFixtures {
    dir: PathBuf,
    images: PathBuf,
}

fn annotation_fixtures() -> &'static AnnotationFixtures {
    static F: OnceLock<AnnotationFixtures> = OnceLock::new();
    F.get_or_init(|| {
        let dir = root().join("annotations");
        let images = dir.join("images");
        std::fs::create_dir_all(&images).unwrap();
        for (name, color) in [
            ("a.png", [200, 0, 0]),
            ("b.png", [0, 200, 0]),
            ("c.png", [0, 0, 200]),
        ] {
            std::fs::write(images.join(name), png(16, color)).unwrap();
        }
        std::fs::write(images.join("garbage.png"), b"this is not a PNG file at all").unwrap();
        std::fs::write(images.join("empty.jpg"), b"").unwrap();
        std::fs::write(images.join("bomb.png"), png_bomb()).unwrap();
        // A real image beside the root, for the cases that try to leave it.
        std::fs::write(dir.join("outside.png"), png(16, [9, 9, 9])).unwrap();
        AnnotationFixtures { dir, images }
    })
}

const GOOD: [&str; 3] = [
    r#"{"image": "a.png", "caption": "a red square"}"#,
    r#"{"image": "b.png", "caption": "a green square"}"#,
    r#"{"image": "c.png", "caption": "a blue square"}"#,
];

/// An annotation file `name` holding `bytes`, and the sets that train on it
/// (batch size 2, so a few pairs suffice).
fn annotations(name: &str, bytes: &[u8]) -> (PathBuf, Vec<String>) {
    let f = annotation_fixtures();
    let path = f.dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    let sets = vec![
        "data.source=\"annotations\"".to_string(),
        format!("data.annotations=\"{}\"", path.display()),
        format!("data.image_root=\"{}\"", f.images.display()),
        "train.batch_size=2".into(),
        "train.steps=1".into(),
    ];
    (path, sets)
}

/// JSON lines: the good ones with `bad` inserted at index `at`.
fn lines_with(bad: &[u8], at: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, line) in GOOD.iter().enumerate() {
        if i == at {
            out.extend_from_slice(bad);
            out.push(b'\n');
        }
        out.extend_from_slice(line.as_bytes());
        out.push(b'\n');
    }
    out
}

fn data_case(name: &str, file: &str, bytes: &[u8], extra: &[&str]) -> (Case, PathBuf) {
    let (path, mut sets) = annotations(file, bytes);
    sets.extend(extra.iter().map(|s| s.to_string()));
    let sets: Vec<&str> = sets.iter().map(String::as_str).collect();
    (Case::train(name, &sets), path)
}

#[test]
fn bad_annotation_lines_and_images_name_file_and_line() {
    let mut cases = Vec::new();
    let mut add =
        |name: &str, bytes: Vec<u8>, extra: &[&str], needles: &dyn Fn(&Path) -> Vec<String>| {
            let (case, path) = data_case(name, &format!("{name}.jsonl"), &bytes, extra);
            let n: Vec<String> = needles(&path);
            let n: Vec<&str> = n.iter().map(String::as_str).collect();
            cases.push(case.names(&n));
        };
    let at = |line: usize| move |p: &Path| vec![format!("{}:{line}", p.display())];
    add(
        "utf8-line-2",
        lines_with(b"{\"image\": \"a.png\", \"caption\": \"caf\xe9 \xff\"}", 1),
        &[],
        &|p| vec![format!("{}:2", p.display()), "invalid UTF-8".into()],
    );
    add(
        "json-line-3",
        lines_with(b"{\"image\": \"a.png\", ", 2),
        &[],
        &at(3),
    );
    add(
        "caption-missing",
        lines_with(br#"{"image": "a.png"}"#, 1),
        &[],
        &|p| vec![format!("{}:2", p.display()), "caption".into()],
    );
    add(
        "caption-number",
        lines_with(br#"{"image": "a.png", "caption": 7}"#, 0),
        &[],
        &at(1),
    );
    add(
        "image-id-float",
        lines_with(br#"{"image": "a.png", "caption": "x", "image_id": 1.5}"#, 2),
        &[],
        &|p| vec![format!("{}:3", p.display()), "image_id".into()],
    );
    add(
        "image-file-missing",
        lines_with(br#"{"image": "nope.png", "caption": "x"}"#, 1),
        &[],
        &|p| vec![format!("{}:2", p.display()), "nope.png".into()],
    );
    add("not-an-object", lines_with(b"[1, 2, 3]", 1), &[], &at(2));
    // Paths from data stay under data.image_root: `../` out of it and an
    // absolute path are refused by file and line, though the files exist.
    add(
        "image-escapes-root",
        lines_with(br#"{"image": "../outside.png", "caption": "x"}"#, 1),
        &[],
        &|p| {
            vec![
                format!("{}:2", p.display()),
                "leads outside the image root".into(),
            ]
        },
    );
    let absolute = annotation_fixtures().dir.join("outside.png");
    add(
        "image-absolute",
        lines_with(
            format!(r#"{{"image": "{}", "caption": "x"}}"#, absolute.display()).as_bytes(),
            2,
        ),
        &[],
        &|p| vec![format!("{}:3", p.display()), "data.image_root".into()],
    );
    add("empty-file", Vec::new(), &[], &|p| {
        vec![p.display().to_string()]
    });
    add(
        "every-line-bad-skipped",
        b"\xff\xfe\n{\"image\": 3}\n".to_vec(),
        &["data.on_error=\"skip\""],
        &|p| vec![p.display().to_string(), "no image-caption pairs".into()],
    );
    let mut array = b"[".to_vec();
    array.extend_from_slice(GOOD[0].as_bytes());
    array.extend_from_slice(b",\n{\"image\": \"b.png\", \"caption\": \"\xc3\x28\"}]");
    let (case, path) = data_case("utf8-json-array", "utf8-json-array.json", &array, &[]);
    cases.push(case.names(&[&format!("{}:2", path.display()), "invalid UTF-8", "byte"]));
    let (case, path) = data_case(
        "json-array-broken",
        "json-array-broken.json",
        b"[{\"image\": ",
        &[],
    );
    cases.push(case.names_path(&path));
    let (case, _) = data_case("annotation-file-missing", "unused.jsonl", b"", &[]);
    let missing = root().join("annotations/no-such-file.jsonl");
    let mut case = case.status(1).names_path(&missing);
    for a in case.args.iter_mut() {
        if a.starts_with("data.annotations=") {
            *a = format!("data.annotations=\"{}\"", missing.display());
        }
    }
    cases.push(case);

    // Images: each file holds one good pair and one bad one, so the first
    // batch (of 2) decodes the bad image.
    for (name, image) in [
        ("image-garbage", "garbage.png"),
        ("image-empty", "empty.jpg"),
        ("image-bomb", "bomb.png"),
    ] {
        let bytes = format!(
            "{}\n{{\"image\": \"{image}\", \"caption\": \"a bad image\"}}\n",
            GOOD[0]
        );
        let (case, path) = data_case(name, &format!("{name}.jsonl"), bytes.as_bytes(), &[]);
        cases.push(case.names(&[image, &path.display().to_string()]));
    }
    check(cases);
}

#[test]
fn a_line_that_is_not_utf8_is_skipped_under_on_error_skip() {
    let mut bytes = lines_with(b"{\"image\": \"a.png\", \"caption\": \"\xff\"}", 1);
    bytes.extend_from_slice(GOOD[1].as_bytes());
    bytes.push(b'\n');
    let (case, path) = data_case(
        "utf8-skipped",
        "utf8-skipped.jsonl",
        &bytes,
        &["data.on_error=\"skip\""],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(&case.args)
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "warn")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:2", path.display())) && stderr.contains("invalid UTF-8"),
        "the warning names file and line: {stderr}"
    );
    assert!(stderr.contains("skipped 1 bad entries"), "{stderr}");
}

/// A sample's members: (extension, data).
type Members = Vec<(&'static str, Vec<u8>)>;

/// A shard of `samples` (key, members) under the shards directory.
fn shard(name: &str, samples: &[(&str, Members)]) -> PathBuf {
    let dir = root().join("shards");
    std::fs::create_dir_all(&dir).unwrap();
    let mut tar = Vec::new();
    for (key, members) in samples {
        for (ext, data) in members {
            tar_entry(&mut tar, &format!("{key}.{ext}"), data);
        }
    }
    tar_end(&mut tar);
    let path = dir.join(name);
    std::fs::write(&path, tar).unwrap();
    path
}

fn good_sample(i: u8) -> Members {
    vec![
        ("png", png(16, [i * 40, 0, 0])),
        ("txt", format!("sample {i}").into_bytes()),
    ]
}

fn shard_case(name: &str, path: &Path) -> Case {
    let pattern = format!("data.shards=\"{}\"", path.display());
    Case::train(
        name,
        &[
            "data.source=\"webdataset\"",
            &pattern,
            "train.batch_size=2",
            "train.steps=1",
        ],
    )
}

#[test]
fn bad_shards_name_the_shard_and_member() {
    let good = shard(
        "good.tar",
        &[("000", good_sample(1)), ("001", good_sample(2))],
    );
    let bytes = std::fs::read(&good).unwrap();

    let garbage = root().join("shards/garbage.tar");
    std::fs::write(&garbage, vec![0x5au8; 2048]).unwrap();
    let truncated = root().join("shards/truncated.tar");
    std::fs::write(&truncated, &bytes[..700]).unwrap();
    let mut bad_sum = bytes.clone();
    bad_sum[0] = b'X';
    let checksum = root().join("shards/checksum.tar");
    std::fs::write(&checksum, &bad_sum).unwrap();
    let no_caption = shard(
        "no-caption.tar",
        &[
            ("000", good_sample(1)),
            ("001", vec![("png", png(16, [1, 2, 3]))]),
        ],
    );
    let utf8 = shard(
        "utf8.tar",
        &[
            ("000", good_sample(1)),
            (
                "001",
                vec![("png", png(16, [1, 2, 3])), ("txt", b"caf\xe9".to_vec())],
            ),
        ],
    );
    let bad_json = shard(
        "bad-json.tar",
        &[
            ("000", good_sample(1)),
            (
                "001",
                vec![
                    ("png", png(16, [1, 2, 3])),
                    ("json", b"{\"caption\": ".to_vec()),
                ],
            ),
        ],
    );
    let bad_image = shard(
        "bad-image.tar",
        &[
            ("000", good_sample(1)),
            (
                "001",
                vec![("png", b"not a png".to_vec()), ("txt", b"x".to_vec())],
            ),
        ],
    );
    let no_image = shard(
        "no-image.tar",
        &[
            ("000", good_sample(1)),
            ("001", vec![("txt", b"x".to_vec())]),
        ],
    );
    let big_text = shard(
        "big-text.tar",
        &[
            ("000", good_sample(1)),
            (
                "001",
                vec![("png", png(16, [1, 2, 3])), ("txt", vec![b'a'; 300])],
            ),
        ],
    );
    let mut over_cap = shard_case("shard-member-over-cap", &big_text);
    over_cap
        .args
        .extend(["--set".into(), "data.max_text_bytes=100".into()]);
    let none = root().join("shards/none-{000..001}.tar");
    check(vec![
        shard_case("shard-garbage", &garbage).names_path(&garbage),
        shard_case("shard-truncated", &truncated)
            .names(&["truncated"])
            .names_path(&truncated),
        shard_case("shard-checksum", &checksum)
            .names(&["checksum"])
            .names_path(&checksum),
        shard_case("shard-no-caption", &no_caption)
            .names(&["`001`", "caption"])
            .names_path(&no_caption),
        shard_case("shard-utf8", &utf8)
            .names(&["001.txt", "UTF-8"])
            .names_path(&utf8),
        shard_case("shard-bad-json", &bad_json)
            .names(&["001.json"])
            .names_path(&bad_json),
        shard_case("shard-bad-image", &bad_image)
            .names(&["001.png"])
            .names_path(&bad_image),
        shard_case("shard-no-image", &no_image)
            .names(&["`001`", "image"])
            .names_path(&no_image),
        shard_case("shard-none-match", &none).names(&["data.shards"]),
        over_cap
            .names(&["001.txt", "data.max_text_bytes"])
            .names_path(&big_text),
    ]);
}

/// A trained micro run (2 steps, one checkpoint), copied to `name` for a
/// case to damage; returns the copy and its checkpoint file.
fn trained_copy(name: &str) -> (PathBuf, PathBuf) {
    static RUN: OnceLock<PathBuf> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        let dir = root().join("trained");
        let out = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
            .args(["train", "--quiet", "--config"])
            .arg(fixture("micro.toml"))
            .arg("--run-dir")
            .arg(&dir)
            .args([
                "--set",
                "train.steps=2",
                "--set",
                "eval.at_end=false",
                "--set",
                "data.synthetic.train_scenes=16",
                "--set",
                "data.synthetic.heldout_scenes=8",
            ])
            .env("RUST_LOG", "warn")
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    });
    let copy = root().join("checkpoints").join(name);
    let _ = std::fs::remove_dir_all(&copy);
    let mut stack = vec![(run.clone(), copy.clone())];
    while let Some((from, to)) = stack.pop() {
        std::fs::create_dir_all(&to).unwrap();
        for e in std::fs::read_dir(&from).unwrap().flatten() {
            let target = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                stack.push((e.path(), target));
            } else {
                std::fs::copy(e.path(), target).unwrap();
            }
        }
    }
    let latest = std::fs::read_to_string(copy.join("checkpoints/latest")).unwrap();
    let file = copy.join("checkpoints").join(latest.trim());
    (copy, file)
}

#[test]
fn bad_checkpoints_name_the_file() {
    let (garbage, file) = trained_copy("garbage");
    std::fs::write(&file, vec![0xabu8; 4096]).unwrap();
    let (truncated, file) = trained_copy("truncated");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let (empty, file) = trained_copy("empty");
    std::fs::write(&file, b"").unwrap();
    let (other, _) = trained_copy("other-config");
    let config = std::fs::read_to_string(other.join("config.toml")).unwrap();
    std::fs::write(
        other.join("config.toml"),
        config.replacen("hidden_size = 32", "hidden_size = 64", 1),
    )
    .unwrap();
    let (deeper, _) = trained_copy("deeper");
    let (no_checkpoint, _) = trained_copy("no-checkpoint");
    std::fs::remove_dir_all(no_checkpoint.join("checkpoints")).unwrap();
    let missing = root().join("checkpoints/no-such-run");
    let name = "step-00000002.safetensors";
    check(vec![
        Case::eval("checkpoint-garbage", &garbage, &[])
            .status_any_error()
            .names(&[name]),
        Case::eval("checkpoint-truncated", &truncated, &[])
            .status_any_error()
            .names(&[name]),
        Case::eval("checkpoint-empty", &empty, &[])
            .status_any_error()
            .names(&[name]),
        Case::eval("checkpoint-other-config", &other, &[])
            .status_any_error()
            .names(&[name, "shape"]),
        Case::eval(
            "checkpoint-other-depth",
            &deeper,
            &["--set", "model.text.num_hidden_layers=2"],
        )
        .status_any_error()
        .names(&[name]),
        Case::eval("checkpoint-none", &no_checkpoint, &[])
            .status_any_error()
            .names_path(&no_checkpoint),
        Case::eval("checkpoint-run-missing", &missing, &[])
            .status_any_error()
            .names_path(&missing),
    ]);
}

/// A `latest` naming a checkpoint that is not there is not fatal: `eval`,
/// like `--resume`, takes the newest intact checkpoint, with a warning
/// naming both files, and its result names the checkpoint it used.
#[test]
fn a_dangling_latest_falls_back_to_the_newest_intact_checkpoint() {
    let (dangling, _) = trained_copy("dangling-latest-eval");
    std::fs::write(
        dangling.join("checkpoints/latest"),
        "step-00000099.safetensors\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(["eval", "--quiet", "--task", "heldout", "--checkpoint"])
        .arg(&dangling)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("step-00000099.safetensors")
            && stderr.contains("step-00000002.safetensors"),
        "{stderr}"
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dangling.join("eval-heldout.json")).unwrap())
            .unwrap();
    assert_eq!(r["step"], 2, "{r}");
}

impl Case {
    /// A checkpoint error is a data error (2) or an I/O error (1), as the
    /// checkpoint reader words it; what matters is the file it names.
    fn status_any_error(mut self) -> Case {
        self.status = ANY_ERROR;
        self
    }
}

/// The path of a shared library this process has loaded from libtorch: a
/// real library that is not a vlmatch plugin.
fn libtorch_library() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("libc10.so"))
        .map(PathBuf::from)
        .expect("libc10.so is loaded (the tests link libtorch)")
}

#[test]
fn bad_plugin_libraries_and_panics() {
    let dir = root().join("plugins");
    std::fs::create_dir_all(dir.join("a-directory.so")).unwrap();
    let text = dir.join("notes.so");
    std::fs::write(&text, "not a shared library\n").unwrap();
    let empty = dir.join("empty.so");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.join("missing.so");
    let lib = libtorch_library();
    let plugin = |name: &str, path: &Path| {
        Case::train(name, &[&format!("plugins.paths=[\"{}\"]", path.display())]).names_path(path)
    };
    let mut cases = vec![
        plugin("plugin-missing", &missing).names(&["no such file"]),
        plugin("plugin-directory", &dir.join("a-directory.so")),
        plugin("plugin-text-file", &text).names(&["cannot load it as a shared library"]),
        plugin("plugin-empty-file", &empty),
        plugin("plugin-not-vlmatch", &lib).names(&["vlmatch_plugin_table"]),
    ];
    // The panic points exist only in builds with the fault-injection
    // feature (`cargo xtask test`).
    if cfg!(feature = "fault-injection") {
        cases.extend([
            Case::train("panic-main-thread", NO_SETS)
                .env("VLMATCH_TEST_PANIC", "cli")
                .status(70)
                .names(&["internal error", "RUST_BACKTRACE=1"]),
            Case::train("panic-loader-thread", NO_SETS)
                .env("VLMATCH_TEST_PANIC", "loader")
                .status(70)
                .names(&["internal error", "vlmatch-loader"]),
        ]);
    }
    check(cases);
}
