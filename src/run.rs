//! A trained run loaded back: its saved config with overrides on top, its
//! tokenizer and model with the newest checkpoint's weights; and the
//! presets that start a new one. Shared by the commands, `bench` and `vqa`.

use crate::PRESETS;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};
use vlmatch_registry::ConfigLayers;

/// A preset by name: `configs/<name>.toml` in the working directory if
/// present, else the copy built into the binary; or a path to a TOML file.
pub fn preset(name: &str) -> Result<(String, Option<PathBuf>, String)> {
    let file = Path::new("configs").join(format!("{name}.toml"));
    if file.is_file() {
        return vlmatch_registry::config::base_from_file(&file);
    }
    if let Some((_, text)) = PRESETS.iter().find(|(n, _)| *n == name) {
        return Ok((format!("preset {name} (built in)"), None, text.to_string()));
    }
    if name.ends_with(".toml") && Path::new(name).is_file() {
        return vlmatch_registry::config::base_from_file(Path::new(name));
    }
    let known: Vec<&str> = PRESETS.iter().map(|(n, _)| *n).collect();
    Err(Error::Config(format!(
        "unknown preset `{name}`; presets: {} (or give a path to a .toml file)",
        known.join(", ")
    )))
}

/// A trained run: its config (with `sets` on top), tokenizer, model with the
/// newest intact checkpoint's weights, that checkpoint and its counters.
pub struct LoadedRun {
    pub loaded: vlmatch_registry::LoadedConfig,
    pub tok: std::sync::Arc<crate::tokenizer::Tokenizer>,
    pub asm: vlmatch_registry::Assembly,
    pub state: crate::checkpoint::TrainerState,
    /// The checkpoint the weights came from (verified by its checksum; an
    /// older one, with a warning, when the newest is damaged).
    pub checkpoint: std::path::PathBuf,
}

/// A run directory's saved config, as the bottom config layer. Code never
/// loads because a run directory says so: a saved config naming plugin
/// libraries (`plugins.paths`) is refused unless this invocation gives each
/// of them with `--plugin PATH` (compared as canonical paths).
pub fn saved_config(run_dir: &Path) -> Result<(String, Option<PathBuf>, String)> {
    let file = run_dir.join("config.toml");
    let base = vlmatch_registry::config::base_from_file(&file)?;
    let named: Vec<String> = toml::from_str::<toml::Table>(&base.2)
        .ok()
        .and_then(|t| t.get("plugins")?.get("paths")?.as_array().cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    let given = crate::libraries::plugin_libraries();
    let unapproved: Vec<&String> = named
        .iter()
        .filter(|p| {
            std::fs::canonicalize(p)
                .map(|c| !given.contains(&c))
                .unwrap_or(true)
        })
        .collect();
    if !unapproved.is_empty() {
        let list: Vec<String> = unapproved.iter().map(|p| format!("`{p}`")).collect();
        return Err(Error::Config(format!(
            "{} names plugin libraries (`plugins.paths`: {}); a run directory's config never \
             loads code by itself: if you trust them, pass each with --plugin PATH",
            file.display(),
            list.join(", ")
        )));
    }
    Ok(base)
}

/// A run directory's saved config with `sets` (and the environment) on top.
pub fn run_config(run_dir: &Path, sets: &[String]) -> Result<vlmatch_registry::LoadedConfig> {
    ConfigLayers {
        base: Some(saved_config(run_dir)?),
        files: vec![],
        env: true,
        sets: sets.to_vec(),
    }
    .load()
}

pub fn load_run(run_dir: &Path, sets: &[String]) -> Result<LoadedRun> {
    load_run_on(run_dir, sets, None)
}

/// [`load_run`] on `device` (default: the run's `train.device`).
pub fn load_run_on(
    run_dir: &Path,
    sets: &[String],
    device: Option<tch::Device>,
) -> Result<LoadedRun> {
    let loaded = run_config(run_dir, sets)?;
    let tok = std::sync::Arc::new(crate::setup::tokenizer(&loaded)?);
    let device = match device {
        Some(d) => d,
        None => crate::setup::device(&loaded.config.train.device)?,
    };
    let (asm, _) = crate::setup::model_on(&loaded, &tok, device)?;
    let checkpoint = crate::checkpoint::newest_intact(run_dir)?;
    let (_, state) = crate::checkpoint::load(&checkpoint, &asm.vs)?;
    tracing::info!(checkpoint = %checkpoint.display(), step = state.step, "loaded");
    Ok(LoadedRun {
        loaded,
        tok,
        asm,
        state,
        checkpoint,
    })
}
