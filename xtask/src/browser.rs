//! The headless Chromium that `tests/serve.rs` drives (the page of
//! `vlmatch serve`): found on the machine, or installed from Debian's
//! packages (`chromium-headless-shell`, else `chromium`) when running as
//! root with `apt-get`. Nothing is downloaded outside the package manager.

use std::path::PathBuf;
use std::process::Command;

const NAMES: [&str; 3] = ["chromium-headless-shell", "chromium", "chromium-browser"];

/// `VLMATCH_TEST_CHROMIUM`, or the first browser of [`NAMES`] on `PATH`.
pub fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("VLMATCH_TEST_CHROMIUM") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let path = std::env::var_os("PATH")?;
    NAMES.iter().find_map(|name| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The browser, installed with apt-get when missing and possible.
pub fn ensure() -> Result<PathBuf, String> {
    if let Some(p) = find() {
        return Ok(p);
    }
    let how = "apt-get install -y chromium-headless-shell (or chromium), as root";
    if !is_root() || Command::new("apt-get").arg("--version").output().is_err() {
        return Err(format!(
            "no headless Chromium for tests/serve.rs; install one: {how}, or set VLMATCH_TEST_CHROMIUM"
        ));
    }
    eprintln!("xtask: installing a headless Chromium for tests/serve.rs (apt-get)");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["update", "-q"]) {
        eprintln!("xtask: apt-get update failed; trying the package lists there are");
    }
    for package in ["chromium-headless-shell", "chromium"] {
        if apt(&["install", "-y", "-q", "--no-install-recommends", package]) {
            if let Some(p) = find() {
                return Ok(p);
            }
        }
    }
    Err(format!("could not install a headless Chromium: {how}"))
}
