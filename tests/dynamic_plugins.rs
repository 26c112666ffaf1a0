//! Dynamic plugins: a `cdylib` loaded from `plugins.paths` at run time, its
//! sampler used by FG-ITM from config alone; a library built for another
//! vlmatch, a missing file, a non-plugin library and a name clash refused;
//! the boundary: a panicking sampler, a null table, a null function.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vlmatch_registry::dynamic::DynamicSamplerInstance;
use vlmatch_registry::{Factory, Kind, Registry};

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

/// A shared library compiled now by `cc` from `source` (C).
fn c_library(dir: &Path, name: &str, source: &str) -> PathBuf {
    let file = dir.join(format!("{name}.c"));
    std::fs::write(&file, source).unwrap();
    let lib = dir.join(format!("lib{name}.so"));
    let cc = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&lib)
        .arg(&file)
        .status()
        .expect("cc runs");
    assert!(cc.success(), "compiling {name}.c failed");
    lib
}

/// The C declaration of the plugin table (ABI 2) and a table named `table`
/// with this vlmatch's versions and `n` samplers at `samplers`.
fn c_table(n: usize, samplers: &str) -> String {
    use vlmatch_registry::dynamic::{ABI_VERSION, RUSTC_VERSION, TCH_VERSION, VLMATCH_VERSION};
    format!(
        "#include <stddef.h>\n#include <stdint.h>\n\
         typedef struct {{ const char *name; void *create; void *sample; void *free_string; void *destroy; }} VTable;\n\
         typedef struct {{ uint32_t abi; const char *rustc; const char *vlmatch; const char *tch; size_t n; const VTable *samplers; }} Table;\n\
         static void *create(const char *json, char **error) {{ return 0; }}\n\
         static uint32_t free_string(char *p) {{ return 0; }}\n\
         static char *destroy(void *state) {{ return 0; }}\n\
         static char *sample(void *s, const char **c, size_t n, uint64_t seed, char **out) {{ return 0; }}\n\
         {samplers}\n\
         static const Table table = {{ {ABI_VERSION}, \"{RUSTC_VERSION}\", \"{VLMATCH_VERSION}\", \"{TCH_VERSION}\", {n}, {array} }};\n",
        array = if n == 0 { "0" } else { "vtables" },
    )
}

/// A sampler that panics, in `create` or in `sample`, is an error naming the
/// sampler, the call, the library and the panic's message: from the
/// registry, and from a training run, which stops with an error line (exit
/// status 1), not an abort.
#[test]
fn a_panicking_plugin_is_an_error_naming_it_and_the_call() {
    let lib = library("vlmatch-dyn-sampler-faulty");
    let mut registry = Registry::from_inventory().unwrap();
    assert_eq!(registry.load_library(&lib).unwrap(), ["panicky"]);
    let Factory::DynamicSampler(spec) = registry
        .get(Kind::NegativeSampler, "panicky", "test")
        .unwrap()
        .factory
    else {
        panic!("a dynamic sampler")
    };
    let canonical = lib.canonicalize().unwrap().display().to_string();
    let err = match DynamicSamplerInstance::new(spec, r#"{"panic_in": "create"}"#, "panicky") {
        Ok(_) => panic!("created"),
        Err(e) => e.to_string(),
    };
    for part in [
        "plugin `panicky`",
        "`create` failed",
        canonical.as_str(),
        "panicked: panicky was told to panic in create",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    let instance = DynamicSamplerInstance::new(spec, "{}", "panicky").unwrap();
    let err = instance
        .negatives(&["a red circle".to_string()], 7)
        .unwrap_err()
        .to_string();
    for part in [
        "plugin `panicky`",
        "`sample` failed",
        "panicked: panicky cannot negate \"a red circle\"",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    // The instance is still usable after the caught panic, and dropping it
    // (its `destroy`) is clean.
    assert!(instance.negatives(&[], 0).unwrap().is_empty());
    drop(instance);

    let dir = scratch("dynamic-panicky");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vlmatch"))
        .args(["train", "--quiet", "--config"])
        .arg(fixture("micro.toml"))
        .arg("--plugin")
        .arg(&lib)
        .args([
            "--set",
            "objectives.itm.samplers=[\"hard_negative\", \"panicky\"]",
            "--set",
            "samplers.panicky.plugin=\"panicky\"",
            "--set",
            "train.steps=2",
            "--set",
            "eval.at_end=false",
            "--run-dir",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("error:"))
        .unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(
        line.contains("plugin `panicky`")
            && line.contains("`sample` failed")
            && line.contains("panicked"),
        "{line}"
    );
}

/// A library whose entry returns a null table, one whose sampler has a null
/// function, and one whose sampler array is null are refused when loaded,
/// with errors naming the library (and the sampler and the function).
#[test]
fn a_null_table_and_a_null_function_are_refused_naming_the_plugin() {
    let dir = scratch("dynamic-null");
    let null_table = c_library(
        &dir,
        "nulltable",
        "const void *vlmatch_plugin_table(void) { return 0; }\n",
    );
    let mut registry = Registry::from_inventory().unwrap();
    let err = registry.load_library(&null_table).unwrap_err().to_string();
    let canonical = |p: &Path| p.canonicalize().unwrap().display().to_string();
    assert!(
        err.contains(&canonical(&null_table)) && err.contains("its plugin table is null"),
        "{err}"
    );

    for (field, vtable) in [
        ("create", "{ \"nullfn\", 0, sample, free_string, destroy }"),
        ("sample", "{ \"nullfn\", create, 0, free_string, destroy }"),
        ("free_string", "{ \"nullfn\", create, sample, 0, destroy }"),
        ("destroy", "{ \"nullfn\", create, sample, free_string, 0 }"),
    ] {
        let source = c_table(
            1,
            &format!("static const VTable vtables[] = {{ {vtable} }};"),
        ) + "const Table *vlmatch_plugin_table(void) { return &table; }\n";
        let lib = c_library(&dir, &format!("null{}", field.replace('_', "")), &source);
        let err = registry.load_library(&lib).unwrap_err().to_string();
        assert!(
            err.contains(&canonical(&lib))
                && err.contains(&format!("sampler `nullfn`: its `{field}` function is null")),
            "{field}: {err}"
        );
        assert!(registry
            .get(Kind::NegativeSampler, "nullfn", "test")
            .is_err());
    }

    let source = c_table(0, "").replace(", 0, 0 };", ", 3, 0 };")
        + "const Table *vlmatch_plugin_table(void) { return &table; }\n";
    let lib = c_library(&dir, "nullarray", &source);
    let err = registry.load_library(&lib).unwrap_err().to_string();
    assert!(
        err.contains("promises 3 samplers but their array is null"),
        "{err}"
    );
}

/// The library opened is the canonical file that was checked: given
/// through a symbolic link, the registered origin is the link's target.
#[test]
fn the_library_opened_is_the_canonical_file() {
    let lib = library("vlmatch-dyn-sampler");
    let dir = scratch("dynamic-link");
    let link = dir.join("libcolor.so");
    std::os::unix::fs::symlink(&lib, &link).unwrap();
    let mut registry = Registry::from_inventory().unwrap();
    assert_eq!(registry.load_library(&link).unwrap(), ["color_flip"]);
    let entry = registry
        .get(Kind::NegativeSampler, "color_flip", "test")
        .unwrap();
    assert_eq!(
        entry.origin,
        format!("library {}", lib.canonicalize().unwrap().display())
    );
}
