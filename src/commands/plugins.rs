//! `vlmatch plugins`: the registered plugins by kind and origin.

use std::path::PathBuf;
use vlmatch_core::{Error, Result};
use vlmatch_registry::{Kind, Registry};

/// The plugin crates of this repository; any other origin is a third-party crate.
const BUILTIN_CRATES: &[&str] = &[
    "vlmatch-vit",
    "vlmatch-bert",
    "vlmatch-cross-attention",
    "vlmatch-discriminator",
    "vlmatch-mlm-head",
    "vlmatch-itc",
    "vlmatch-itm",
    "vlmatch-mlm",
    "vlmatch-rtd",
    "vlmatch-hard-negative",
    "vlmatch-word-swap",
    "vlmatch-neggen",
];

/// `vlmatch plugins` output.
pub fn plugin_listing(libraries: &[PathBuf]) -> Result<String> {
    let mut registry = Registry::from_inventory().map_err(|e| Error::Config(e.to_string()))?;
    for lib in libraries {
        registry.load_library(lib)?;
    }
    let mut out = String::new();
    for kind in Kind::ALL {
        out.push_str(&format!("{kind}:\n"));
        for e in registry.entries().filter(|e| e.factory.kind() == kind) {
            let from = if BUILTIN_CRATES.contains(&e.origin.as_str()) {
                format!("built-in ({})", e.origin)
            } else if e.origin.starts_with("library ") {
                e.origin.clone()
            } else {
                format!("crate {}", e.origin)
            };
            out.push_str(&format!("  {:<20} {from}\n", e.name));
        }
    }
    Ok(out)
}
