//! Which plugin libraries a command loads, and the registry that holds
//! them: the `--plugin` libraries of this invocation and a config's
//! `plugins.paths`, each made canonical (the file checked is the file
//! loaded) and loaded once.

use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};
use vlmatch_registry::{LoadedConfig, Registry};

/// The dynamic plugin libraries given on the command line (`--plugin
/// PATH`), canonical.
static PLUGIN_LIBRARIES: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Record the `--plugin` libraries of this invocation; each must be a file.
pub fn set_plugin_libraries(paths: &[PathBuf]) -> Result<()> {
    let mut canonical = Vec::new();
    for p in paths {
        canonical.push(canonical_library(p, "--plugin")?);
    }
    *PLUGIN_LIBRARIES.lock().unwrap_or_else(|e| e.into_inner()) = canonical;
    Ok(())
}

/// The `--plugin` libraries of this invocation, canonical.
pub fn plugin_libraries() -> Vec<PathBuf> {
    PLUGIN_LIBRARIES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// `path` made absolute with every link resolved: the exact file that is
/// checked is the file that is loaded (a bare name would otherwise be
/// searched on the library path).
pub fn canonical_library(path: &Path, from: &str) -> Result<PathBuf> {
    let canonical = std::fs::canonicalize(path).map_err(|e| {
        let why = match e.kind() {
            std::io::ErrorKind::NotFound => "no such file".to_string(),
            _ => e.to_string(),
        };
        Error::Config(format!(
            "{from} `{}`: {why}; expected the path of a plugin library file",
            path.display()
        ))
    })?;
    if !canonical.is_file() {
        return Err(Error::Config(format!(
            "{from} `{}`: not a file; expected the path of a plugin library file",
            path.display()
        )));
    }
    Ok(canonical)
}

/// The libraries [`registry`] has reported as loaded in this process.
static ANNOUNCED: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// The built-in plugins, the libraries of the config's `plugins.paths`
/// (from a layer the user gave in this invocation; a run directory's are
/// refused unless given with `--plugin`, see `run::saved_config`) and the
/// `--plugin` libraries, each loaded once from its canonical path.
pub fn registry(cfg: &LoadedConfig) -> Result<Registry> {
    let mut registry = Registry::from_inventory().map_err(|e| Error::Config(e.to_string()))?;
    let mut loaded: Vec<PathBuf> = Vec::new();
    let from_config = cfg.config.plugins.paths.iter();
    let configured: Vec<PathBuf> = from_config
        .map(|p| canonical_library(p, "config key `plugins.paths`"))
        .collect::<Result<_>>()?;
    for path in configured.into_iter().chain(plugin_libraries()) {
        if loaded.contains(&path) {
            continue;
        }
        let names = registry.load_library(&path)?;
        // A command builds the registry more than once (model, samplers,
        // hooks); the library is reported the first time.
        let first = ANNOUNCED
            .lock()
            .map(|mut seen| seen.insert(path.clone()))
            .unwrap_or(true);
        if first {
            tracing::info!(library = %path.display(), plugins = ?names, "loaded plugin library");
        }
        loaded.push(path);
    }
    Ok(registry)
}
