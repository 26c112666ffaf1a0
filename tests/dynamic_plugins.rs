//! Dynamic plugins: a `cdylib` loaded from `plugins.paths` at run time, its
//! sampler used by FG-ITM from config alone; a library built for another
//! vlmatch, a missing file, a non-plugin library and a name clash refused.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vlmatch_registry::{Kind, Registry};

/// An example library, (re)built now: `cargo test` does not produce a
/// `cdylib` of a workspace member by itself.
fn library(package: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let file = root
        .join("target/debug")
        .join(format!("lib{}.so", package.replace('-', "_")));
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", package])
        .current_dir(root)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building {package} failed");
    assert!(file.is_file(), "{} was not built", file.display());
    file
}

#[test]
fn a_dynamic_sampler_loads_and_trains_from_config() {
    let lib = library("vlmatch-dyn-sampler");
    let mut registry = Registry::from_inventory().unwrap();
    assert_eq!(registry.load_library(&lib).unwrap(), ["color_flip"]);
    let entry = registry
        .get(Kind::NegativeSampler, "color_flip", "test")
        .unwrap();
    assert_eq!(entry.origin, format!("library {}", lib.display()));
    let listing = vlmatch::commands::plugins::plugin_listing(std::slice::from_ref(&lib)).unwrap();
    assert!(
        listing.contains(&format!("color_flip           library {}", lib.display())),
        "{listing}"
    );

    let dir = scratch("dynamic-train");
    let paths = format!("plugins.paths=[\"{}\"]", lib.display());
    let s = run(
        &dir,
        &[
            &paths,
            "objectives.itm.samplers=[\"hard_negative\", \"color_flip\"]",
            "samplers.color_flip.plugin=\"color_flip\"",
            "train.steps=5",
            "eval.at_end=false",
        ],
        None,
    )
    .unwrap();
    assert_eq!(s.last_step, 5);
    assert!(
        s.logged[4]["itm_acc_color_flip"].is_number(),
        "{:?}",
        s.logged[4]
    );
}

#[test]
fn mismatched_missing_foreign_and_clashing_libraries_are_refused() {
    let mut registry = Registry::from_inventory().unwrap();
    let bad = library("vlmatch-dyn-sampler-mismatched");
    let err = registry.load_library(&bad).unwrap_err().to_string();
    assert!(err.contains(&bad.display().to_string()), "{err}");
    assert!(
        err.contains("built with vlmatch `0.0.0-other`")
            && err.contains(&format!(
                "uses vlmatch `{}`",
                vlmatch_registry::dynamic::VLMATCH_VERSION
            )),
        "names both versions: {err}"
    );

    let err = registry
        .load_library(Path::new("no/such/libplugin.so"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no such file") && err.contains("plugins.paths"),
        "{err}"
    );

    // A real shared library that is not a vlmatch plugin: libtorch's own.
    let torch = Path::new(env!("CARGO_MANIFEST_DIR")).join(".vlmatch/libtorch/lib/libc10.so");
    if torch.is_file() {
        let err = registry.load_library(&torch).unwrap_err().to_string();
        assert!(err.contains("not a vlmatch plugin"), "{err}");
    }
    let err = registry
        .load_library(&fixture("micro.toml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("cannot load it as a shared library"), "{err}");

    let good = library("vlmatch-dyn-sampler");
    registry.load_library(&good).unwrap();
    let err = registry.load_library(&good).unwrap_err().to_string();
    assert!(err.contains("`color_flip` is registered twice"), "{err}");
}

/// A run directory's config never loads code by itself: a downloaded run
/// whose `config.toml` names a library (here one whose initialiser writes a
/// marker file, as any shared library may on being opened) is refused by
/// `eval` and `train --resume` with a message naming the library and
/// `--plugin`, and the library is not opened; given with `--plugin`, it is
/// loaded (from its canonical path).
#[test]
fn a_run_directory_naming_a_library_does_not_load_it() {
    let root = scratch("dynamic-run-dir");
    let marker = root.join("marker");
    let source = root.join("marker.c");
    std::fs::write(
        &source,
        format!(
            "#include <stdio.h>\n__attribute__((constructor)) static void mark(void) {{ \
             FILE *f = fopen(\"{}\", \"w\"); if (f) fclose(f); }}\n",
            marker.display()
        ),
    )
    .unwrap();
    let lib = root.join("libmarker.so");
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&source)
        .status()
        .expect("cc runs");
    assert!(cc.success());
    let run_dir = root.join("run");
    copy_dir(&fixture("runs-46fa8e6/plain"), &run_dir);
    let config = run_dir.join("config.toml");
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "[plugins]\npaths = []",
        &format!("[plugins]\npaths = [\"{}\"]", lib.display()),
    );
    std::fs::write(&config, text).unwrap();
    let vlmatch = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_vlmatch"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    };
    let dir = run_dir.display().to_string();
    for args in [
        vec!["eval", "--quiet", "--task", "heldout", "--checkpoint", &dir],
        vec!["train", "--quiet", "--resume", &dir],
        vec![
            "export",
            "--checkpoint",
            &dir,
            "--out",
            "/nonexistent/export",
        ],
    ] {
        let o = vlmatch(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{args:?}");
        assert!(
            err.contains("never loads code by itself")
                && err.contains("--plugin PATH")
                && err.contains(&lib.display().to_string()),
            "{args:?}: {err}"
        );
        assert!(!marker.exists(), "{args:?} opened the library");
    }
    // Given on the command line, it is opened (and then refused as no
    // vlmatch plugin: it has no table).
    let lib_arg = lib.display().to_string();
    let o = vlmatch(&[
        "eval",
        "--quiet",
        "--task",
        "heldout",
        "--checkpoint",
        &dir,
        "--plugin",
        &lib_arg,
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("not a vlmatch plugin"), "{err}");
    assert!(marker.exists(), "--plugin loads the library");
}
