//! Bad input gives one line that names the key or file and what to fix:
//! no panic, no backtrace, exit status 2.

mod common;
use common::*;
use std::process::Command;

/// Run the CLI from the project root; returns (status code, stderr).
fn vlmatch(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(args)
        .envs(env.iter().copied())
        .env_remove("RUST_LOG")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn one_line_error(args: &[&str], env: &[(&str, &str)]) -> String {
    let (code, stderr) = vlmatch(args, env);
    assert_eq!(code, 2, "exit status for {args:?}; stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked"),
        "panic for {args:?}:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.trim().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line for {args:?}, got:\n{stderr}"
    );
    assert!(lines[0].starts_with("error: "), "{stderr}");
    lines[0].to_string()
}

#[test]
fn typo_in_a_typed_key_names_key_and_layer() {
    let e = one_line_error(&["train", "--set", "train.stpes=5"], &[]);
    assert!(e.contains("config key `train.stpes`"), "{e}");
    assert!(e.contains("--set train.stpes"), "{e}");
    assert!(
        e.contains("unknown key `stpes` (did you mean `steps`?)"),
        "{e}"
    );
    assert!(e.contains("`steps`"), "lists the expected keys: {e}");
}

#[test]
fn typo_in_a_plugin_key_names_key_and_file() {
    let dir = scratch("typo-file");
    let file = dir.join("typo.toml");
    std::fs::write(&file, "[model.image]\nlayrs = 3\n").unwrap();
    let e = one_line_error(&["train", "--config", file.to_str().unwrap()], &[]);
    assert!(e.contains("config key `model.image.layrs`"), "{e}");
    assert!(e.contains(file.to_str().unwrap()), "names the file: {e}");
    assert!(e.contains("unknown key `layrs`"), "{e}");
    assert!(
        e.contains("num_hidden_layers"),
        "lists the expected keys: {e}"
    );
}

#[test]
fn typo_in_an_environment_variable_names_the_variable() {
    let e = one_line_error(&["train"], &[("VLMATCH_TRAIN__STPES", "3")]);
    assert!(e.contains("train.stpes"), "{e}");
    assert!(e.contains("VLMATCH_TRAIN__STPES"), "{e}");
}

#[test]
fn wrong_value_type_names_key_and_expected_type() {
    let e = one_line_error(&["train", "--set", "train.steps=\"ten\""], &[]);
    assert!(e.contains("config key `train.steps`"), "{e}");
    assert!(e.contains("invalid type"), "{e}");
    assert!(e.contains("string \"ten\""), "{e}");

    let e = one_line_error(&["train", "--set", "model.image.hidden_size=1.5"], &[]);
    assert!(e.contains("config key `model.image.hidden_size`"), "{e}");
    assert!(e.contains("invalid type"), "{e}");
}

#[test]
fn unknown_plugin_lists_registered_names() {
    let e = one_line_error(&["train", "--set", "model.image.plugin=vitt"], &[]);
    assert!(e.contains("`model.image.plugin`"), "{e}");
    assert!(e.contains("unknown encoder plugin `vitt`"), "{e}");
    assert!(
        e.contains("bert, clip_vit, co_attention, cross_attention, roberta, vit"),
        "{e}"
    );

    let e = one_line_error(
        &["train", "--set", "samplers.hard_negative.plugin=hardest"],
        &[],
    );
    assert!(
        e.contains("unknown negative_sampler plugin `hardest`"),
        "{e}"
    );
    assert!(e.contains("hard_negative"), "{e}");
}

#[test]
fn missing_image_file_names_annotation_line_and_path() {
    let dir = scratch("missing-image");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    image::RgbImage::new(8, 8)
        .save(dir.join("images/a.png"))
        .unwrap();
    let ann = dir.join("train.jsonl");
    std::fs::write(
        &ann,
        "{\"image\": \"a.png\", \"caption\": \"a red circle\"}\n{\"image\": \"b.png\", \"caption\": \"a blue square\"}\n",
    )
    .unwrap();
    let ann_s = format!("data.annotations=\"{}\"", ann.display());
    let root_s = format!("data.image_root=\"{}\"", dir.join("images").display());
    let e = one_line_error(
        &[
            "train",
            "--set",
            "data.source=\"annotations\"",
            "--set",
            &ann_s,
            "--set",
            &root_s,
        ],
        &[],
    );
    assert!(
        e.contains(&format!("{}:2", ann.display())),
        "names file and line: {e}"
    );
    assert!(e.contains("b.png not found"), "{e}");
    assert!(e.contains("data.image_root"), "says what to check: {e}");
}

#[test]
fn broken_toml_and_bad_set_syntax_are_reported() {
    let dir = scratch("broken-toml");
    let file = dir.join("broken.toml");
    std::fs::write(&file, "[train\nsteps = 3\n").unwrap();
    let e = one_line_error(&["train", "--config", file.to_str().unwrap()], &[]);
    assert!(e.contains("broken.toml line 1: invalid TOML"), "{e}");

    let e = one_line_error(&["train", "--set", "train.steps"], &[]);
    assert!(e.contains("expected `dotted.key=value`"), "{e}");
}

#[test]
fn unknown_preset_lists_presets() {
    let e = one_line_error(&["train", "--preset", "huge"], &[]);
    assert!(
        e.contains("unknown preset `huge`") && e.contains("tiny, base"),
        "{e}"
    );
}
