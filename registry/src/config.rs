//! Layered configuration, lowest layer first:
//!
//! 1. a preset (`configs/<name>.toml`, or a run directory's saved `config.toml`),
//! 2. each `--config FILE`, in order,
//! 3. environment variables `VLMATCH_<SECTION>__<KEY>` (`VLMATCH_TRAIN__STEPS=10`;
//!    `VLMATCH_HF_FIXTURES` and `VLMATCH_TEST_*`, the tests' settings, are not keys),
//! 4. each `--set dotted.key=value` (values parse as TOML, else as strings).
//!
//! Unknown keys and wrong types are errors naming the key and the layer it
//! came from. Typed sections (`train`, `data`, `eval`) are checked here;
//! plugin sections (`model.*`, `objectives.*`, `samplers.*`) name their
//! plugin and are checked by that plugin's own config type through
//! [`crate::BuildContext::params`], with the same error format.

use figment::providers::{Env, Format, Toml};
use figment::value::{Dict, Map, Tag, Value};
use figment::{Figment, Metadata, Profile, Provider};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vlmatch_core::{Error, Result};

mod choices;
mod common;
mod data;
mod sections;
mod train;

pub use common::{Checked, MIN_MAX_LEN};
pub use data::*;
pub use sections::*;
pub use train::*;

/// A named TOML text, used for presets and saved run configs.
#[derive(Clone)]
struct NamedToml {
    name: String,
    path: Option<PathBuf>,
    text: String,
}

impl Provider for NamedToml {
    fn metadata(&self) -> Metadata {
        let m = Metadata::named(self.name.clone());
        match &self.path {
            Some(p) => m.source(p.as_path()),
            None => m,
        }
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        Toml::string(&self.text).data()
    }
}

/// `--set key=value` pairs, as their own layer so errors name them.
#[derive(Clone)]
struct SetOverrides(Vec<(String, String)>);

impl Provider for SetOverrides {
    fn metadata(&self) -> Metadata {
        Metadata::named("command line").interpolater(|_, keys| format!("--set {}", keys.join(".")))
    }
    fn data(&self) -> figment::Result<Map<Profile, Dict>> {
        let mut root = Dict::new();
        for (key, raw) in &self.0 {
            let value = parse_value(raw);
            insert_dotted(&mut root, key, value);
        }
        let mut map = Map::new();
        map.insert(Profile::Global, root);
        Ok(map)
    }
}

fn parse_value(raw: &str) -> Value {
    match format!("v = {raw}").parse::<toml::Table>() {
        Ok(table) => {
            let v = table.get("v").cloned().expect("parsed key");
            Value::serialize(v).unwrap_or_else(|_| Value::from(raw.to_string()))
        }
        Err(_) => Value::from(raw.to_string()),
    }
}

fn insert_dotted(root: &mut Dict, key: &str, value: Value) {
    let mut parts = key.split('.').peekable();
    let mut dict = root;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            dict.insert(part.to_string(), value);
            return;
        }
        let entry = dict
            .entry(part.to_string())
            .or_insert_with(|| Value::Dict(Tag::Default, Dict::new()));
        if !matches!(entry, Value::Dict(..)) {
            *entry = Value::Dict(Tag::Default, Dict::new());
        }
        let Value::Dict(_, next) = entry else {
            unreachable!()
        };
        dict = next;
    }
}

/// What to layer, in order. Built by the CLI from its arguments.
#[derive(Debug, Clone, Default)]
pub struct ConfigLayers {
    /// The bottom layer: `(display name, path if a file, TOML text)`.
    pub base: Option<(String, Option<PathBuf>, String)>,
    /// `--config` files, lowest first.
    pub files: Vec<PathBuf>,
    /// Read `VLMATCH_*` environment variables.
    pub env: bool,
    /// `--set` pairs as given (`a.b=c`).
    pub sets: Vec<String>,
}

/// The merged configuration, typed, with the figment that produced it (for
/// plugin sections and error sources).
pub struct LoadedConfig {
    pub figment: Figment,
    pub config: Config,
    /// Plugin-section keys dropped because a higher layer switched the
    /// section to another plugin (full dotted keys).
    pub stale: std::collections::BTreeSet<String>,
}

