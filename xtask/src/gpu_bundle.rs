//! `cargo xtask gpu-bundle`: build what a GPU check needs on this machine and
//! put it in `gpu-bundle/` (git-ignored), small enough to send to a GPU
//! machine that has PyTorch but no Rust toolchain (see `bench/gpu-check.sh`).

use crate::{cargo, run_status};
use std::path::Path;
use std::process::Command;

pub fn build(root: &Path) -> Result<(), String> {
    let mut cmd = cargo(root)?;
    cmd.args([
        "build",
        "--release",
        "--package",
        "vlmatch",
        "--bin",
        "vlmatch",
    ]);
    run_status(cmd)?;
    let out = root.join("gpu-bundle");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let bin = out.join("vlmatch");
    std::fs::copy(root.join("target/release/vlmatch"), &bin)
        .map_err(|e| format!("cannot copy the binary: {e}"))?;
    let mut strip = Command::new("strip");
    strip.arg(&bin);
    run_status(strip)?;
    for script in [
        "gpu-check.sh",
        "gpu-env.sh",
        "curve.sh",
        "curve_table.py",
        "gpu-bench.sh",
        // The PyTorch reference: its entry point and the modules it imports.
        "reference.py",
        "reference_model.py",
        "reference_objectives.py",
    ] {
        let src = root.join("bench").join(script);
        std::fs::copy(&src, out.join(script))
            .map_err(|e| format!("cannot copy {}: {e}", src.display()))?;
    }
    println!(
        "gpu-bundle/ is ready. On the GPU machine, from the repository root:\n  bash gpu-bundle/gpu-check.sh   (training smoke test)\n  bash gpu-bundle/gpu-bench.sh   (vlmatch against the PyTorch reference)"
    );
    Ok(())
}
