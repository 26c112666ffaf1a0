//! Dynamic plugins: a `cdylib` loaded from `plugins.paths` at run time, its
//! sampler used by FG-ITM from config alone; a library built for another
//! vlmatch, a missing file, a non-plugin library and a name clash refused;
//! the boundary: a panicking sampler, a null table, a null function. ABI 5:
//! an encoder, objectives, a generator, a discriminator and a hook from a
//! library train; each version field of the handshake refused; a panicking
//! encoder and a failing tch call in an objective or a hook are errors
//! naming the plugin; null functions of every kind.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use vlmatch_registry::dynamic::DynamicSamplerInstance;
use vlmatch_registry::{Factory, Kind, Registry};

/// The example plugin libraries, built once per test binary in one cargo
/// call (`cargo test` does not produce a `cdylib` of a workspace member by
/// itself), with the workspace's target directory and lock file.
const LIBRARIES: [&str; 4] = [
    "vlmatch-dyn-sampler",
    "vlmatch-dyn-sampler-mismatched",
    "vlmatch-dyn-sampler-faulty",
    "vlmatch-dyn-siglip",
];

/// Example library `package`, built (once) now.
fn library(package: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    BUILT.get_or_init(|| {
        let mut cargo = std::process::Command::new(env!("CARGO"));
        cargo.args(["build", "--quiet", "--locked"]);
        for p in LIBRARIES {
            cargo.args(["-p", p]);
        }
        let status = cargo.current_dir(root).status().expect("cargo runs");
        assert!(status.success(), "building the example libraries failed");
    });
    assert!(LIBRARIES.contains(&package), "{package} is not built here");
    let file = root
        .join("target/debug")
        .join(format!("lib{}.so", package.replace('-', "_")));
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

/// The C declarations of the plugin table (ABI 5), stub functions, and a
/// table named `table` with `fields` after the ABI version, the versions
/// and `free_string` (see [`versions`]).
fn c_table(
    abi: u32,
    versions: [String; 4],
    free_string: &str,
    decls: &str,
    fields: &str,
) -> String {
    let [rustc, vlmatch, tch, libtorch] = versions;
    format!(
        "#include <stddef.h>\n#include <stdint.h>\n\
         typedef struct {{ const char *name; void *create; void *sample; void *free_string; void *destroy; }} VTable;\n\
         typedef struct {{ const void *data; const char *model_types; const char *architectures; void *call; }} Layout;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *forward; void *word_embeddings; void *destroy; const Layout *layout; }} EncoderVTable;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *forward; void *destroy; }} ObjectiveVTable;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *sample; void *destroy; }} NegativeSamplerVTable;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *logits; void *fill; void *destroy; const Layout *layout; }} GeneratorVTable;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *logits; void *destroy; }} DiscriminatorVTable;\n\
         typedef struct {{ const char *name; const void *data; void *create; void *call; void *after_objectives; void *destroy; }} HookVTable;\n\
         typedef struct {{ uint32_t abi; const char *rustc; const char *vlmatch; const char *tch; const char *libtorch; void *free_string;\n\
           size_t n_samplers; const VTable *samplers; size_t n_encoders; const EncoderVTable *encoders;\n\
           size_t n_objectives; const ObjectiveVTable *objectives;\n\
           size_t n_negative_samplers; const NegativeSamplerVTable *negative_samplers;\n\
           size_t n_generators; const GeneratorVTable *generators;\n\
           size_t n_discriminators; const DiscriminatorVTable *discriminators;\n\
           size_t n_hooks; const HookVTable *hooks; }} Table;\n\
         static void *create(const char *json, char **error) {{ return 0; }}\n\
         static uint32_t free_string(char *p) {{ return 0; }}\n\
         static char *destroy(void *state) {{ return 0; }}\n\
         static char *sample(void *s, const char **c, size_t n, uint64_t seed, char **out) {{ return 0; }}\n\
         static char *stub(void) {{ return 0; }}\n\
         {decls}\n\
         static const Table table = {{ {abi}, \"{rustc}\", \"{vlmatch}\", \"{tch}\", \"{libtorch}\", {free_string}, {fields} }};\n\
         const Table *vlmatch_plugin_table(void) {{ return &table; }}\n",
    )
}

/// This vlmatch's rustc, vlmatch, tch and libtorch versions.
fn versions() -> [String; 4] {
    use vlmatch_registry::dynamic::{
        LIBTORCH_VERSION, RUSTC_VERSION, TCH_VERSION, VLMATCH_VERSION,
    };
    [
        RUSTC_VERSION,
        VLMATCH_VERSION,
        TCH_VERSION,
        LIBTORCH_VERSION,
    ]
    .map(String::from)
}

/// A sampler that panics, in `create` or in `sample`, is an error naming the
/// sampler, the call, the library and the panic's message: from the
/// registry, and from a training run, which stops with an error line (exit
/// status 1), not an abort.
#[test]
fn a_panicking_plugin_is_an_error_naming_it_and_the_call() {
    let lib = library("vlmatch-dyn-sampler-faulty");
    let mut registry = Registry::from_inventory().unwrap();
    assert_eq!(
        registry.load_library(&lib).unwrap(),
        [
            "panicky",
            "panicky_stem",
            "bad_matmul",
            "reads_itc_logits",
            "faulty_hook"
        ]
    );
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

    let abi = vlmatch_registry::dynamic::ABI_VERSION;
    let cases = [
        (
            "sampler",
            "create",
            "{ \"nullfn\", 0, sample, free_string, destroy }",
        ),
        (
            "sampler",
            "sample",
            "{ \"nullfn\", create, 0, free_string, destroy }",
        ),
        (
            "sampler",
            "free_string",
            "{ \"nullfn\", create, sample, 0, destroy }",
        ),
        (
            "sampler",
            "destroy",
            "{ \"nullfn\", create, sample, free_string, 0 }",
        ),
        (
            "encoder",
            "create",
            "{ \"nullfn\", 0, 0, stub, stub, stub }",
        ),
        (
            "encoder",
            "forward",
            "{ \"nullfn\", 0, stub, 0, stub, stub }",
        ),
        (
            "encoder",
            "word_embeddings",
            "{ \"nullfn\", 0, stub, stub, 0, stub }",
        ),
        (
            "encoder",
            "destroy",
            "{ \"nullfn\", 0, stub, stub, stub, 0 }",
        ),
        ("objective", "create", "{ \"nullfn\", 0, 0, stub, stub }"),
        ("objective", "forward", "{ \"nullfn\", 0, stub, 0, stub }"),
        ("objective", "destroy", "{ \"nullfn\", 0, stub, stub, 0 }"),
        (
            "negative sampler",
            "create",
            "{ \"nullfn\", 0, 0, stub, stub }",
        ),
        (
            "negative sampler",
            "sample",
            "{ \"nullfn\", 0, stub, 0, stub }",
        ),
        (
            "negative sampler",
            "destroy",
            "{ \"nullfn\", 0, stub, stub, 0 }",
        ),
        (
            "generator",
            "create",
            "{ \"nullfn\", 0, 0, stub, stub, stub }",
        ),
        (
            "generator",
            "logits",
            "{ \"nullfn\", 0, stub, 0, stub, stub }",
        ),
        (
            "generator",
            "fill",
            "{ \"nullfn\", 0, stub, stub, 0, stub }",
        ),
        (
            "generator",
            "destroy",
            "{ \"nullfn\", 0, stub, stub, stub, 0 }",
        ),
        (
            "discriminator",
            "create",
            "{ \"nullfn\", 0, 0, stub, stub }",
        ),
        (
            "discriminator",
            "logits",
            "{ \"nullfn\", 0, stub, 0, stub }",
        ),
        (
            "discriminator",
            "destroy",
            "{ \"nullfn\", 0, stub, stub, 0 }",
        ),
        ("hook", "create", "{ \"nullfn\", 0, 0, stub, stub, stub }"),
        ("hook", "call", "{ \"nullfn\", 0, stub, 0, stub, stub }"),
        (
            "hook",
            "after_objectives",
            "{ \"nullfn\", 0, stub, stub, 0, stub }",
        ),
        ("hook", "destroy", "{ \"nullfn\", 0, stub, stub, stub, 0 }"),
        (
            "encoder",
            "layout.call",
            "{ \"nullfn\", 0, stub, stub, stub, stub, &layout }",
        ),
    ];
    for (kind, field, vtable) in cases {
        let (ty, fields) = match kind {
            "sampler" => ("VTable", "1, vtables, 0, 0, 0, 0"),
            "encoder" => ("EncoderVTable", "0, 0, 1, vtables, 0, 0"),
            "objective" => ("ObjectiveVTable", "0, 0, 0, 0, 1, vtables"),
            "generator" => ("GeneratorVTable", "0, 0, 0, 0, 0, 0, 0, 0, 1, vtables"),
            "discriminator" => (
                "DiscriminatorVTable",
                "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, vtables",
            ),
            "hook" => (
                "HookVTable",
                "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, vtables",
            ),
            _ => ("NegativeSamplerVTable", "0, 0, 0, 0, 0, 0, 1, vtables"),
        };
        let layout = "static const Layout layout = { 0, \"[]\", \"[]\", 0 };";
        let decls = format!("{layout}\nstatic const {ty} vtables[] = {{ {vtable} }};");
        let source = c_table(abi, versions(), "free_string", &decls, fields);
        let name = format!("null{}{}", kind.replace(' ', ""), field.replace('_', ""));
        let lib = c_library(&dir, &name, &source);
        let err = registry.load_library(&lib).unwrap_err().to_string();
        assert!(
            err.contains(&canonical(&lib))
                && err.contains(&format!("{kind} `nullfn`: its `{field}` function is null")),
            "{kind} {field}: {err}"
        );
        assert!(registry.entries().all(|e| e.name != "nullfn"));
    }

    let decls =
        "static const EncoderVTable vtables[] = { { \"enc\", 0, stub, stub, stub, stub } };";
    let source = c_table(abi, versions(), "0", decls, "0, 0, 1, vtables, 0, 0");
    let lib = c_library(&dir, "nullfree", &source);
    let err = registry.load_library(&lib).unwrap_err().to_string();
    assert!(
        err.contains("its table's `free_string` function is null"),
        "{err}"
    );

    for (what, fields) in [
        ("3 samplers", "3, 0, 0, 0, 0, 0"),
        ("2 encoders", "0, 0, 2, 0, 0, 0"),
        ("4 objectives", "0, 0, 0, 0, 4, 0"),
        ("5 negative samplers", "0, 0, 0, 0, 0, 0, 5, 0"),
        ("6 generators", "0, 0, 0, 0, 0, 0, 0, 0, 6, 0"),
        ("7 discriminators", "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7, 0"),
        ("8 hooks", "0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0"),
    ] {
        let source = c_table(abi, versions(), "free_string", "", fields);
        let lib = c_library(&dir, &format!("nullarray{}", &what[..1]), &source);
        let err = registry.load_library(&lib).unwrap_err().to_string();
        assert!(
            err.contains(&format!("promises {what} but their array is null")),
            "{err}"
        );
    }
}

/// The handshake refuses a library built for another ABI (an ABI-2 sampler
/// library: rebuild it) or with another rustc, vlmatch, tch or libtorch,
/// naming both sides' versions, before calling anything of it.
#[test]
fn each_mismatched_version_is_refused_naming_both_sides() {
    use vlmatch_registry::dynamic::ABI_VERSION;
    let dir = scratch("dynamic-versions");
    let mut registry = Registry::from_inventory().unwrap();
    let decls =
        "static const EncoderVTable vtables[] = { { \"enc\", 0, stub, stub, stub, stub } };";
    let fields = "0, 0, 1, vtables, 0, 0";
    let lib = c_library(
        &dir,
        "abi2",
        &c_table(2, versions(), "free_string", decls, fields),
    );
    let err = registry.load_library(&lib).unwrap_err().to_string();
    assert!(
        err.contains(&format!(
            "built for plugin ABI 2, but this vlmatch speaks plugin ABI {ABI_VERSION}; rebuild the plugin"
        )),
        "{err}"
    );
    for (i, what) in ["rustc", "vlmatch", "tch", "libtorch"]
        .into_iter()
        .enumerate()
    {
        let mut theirs = versions();
        let ours = theirs[i].clone();
        theirs[i] = format!("9.9.9-other-{what}");
        let source = c_table(ABI_VERSION, theirs, "free_string", decls, fields);
        let lib = c_library(&dir, &format!("other{what}"), &source);
        let err = registry.load_library(&lib).unwrap_err().to_string();
        assert!(
            err.contains(&lib.canonicalize().unwrap().display().to_string())
                && err.contains(&format!("built with {what} `9.9.9-other-{what}`"))
                && err.contains(&format!("this vlmatch uses {what} `{ours}`")),
            "{what}: {err}"
        );
        assert!(registry.get(Kind::Encoder, "enc", "test").is_err());
    }
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

/// A training run over micro with the example library's config on top and
/// its library in `plugins.paths`, plus `sets`.
fn run_with_library(
    dir: &Path,
    libs: &[&Path],
    sets: &[&str],
) -> vlmatch_core::Result<Vec<serde_json::Map<String, serde_json::Value>>> {
    let mut layers = micro_layers(sets);
    layers.files.push(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/examples/dyn-siglip/dyn-siglip.toml"),
    );
    let paths: Vec<String> = libs
        .iter()
        .map(|l| format!("\"{}\"", l.display()))
        .collect();
    layers
        .sets
        .push(format!("plugins.paths=[{}]", paths.join(", ")));
    let summary = train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(dir.to_path_buf()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })?;
    Ok(summary.logged)
}

/// ABI 5's kinds: an encoder, objectives, a negative sampler (the core
/// trait, used by ITM), a generator (MLM's head, tied to the host's word
/// embeddings), a discriminator (ITM's head) and a hook come from a library, are
/// listed with it as their origin, are picked by name in the config
/// (`model.image.plugin`, `objectives.<name>.plugin`, ...) and train: the
/// objective's loss is logged at every step and its own parameter (the
/// learnt scale, created in the library) is optimised by the host.
#[test]
fn an_encoder_and_an_objective_from_a_library_train() {
    let lib = library("vlmatch-dyn-siglip");
    let mut registry = Registry::from_inventory().unwrap();
    assert_eq!(
        registry.load_library(&lib).unwrap(),
        [
            "conv_stem",
            "pair_match",
            "sigmoid_pairs",
            "next_caption",
            "tied_decoder",
            "mlp_heads",
            "loss_ema"
        ]
    );
    let origin = format!("library {}", lib.canonicalize().unwrap().display());
    for (kind, name) in [
        (Kind::Generator, "tied_decoder"),
        (Kind::Discriminator, "mlp_heads"),
        (Kind::Hook, "loss_ema"),
    ] {
        assert_eq!(registry.get(kind, name, "t").unwrap().origin, origin);
    }
    assert_eq!(
        registry
            .get(Kind::Encoder, "conv_stem", "t")
            .unwrap()
            .origin,
        origin
    );
    assert_eq!(
        registry
            .get(Kind::Objective, "sigmoid_pairs", "t")
            .unwrap()
            .origin,
        origin
    );
    assert_eq!(
        registry
            .get(Kind::NegativeSampler, "next_caption", "t")
            .unwrap()
            .origin,
        origin
    );
    let listing = vlmatch::commands::plugins::plugin_listing(std::slice::from_ref(&lib)).unwrap();
    let (encoders, objectives) = listing.split_once("objective:").unwrap();
    assert!(
        encoders.contains(&format!("next_caption         {origin}")),
        "{listing}"
    );
    assert!(
        encoders.contains(&format!("conv_stem            {origin}")),
        "{listing}"
    );
    assert!(
        objectives.contains(&format!("sigmoid_pairs        {origin}")),
        "{listing}"
    );

    let logged = run_with_library(
        &scratch("dynamic-kinds"),
        &[&lib],
        &["train.steps=4", "eval.at_end=false"],
    )
    .unwrap();
    assert_eq!(logged.len(), 4);
    for m in &logged {
        assert!(m["sigmoid"].as_f64().is_some_and(f64::is_finite), "{m:?}");
        assert!(m["pair"].as_f64().is_some_and(f64::is_finite), "{m:?}");
        assert!(m["itm_acc_next_caption"].is_number(), "{m:?}");
        assert!(m["mlm"].as_f64().is_some_and(f64::is_finite), "{m:?}");
    }
    let scale =
        |m: &serde_json::Map<String, serde_json::Value>| m["sigmoid_scale"].as_f64().unwrap();
    assert_eq!(scale(&logged[0]), 10.0, "the configured initial scale");
    assert_ne!(
        scale(&logged[3]),
        scale(&logged[0]),
        "the library's parameter is optimised"
    );
}

/// Momentum distillation builds its momentum model with the library's
/// encoder too (the run's registry, libraries included): it trains, and
/// the momentum copy of the library's parameters is checkpointed.
#[test]
fn momentum_distillation_copies_a_library_encoder() {
    let lib = library("vlmatch-dyn-siglip");
    let dir = scratch("dynamic-momentum");
    let mod_toml = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/mod.toml");
    let sets = [
        format!("plugins.paths=[\"{}\"]", lib.display()),
        "objectives.itc.enabled=true".into(),
        "train.steps=2".into(),
        "train.checkpoint_every=2".into(),
        "eval.at_end=false".into(),
    ];
    let mut layers = micro_layers(&sets.iter().map(String::as_str).collect::<Vec<_>>());
    layers.files.push(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("plugins/examples/dyn-siglip/dyn-siglip.toml"),
    );
    layers.files.push(mod_toml);
    let summary = train_exclusive(vlmatch::train::TrainOptions {
        layers,
        run_dir: Some(dir.clone()),
        resume: None,
        halt_after: None,
        progress: false,
        force: false,
    })
    .unwrap();
    assert_eq!(summary.last_step, 2);
    let saved =
        tch::Tensor::read_safetensors(dir.join("checkpoints/step-00000002.safetensors")).unwrap();
    let name = "vision_encoder.embeddings.patch_embedding.weight";
    assert!(
        saved
            .iter()
            .any(|(n, _)| n.starts_with("momentum.") && n.ends_with(name)),
        "the momentum copy of {name} is not in the checkpoint"
    );
}

/// An encoder in a library that panics in `forward`, an objective and a
/// hook whose tch call fails (a product of mismatched shapes, libtorch's
/// error), and a hook that asks for the model stop training with an error
/// naming the plugin, the call, the library and the cause: the process goes
/// on (no abort).
#[test]
fn a_panicking_encoder_and_a_failing_tch_call_are_errors_naming_the_plugin() {
    let lib = library("vlmatch-dyn-sampler-faulty");
    let siglip = library("vlmatch-dyn-siglip");
    let canonical = lib.canonicalize().unwrap().display().to_string();
    let dir = scratch("dynamic-faulty-kinds");
    let err = run_with_library(
        &dir.join("stem"),
        &[&siglip, &lib],
        &["model.image.plugin=\"panicky_stem\"", "train.steps=1"],
    )
    .unwrap_err()
    .to_string();
    for part in [
        "plugin `panicky_stem`",
        "`forward` failed in library",
        canonical.as_str(),
        "panicked: panicky_stem was told to panic in forward",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    let err = run_with_library(
        &dir.join("matmul"),
        &[&siglip, &lib],
        &[
            "objectives.bad.plugin=\"bad_matmul\"",
            "objectives.bad.weight=1.0",
            "train.steps=1",
        ],
    )
    .unwrap_err()
    .to_string();
    for part in [
        "plugin `bad_matmul`",
        "`forward` failed in library",
        "panicked",
        "cannot be multiplied",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }

    // A hook: its tch call fails in `before_backward`, which cannot return
    // an error; the failure stops the run at the end of that step.
    let err = run_with_library(
        &dir.join("hook"),
        &[&siglip, &lib],
        &["hooks.faulty_hook.at=\"before_backward\"", "train.steps=3"],
    )
    .unwrap_err()
    .to_string();
    for part in [
        "plugin `faulty_hook`",
        "`before_backward` failed in library",
        canonical.as_str(),
        "cannot be multiplied",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
    let logged = std::fs::read_to_string(dir.join("hook/metrics.jsonl")).unwrap_or_default();
    assert!(
        logged.lines().count() <= 1,
        "the run goes no further than the failing step: {logged}"
    );
    // A hook in a library asking for the model, which it does not see.
    let err = run_with_library(
        &dir.join("hook-model"),
        &[&siglip, &lib],
        &["hooks.faulty_hook.at=\"model\"", "train.steps=1"],
    )
    .unwrap_err()
    .to_string();
    for part in [
        "plugin `faulty_hook`",
        "`create` failed in library",
        "a hook in a plugin library does not see",
    ] {
        assert!(err.contains(part), "`{part}` not in: {err}");
    }
}

/// ITC's logits are not exposed to a library (PLUGINS.md): an objective
/// that reads `Forward::similarity` there gets NaN, never values computed
/// with another temperature.
#[test]
fn itc_logits_read_in_a_library_are_nan() {
    let lib = library("vlmatch-dyn-sampler-faulty");
    let siglip = library("vlmatch-dyn-siglip");
    let logged = run_with_library(
        &scratch("dynamic-itc-logits"),
        &[&siglip, &lib],
        &[
            "objectives.probe.plugin=\"reads_itc_logits\"",
            "train.steps=1",
            "eval.at_end=false",
        ],
    )
    .unwrap();
    assert!(logged[0]["sigmoid"].as_f64().is_some_and(f64::is_finite));
    assert!(
        logged[0]["itc_logits_sum"].is_null()
            || logged[0]["itc_logits_sum"]
                .as_f64()
                .is_some_and(f64::is_nan),
        "{:?}",
        logged[0]
    );
}