impl ConfigLayers {
    pub fn load(&self) -> Result<LoadedConfig> {
        let mut figment = Figment::new();
        // Each layer alone too, to tell which layer set a section's plugin.
        let mut layers: Vec<(String, Figment)> = Vec::new();
        if let Some((name, path, text)) = &self.base {
            check_toml(name, text)?;
            let layer = NamedToml {
                name: name.clone(),
                path: path.clone(),
                text: text.clone(),
            };
            layers.push((name.clone(), Figment::from(layer.clone())));
            figment = figment.merge(layer);
        }
        for file in &self.files {
            let text = crate::check::read_utf8(file).map_err(|e| match e {
                Error::Io { source, .. } => Error::Config(format!(
                    "cannot read config file {}: {source}",
                    file.display()
                )),
                other => other,
            })?;
            let name = format!("file {}", file.display());
            check_toml(&name, &text)?;
            let layer = NamedToml {
                name: name.clone(),
                path: Some(file.clone()),
                text,
            };
            layers.push((name, Figment::from(layer.clone())));
            figment = figment.merge(layer);
        }
        if self.env {
            // VLMATCH_HF_FIXTURES names parity-fixture directories for the
            // test suite, VLMATCH_TEST_* are the tests' fault points; they
            // are not config keys.
            let env = || {
                Env::prefixed("VLMATCH_")
                    .ignore(&["HF_FIXTURES"])
                    .filter(|key| !key.as_str().to_ascii_lowercase().starts_with("test_"))
                    .split("__")
                    .global()
            };
            layers.push((env().metadata().name.to_string(), Figment::from(env())));
            figment = figment.merge(env());
        }
        let mut sets = Vec::new();
        for s in &self.sets {
            let Some((k, v)) = s.split_once('=') else {
                return Err(Error::Config(format!(
                    "--set `{s}`: expected `dotted.key=value`, e.g. `--set train.steps=100`"
                )));
            };
            if k.trim().is_empty() || k.split('.').any(|p| p.trim().is_empty()) {
                return Err(Error::Config(format!(
                    "--set `{s}`: the key `{k}` is not a dotted key"
                )));
            }
            sets.push((k.trim().to_string(), v.trim().to_string()));
        }
        if !sets.is_empty() {
            let layer = SetOverrides(sets);
            layers.push((
                layer.metadata().name.to_string(),
                Figment::from(layer.clone()),
            ));
            figment = figment.merge(layer);
        }
        let mut config: Config = figment
            .extract()
            .map_err(|e| Error::Config(describe_error(e, &figment, &[])))?;
        if let Err((key, problem)) = config.check_values() {
            let source = key_source(&figment, &key, None);
            return Err(Error::Config(format!(
                "config key `{key}`{source}: {problem}"
            )));
        }
        checkpoint_normalisation(&mut config, &figment)?;
        let stale = drop_stale_keys(&mut config, &figment, &layers);
        Ok(LoadedConfig {
            figment,
            config,
            stale,
        })
    }
}

/// `data.mean` and `data.std`, each where no layer sets it, from
/// `model.image.init`'s `preprocessor_config.json` (`image_mean`,
/// `image_std`): the normalisation the image checkpoint was trained with
/// (CLIP's for CLIP, 0.5 for HuggingFace ViT). The values go into the
/// config, so the run's `config.toml` records them (and a resume keeps them).
fn checkpoint_normalisation(config: &mut Config, figment: &Figment) -> Result<()> {
    let Ok(dir) = figment.extract_inner::<PathBuf>("model.image.init") else {
        return Ok(());
    };
    let file = dir.join("preprocessor_config.json");
    let Ok(text) = std::fs::read_to_string(&file) else {
        return Ok(());
    };
    let bad = |message: String| Error::Data {
        path: file.clone(),
        line: None,
        message,
    };
    let json: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| bad(format!("invalid preprocessor_config.json: {e}")))?;
    let data = &mut config.data;
    for (key, field, target) in [
        ("data.mean", "image_mean", &mut data.mean),
        ("data.std", "image_std", &mut data.std),
    ] {
        let (Some(value), None) = (json.get(field), figment.find_metadata(key)) else {
            continue;
        };
        let v: [f32; 3] = serde_json::from_value(value.clone()).map_err(|e| {
            bad(format!(
                "`{field}`: expected 3 numbers (one per RGB channel): {e}"
            ))
        })?;
        let valid = v
            .iter()
            .all(|x| x.is_finite() && (field == "image_mean" || *x > 0.0));
        if !valid {
            return Err(bad(format!("`{field}` {v:?} cannot normalise images")));
        }
        tracing::info!(key, value = ?v, from = %file.display(), "image normalisation from the checkpoint");
        *target = v;
    }
    Ok(())
}

