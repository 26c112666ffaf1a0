//! Shared build script for every package that links a binary or a test
//! against libtorch (see `ARCHITECTURE.md`, "Linking").
//!
//! Two traps are avoided here: without an rpath the binaries cannot find
//! `libtorch_cpu.so` at start-up, and the default `--as-needed` drops
//! `libtorch.so`/`libtorch_cuda.so`, which silently disables CUDA.
//! The library directory reaches us as `DEP_TCH_LIBTORCH_LIB` because each
//! package using this script depends on `torch-sys` directly.

fn main() {
    // The compiler version, for the dynamic-plugin handshake (Rust has no
    // stable ABI: a plugin library must come from the same rustc). Cargo
    // also sets this variable when it runs tests and binaries, so its name
    // must not start with VLMATCH_, the configuration's environment prefix.
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=BUILD_RUSTC_VERSION={version}");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; binaries will need LD_LIBRARY_PATH"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{lib}");
    println!("cargo:rustc-link-arg=-ltorch");
    let cuda = std::path::Path::new(&lib).join("libtorch_cuda.so");
    if cuda.exists() {
        println!("cargo:rustc-link-arg=-ltorch_cuda");
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
