//! Build script of `vlmatch-dist`.
//!
//! 1. Links libtorch the way `core/torch_link.rs` does for every other member
//!    (that file's `main` is private to it, so the same few lines live here):
//!    an rpath to the libtorch lib dir, and `-ltorch` (plus `-ltorch_cuda`)
//!    under `--no-as-needed`, or the test binaries cannot start and CUDA
//!    would silently be unavailable.
//! 2. Compiles the C++ shim over c10d (`csrc/*.cpp`, one file per concern
//!    with `csrc/shim.h` shared, listed in [`SHIM_SOURCES`]) against
//!    libtorch's headers with the `cc` crate and links it with `torch`,
//!    `torch_cpu` and `c10`.
//! 3. Adds the NCCL backend when nccl.h and the CUDA headers PyPI ships are
//!    next to the torch package (`nvidia/nccl/include`, `nvidia/cu13/include`
//!    with `crt/host_config.h` from nvidia-cuda-crt and `nv/target` from
//!    nvidia-cuda-cccl; `cargo xtask setup` installs both) and the libtorch
//!    has `libtorch_cuda.so`. Then it also links `torch_cuda` and `c10_cuda`
//!    and sets `--cfg vlmatch_nccl`.
//!
//! `DEP_TCH_LIBTORCH_LIB` comes from the direct `torch-sys` dependency.

use std::path::{Path, PathBuf};

/// The shim's translation units, one per concern (mirrored by the modules of
/// `src/ffi/`).
const SHIM_SOURCES: [&str; 6] = [
    "csrc/store.cpp",
    "csrc/group.cpp",
    "csrc/autograd.cpp",
    "csrc/reducer.cpp",
    "csrc/health.cpp",
    "csrc/checkpoint.cpp",
];

/// The shim's headers: what the files share, the hand-declared Gloo, and the
/// check that refuses to compile against a libtorch other than 2.11.x
/// (`#error`, then a `static_assert` naming the version found).
const SHIM_HEADERS: [&str; 3] = ["csrc/shim.h", "csrc/gloo_decl.h", "csrc/version_check.h"];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for file in SHIM_SOURCES.iter().chain(&SHIM_HEADERS) {
        println!("cargo:rerun-if-changed={file}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-check-cfg=cfg(vlmatch_nccl)");

    let lib =
        PathBuf::from(std::env::var("DEP_TCH_LIBTORCH_LIB").expect(
            "DEP_TCH_LIBTORCH_LIB is not set: vlmatch-dist must depend on torch-sys directly",
        ));
    let lib = lib.canonicalize().unwrap_or(lib);
    let torch = lib.parent().expect("the libtorch lib dir has a parent");
    let include = torch.join("include");
    assert!(
        include
            .join("torch/csrc/distributed/c10d/TCPStore.hpp")
            .exists(),
        "libtorch at {} has no c10d headers (include/torch/csrc/distributed/c10d); \
         vlmatch-dist needs a libtorch with them, such as the PyPI torch 2.11.0 wheel \
         that `cargo xtask setup` provisions",
        torch.display()
    );

    link_libtorch(&lib);

    let nccl = nccl_headers(torch, &lib);
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .files(SHIM_SOURCES)
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // libtorch's own headers are not ours to warn about.
        .flag(format!("-isystem{}", include.display()))
        .flag(format!(
            "-isystem{}",
            include.join("torch/csrc/api/include").display()
        ))
        .flag_if_supported("-Wno-unused-parameter");
    if let Some(dirs) = &nccl {
        build.define("VLMATCH_WITH_NCCL", None);
        build.define("USE_C10D_NCCL", None);
        for dir in dirs {
            build.flag(format!("-isystem{}", dir.display()));
        }
    }
    build.compile("vlmatch_c10d_shim");

    println!("cargo:rustc-link-search=native={}", lib.display());
    for name in ["torch", "torch_cpu", "c10"] {
        println!("cargo:rustc-link-lib=dylib={name}");
    }
    if nccl.is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
        println!("cargo:rustc-cfg=vlmatch_nccl");
    } else {
        println!(
            "cargo:warning=vlmatch-dist: building without the NCCL backend \
             (nccl.h or the CUDA headers not found next to {}); \
             `cargo xtask setup` installs them into its venv",
            torch.display()
        );
    }
}

/// What `core/torch_link.rs` does for the binaries and tests of a package.
fn link_libtorch(lib: &Path) {
    let lib = lib.display();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-ltorch");
    if Path::new(&format!("{lib}/libtorch_cuda.so")).exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}

/// The include directories for ProcessGroupNCCL.hpp, when all are present:
/// PyPI's layout, `site-packages/nvidia/{nccl,cu13}/include` beside
/// `site-packages/torch`.
fn nccl_headers(torch: &Path, lib: &Path) -> Option<Vec<PathBuf>> {
    if !lib.join("libtorch_cuda.so").exists() || !lib.join("libc10_cuda.so").exists() {
        return None;
    }
    let site = torch.parent()?;
    let nccl = site.join("nvidia/nccl/include");
    let cuda = site.join("nvidia/cu13/include");
    let needed = [
        nccl.join("nccl.h"),
        cuda.join("cuda_runtime_api.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("nv/target"),
    ];
    let found = needed.iter().all(|f| f.exists());
    // Watch the files when present; else the folders they would land in (a
    // missing path would rerun this script, and recompile the shim, on every
    // build), so a later `cargo xtask setup` brings NCCL in.
    let watch: Vec<&Path> = if found {
        needed.iter().map(PathBuf::as_path).collect()
    } else {
        [nccl.as_path(), cuda.as_path()]
            .into_iter()
            .filter(|d| d.is_dir())
            .collect()
    };
    for path in watch {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    found.then(|| vec![nccl, cuda])
}