/// Switching a section's plugin in a higher layer (`--config` with
/// `[model.image] plugin = "conv_stem"` over a ViT preset) must not hand the
/// new plugin the old one's keys. A plugin-section key is kept only if it
/// was set in or above the lowest layer from which on the section's plugin
/// has its final value; the others are dropped from the config.
fn drop_stale_keys(
    config: &mut Config,
    figment: &Figment,
    layers: &[(String, Figment)],
) -> std::collections::BTreeSet<String> {
    let layer_of = |name: &str| layers.iter().rposition(|(n, _)| n == name);
    let first_layer = |key: &str, plugin: &str| -> usize {
        let mut start = None;
        for (i, (_, layer)) in layers.iter().enumerate() {
            match layer.extract_inner::<String>(&format!("{key}.plugin")) {
                Ok(p) if p == plugin => start = start.or(Some(i)),
                Ok(_) => start = None,
                Err(_) => {}
            }
        }
        start.unwrap_or(0)
    };
    let mut stale = std::collections::BTreeSet::new();
    let mut filter = |key: &str, plugin: &str, params: &mut BTreeMap<String, Value>| {
        let start = first_layer(key, plugin);
        if start == 0 {
            return;
        }
        params.retain(|k, _| {
            let full = format!("{key}.{k}");
            let set_in = figment.find_metadata(&full).and_then(|m| layer_of(&m.name));
            let keep = set_in.is_none_or(|i| i >= start);
            if !keep {
                stale.insert(full);
            }
            keep
        });
    };
    let m = &mut config.model;
    filter("model.image", &m.image.plugin.clone(), &mut m.image.params);
    filter("model.text", &m.text.plugin.clone(), &mut m.text.params);
    filter(
        "model.fusion",
        &m.fusion.plugin.clone(),
        &mut m.fusion.params,
    );
    filter(
        "model.discriminator",
        &m.discriminator.plugin.clone(),
        &mut m.discriminator.params,
    );
    if let Some(g) = &mut m.generator {
        filter("model.generator", &g.plugin.clone(), &mut g.params);
    }
    for (name, o) in &mut config.objectives {
        let plugin = o.plugin.clone().unwrap_or_else(|| name.clone());
        filter(&format!("objectives.{name}"), &plugin, &mut o.params);
    }
    for (name, s) in &mut config.samplers {
        filter(
            &format!("samplers.{name}"),
            &s.plugin.clone(),
            &mut s.params,
        );
    }
    stale
}

/// Reject a syntactically broken TOML layer with its line.
fn check_toml(name: &str, text: &str) -> Result<()> {
    text.parse::<toml::Table>().map(|_| ()).map_err(|e| {
        let line = e.span().map(|s| text[..s.start].matches('\n').count() + 1);
        let at = line.map(|l| format!(" line {l}")).unwrap_or_default();
        let message = e.message().trim().replace('\n', "; ");
        Error::Config(format!("{name}{at}: invalid TOML: {message}"))
    })
}

impl LoadedConfig {
    /// The merged configuration as TOML, defaults filled in.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(&self.config).expect("the config serialises to TOML")
    }

    /// Deserialize the plugin section at `key` (dotted) into `T`, ignoring
    /// the role keys (`plugin`; `weight`, `enabled` of objectives) that the
    /// registry itself reads.
    pub fn section<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T> {
        section_of(&self.figment, Some(&self.stale), key)
    }
}

/// [`LoadedConfig::section`] over any figment; `stale`: keys to drop.
pub(crate) fn section_of<T: serde::de::DeserializeOwned>(
    figment: &Figment,
    stale: Option<&std::collections::BTreeSet<String>>,
    key: &str,
) -> Result<T> {
    let value = figment
        .find_value(key)
        .map_err(|e| Error::Config(format!("config key `{key}`: {}", e.kind)))?;
    let Value::Dict(tag, mut dict) = value else {
        return Err(Error::Config(format!(
            "config key `{key}`: expected a table"
        )));
    };
    dict.remove("plugin");
    dict.retain(|k, _| !stale.is_some_and(|s| s.contains(&format!("{key}.{k}"))));
    if key.starts_with("objectives.") {
        dict.remove("weight");
        dict.remove("enabled");
    }
    if key.starts_with("hooks.") {
        dict.remove("enabled");
        dict.remove("priority");
    }
    let prefix: Vec<&str> = key.split('.').collect();
    Value::Dict(tag, dict)
        .deserialize::<T>()
        .map_err(|e| Error::Config(describe_error(e, figment, &prefix)))
}

