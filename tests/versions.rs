//! Versions are checked (issue 25, item 7): the c10d shim does not compile
//! against a libtorch other than 2.11.x, and the `vlmatch` binary stops at
//! start-up when the libtorch it loaded is another version. xtask's refusal
//! of such a `LIBTORCH` is a unit test of `xtask/src/setup.rs`; the version
//! files' parsers are unit tests of `src/version.rs`.

use std::path::{Path, PathBuf};
use std::process::Command;

use vlmatch::version::{mapped_library, LIBRARY};

fn vlmatch() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vlmatch"))
}

/// The `libtorch_cpu.so` this test process loaded (it links libtorch as
/// the binary does).
fn loaded_library() -> PathBuf {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    mapped_library(&maps, LIBRARY).expect("this test process maps libtorch_cpu.so")
}

/// A fresh directory for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("versions-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn the_binary_runs_on_the_libtorch_it_was_built_for() {
    for args in [&["--version"][..], &["plugins"]] {
        let out = vlmatch().args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "vlmatch {args:?}: {stderr}");
        assert!(!stderr.contains("libtorch"), "vlmatch {args:?}: {stderr}");
    }
}

/// A copy of the loaded libtorch whose `version.py` says 2.10.0, made of
/// hard links (no bytes copied), loaded through `LD_LIBRARY_PATH` as a
/// second torch on a user's path would be: the binary must stop naming both
/// versions. Skipped where hard links cannot be made (another file system).
#[test]
fn the_binary_stops_on_another_libtorch() {
    let real_lib = loaded_library();
    let real_lib_dir = real_lib.parent().unwrap();
    let real_site = real_lib_dir.parent().unwrap().parent().unwrap();
    let dir = scratch("loaded");
    let site = dir.join("site-packages");
    let lib = site.join("torch/lib");
    std::fs::create_dir_all(&lib).unwrap();
    for entry in std::fs::read_dir(real_lib_dir).unwrap() {
        let entry = entry.unwrap();
        if !entry.file_type().unwrap().is_file() {
            continue;
        }
        if let Err(e) = std::fs::hard_link(entry.path(), lib.join(entry.file_name())) {
            eprintln!(
                "skipped: cannot hard-link {} into {}: {e}",
                entry.path().display(),
                lib.display()
            );
            std::fs::remove_dir_all(&dir).unwrap();
            return;
        }
    }
    // libtorch_cuda.so finds the CUDA libraries at $ORIGIN/../../nvidia.
    let nvidia = real_site.join("nvidia");
    if nvidia.is_dir() {
        std::os::unix::fs::symlink(&nvidia, site.join("nvidia")).unwrap();
    }
    std::fs::write(
        site.join("torch/version.py"),
        "__version__ = '2.10.0+cpu'\ndebug = False\n",
    )
    .unwrap();

    let out = vlmatch()
        .arg("plugins")
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("needs libtorch 2.11.x"), "{stderr}");
    assert!(stderr.contains("loaded libtorch 2.10.0+cpu"), "{stderr}");
    assert!(
        stderr.contains(&lib.join(LIBRARY).display().to_string()),
        "{stderr}"
    );
    assert!(stderr.contains("cargo xtask setup"), "{stderr}");
    // Stopped before the command ran.
    assert!(
        out.stdout.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Without a version file beside it: a warning, and the command runs.
    std::fs::remove_file(site.join("torch/version.py")).unwrap();
    let out = vlmatch()
        .arg("plugins")
        .env("LD_LIBRARY_PATH", &lib)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("warning: cannot tell the version").count(),
        1,
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Compiles `dist/csrc/version_check.h` alone (what the shim includes
/// first) with `include` first on the include path.
fn compile_version_check(dir: &Path, include: &[PathBuf]) -> std::process::Output {
    let header = Path::new(env!("CARGO_MANIFEST_DIR")).join("dist/csrc/version_check.h");
    let source = dir.join("check.cpp");
    std::fs::write(&source, format!("#include \"{}\"\n", header.display())).unwrap();
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let mut cmd = Command::new(compiler);
    cmd.args(["-std=c++17", "-fsyntax-only"]);
    for dir in include {
        cmd.arg(format!("-isystem{}", dir.display()));
    }
    cmd.arg(&source)
        .output()
        .expect("a C++ compiler (c++ or $CXX)")
}

#[test]
fn the_shim_compiles_only_against_libtorch_2_11() {
    let dir = scratch("shim");
    let torch = loaded_library()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    let real = [
        torch.join("include"),
        torch.join("include/torch/csrc/api/include"),
    ];
    let out = compile_version_check(&dir, &real);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let fake = dir.join("fake");
    std::fs::create_dir_all(fake.join("torch")).unwrap();
    std::fs::write(
        fake.join("torch/version.h"),
        "#pragma once\n#define TORCH_VERSION_MAJOR 2\n#define TORCH_VERSION_MINOR 10\n\
         #define TORCH_VERSION_PATCH 0\n#define TORCH_VERSION \"2.10.0\"\n",
    )
    .unwrap();
    let out = compile_version_check(&dir, std::slice::from_ref(&fake));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the c10d shim needs libtorch 2.11.x"),
        "{stderr}"
    );
    assert!(stderr.contains("found libtorch 2.10.0"), "{stderr}");
    assert!(stderr.contains("cargo xtask setup"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}