/// One line naming the key, the layer it came from, and what is wrong.
pub fn describe_error(err: figment::Error, figment: &Figment, prefix: &[&str]) -> String {
    let err = err
        .into_iter()
        .next()
        .expect("an error has at least one entry");
    let mut path: Vec<String> = prefix.iter().map(|s| s.to_string()).collect();
    path.extend(err.path.iter().cloned());
    if let figment::error::Kind::UnknownField(field, _) = &err.kind {
        if path.last() != Some(field) {
            path.push(field.clone());
        }
    }
    if let figment::error::Kind::MissingField(field) = &err.kind {
        path.push(field.to_string());
    }
    let key = path.join(".");
    let problem = match &err.kind {
        figment::error::Kind::UnknownField(field, expected) => {
            let hint = closest(field, expected)
                .map(|c| format!(" (did you mean `{c}`?)"))
                .unwrap_or_default();
            format!(
                "unknown key `{field}`{hint}; expected one of: {}",
                expected.join(", ")
            )
        }
        figment::error::Kind::MissingField(field) => format!("missing required key `{field}`"),
        other => other.to_string(),
    };
    let source = key_source(figment, &key, err.metadata.as_ref());
    let what = if key.is_empty() {
        "config".to_string()
    } else {
        format!("config key `{key}`")
    };
    format!("{what}{source}: {problem}")
}

/// `config key `K`: problem` (as [`crate::check`] words it) with the layer
/// that set `K` added: `config key `K` (from `--set K`): problem`. Other
/// errors, and keys no layer set, are returned as they are.
pub fn with_key_source(err: Error, figment: &Figment) -> Error {
    let Error::Config(message) = &err else {
        return err;
    };
    let Some((key, problem)) = message
        .strip_prefix("config key `")
        .and_then(|rest| rest.split_once("`: "))
    else {
        return err;
    };
    let source = key_source(figment, key, None);
    if source.is_empty() {
        return err;
    }
    Error::Config(format!("config key `{key}`{source}: {problem}"))
}

/// Where the value of the dotted `key` came from, as ` (in FILE)`, ` (from
/// `--set KEY`)`, ` (from environment variable VLMATCH_...)` or ` (from
/// LAYER)`; `fallback` when no layer set the key; empty if neither says.
fn key_source(figment: &Figment, key: &str, fallback: Option<&Metadata>) -> String {
    let metadata = figment.find_metadata(key).or(fallback);
    metadata
        .map(|m| {
            let keys: Vec<&str> = key.split('.').filter(|k| !k.is_empty()).collect();
            let shown = m.interpolate(&Profile::Default, &keys);
            match &m.source {
                Some(figment::Source::File(p)) => format!(" (in {})", p.display()),
                _ if m.name == "command line" => format!(" (from `{shown}`)"),
                _ if m.name.contains("environment") => {
                    format!(
                        " (from environment variable VLMATCH_{})",
                        keys.join("__").to_uppercase()
                    )
                }
                _ => format!(" (from {})", m.name),
            }
        })
        .unwrap_or_default()
}

/// The expected name nearest to a misspelt one, if it is close.
fn closest<'e>(name: &str, expected: &[&'e str]) -> Option<&'e str> {
    fn distance(a: &str, b: &str) -> usize {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, cb) in b.iter().enumerate() {
                let cur = row[j + 1];
                row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
                prev = cur;
            }
        }
        row[b.len()]
    }
    expected
        .iter()
        .map(|e| (distance(name, e), *e))
        .filter(|(d, e)| *d <= (e.len() / 3).max(2))
        .min()
        .map(|(_, e)| e)
}

/// Read a TOML preset file as the base layer.
pub fn base_from_file(path: &Path) -> Result<(String, Option<PathBuf>, String)> {
    let text = crate::check::read_utf8(path).map_err(|e| match e {
        Error::Io { source, .. } => Error::Config(format!(
            "cannot read config file {}: {source}",
            path.display()
        )),
        other => other,
    })?;
    Ok((
        format!("file {}", path.display()),
        Some(path.to_path_buf()),
        text,
    ))
}
