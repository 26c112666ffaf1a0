//! HuggingFace checkpoint layouts from a table ([`HubLayout`]): which
//! `model_type`s a plugin loads, how a checkpoint's tensor names map onto
//! its parameters ([`NameMap`]), which position table follows another
//! resolution, and the `config.json` and image-processor files it exports
//! ([`hub_config`], [`image_processor`]).

use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::Path;
use tch::Tensor;
use vlmatch_core::Result;
use vlmatch_registry::weights::{
    hub_name, CheckpointArch, CheckpointLayout, ExportContext, ExportFiles, LoadContext,
};

/// How checkpoint tensor names map onto a plugin's parameters.
#[derive(Clone, Copy)]
pub enum NameMap {
    /// By name: a name loses the first of `strip` it starts with (a model
    /// class prefix, `bert.`), old LayerNorm names (`gamma`, `beta`) become
    /// `weight`, `bias` where `legacy_layer_norms` ([`hub_name`]); then
    /// only names below `within` are the plugin's ("" for all), except
    /// those whose part below `within` starts with one of `skip_prefixes`
    /// or is one of `skip_names` (a pooler, another tower, id buffers, a
    /// tied decoder).
    Table {
        strip: &'static [&'static str],
        legacy_layer_norms: bool,
        within: &'static str,
        skip_prefixes: &'static [&'static str],
        skip_names: &'static [&'static str],
    },
    /// A map that depends on the model (a fusion's layer offset).
    Custom(fn(&LoadContext<'_>, &str) -> Option<String>),
}

impl NameMap {
    /// By name ([`NameMap::Table`]): every name below the first of `strip`
    /// it starts with (or the whole name), old LayerNorm names renamed.
    pub const fn below(strip: &'static [&'static str]) -> NameMap {
        NameMap::Table {
            strip,
            legacy_layer_norms: true,
            within: "",
            skip_prefixes: &[],
            skip_names: &[],
        }
    }

    /// By name: only the names below `within`, old LayerNorm names
    /// renamed (a head's, `cls.predictions.`).
    pub const fn within(within: &'static str) -> NameMap {
        NameMap::Table {
            strip: &[],
            legacy_layer_norms: true,
            within,
            skip_prefixes: &[],
            skip_names: &[],
        }
    }

    /// The same, but LayerNorm names are taken as they are (checkpoints
    /// that never had `gamma`, `beta`).
    pub const fn current_layer_norms(self) -> NameMap {
        match self {
            NameMap::Table {
                strip,
                within,
                skip_prefixes,
                skip_names,
                ..
            } => NameMap::Table {
                strip,
                legacy_layer_norms: false,
                within,
                skip_prefixes,
                skip_names,
            },
            custom => custom,
        }
    }

    /// The same, except names (below `within`) that start with one of
    /// `prefixes` or are one of `names`.
    pub const fn skip(
        self,
        prefixes: &'static [&'static str],
        names: &'static [&'static str],
    ) -> NameMap {
        match self {
            NameMap::Table {
                strip,
                legacy_layer_norms,
                within,
                ..
            } => NameMap::Table {
                strip,
                legacy_layer_norms,
                within,
                skip_prefixes: prefixes,
                skip_names: names,
            },
            custom => custom,
        }
    }

    /// The parameter `name` initialises, if it is the plugin's.
    pub fn map(&self, ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        let (strip, legacy_layer_norms, within, skip_prefixes, skip_names) = match *self {
            NameMap::Custom(map) => return map(ctx, name),
            NameMap::Table {
                strip,
                legacy_layer_norms,
                within,
                skip_prefixes,
                skip_names,
            } => (strip, legacy_layer_norms, within, skip_prefixes, skip_names),
        };
        let n = if legacy_layer_norms {
            hub_name(name, strip)
        } else {
            let stripped = strip.iter().find_map(|p| name.strip_prefix(p));
            stripped.unwrap_or(name).to_string()
        };
        let tail = n.strip_prefix(within)?;
        let skip = skip_prefixes.iter().any(|p| tail.starts_with(p)) || skip_names.contains(&tail);
        (!skip).then_some(n)
    }
}

/// A BERT-family checkpoint's id buffers, which are not parameters.
pub const TEXT_ID_BUFFERS: &[&str] = &["embeddings.position_ids", "embeddings.token_type_ids"];

/// An LM head's decoder, the tied word-embedding matrix (and its bias,
/// which the head holds under its own name): not loaded.
pub const TIED_DECODER: &[&str] = &["decoder.weight", "decoder.bias"];

/// [`CheckpointLayout::read_arch`] as a function.
pub type ReadArch = fn(&Path) -> Result<Option<CheckpointArch>>;

/// [`CheckpointLayout::export`] as a function.
pub type Export = fn(&ExportContext<'_>) -> Result<Option<ExportFiles>>;

/// A plugin's checkpoint layout as data; the registered
/// [`CheckpointLayout`].
pub struct HubLayout {
    pub model_types: &'static [&'static str],
    pub architectures: &'static [&'static str],
    pub names: NameMap,
    /// Parameters new by design when a checkpoint lacks them (names that
    /// contain this, ALBEF's `.crossattention.`).
    pub new_by_design: Option<&'static str>,
    /// A position table over a square patch grid that a checkpoint at
    /// another resolution has interpolated
    /// ([`interpolate_grid_positions`](crate::hf::interpolate_grid_positions)).
    pub grid_positions: Option<&'static str>,
    /// The checkpoint as the plugin's section; `None`: `init = DIR`
    /// ([`CheckpointLayout::read_arch`]'s default).
    pub read_arch: Option<ReadArch>,
    /// The plugin in the hub layout; `None`: `transformers` has no class
    /// for it.
    pub export: Option<Export>,
}

impl HubLayout {
    /// A layout loading `model_types` (checkpoints of `architectures`)
    /// through `names`; nothing new by design, no position grid, the
    /// default `read_arch`, no export.
    pub const fn new(
        model_types: &'static [&'static str],
        architectures: &'static [&'static str],
        names: NameMap,
    ) -> HubLayout {
        HubLayout {
            model_types,
            architectures,
            names,
            new_by_design: None,
            grid_positions: None,
            read_arch: None,
            export: None,
        }
    }

    /// The same, with parameters whose names contain `part` new by design.
    pub const fn with_new_by_design(self, part: &'static str) -> HubLayout {
        HubLayout {
            new_by_design: Some(part),
            ..self
        }
    }

    /// The same, with `param` the position table over a patch grid.
    pub const fn with_grid_positions(self, param: &'static str) -> HubLayout {
        HubLayout {
            grid_positions: Some(param),
            ..self
        }
    }

    /// The same, describing a checkpoint as the plugin's section by `read`.
    pub const fn with_read_arch(self, read: ReadArch) -> HubLayout {
        HubLayout {
            read_arch: Some(read),
            ..self
        }
    }

    /// The same, exporting by `export`.
    pub const fn with_export(self, export: Export) -> HubLayout {
        HubLayout {
            export: Some(export),
            ..self
        }
    }
}

/// The trait's defaults, to fall back on.
struct Defaults;

impl CheckpointLayout for Defaults {
    fn model_types(&self) -> &'static [&'static str] {
        &[]
    }
    fn map_name(&self, _ctx: &LoadContext<'_>, _name: &str) -> Option<String> {
        None
    }
}

impl CheckpointLayout for HubLayout {
    fn model_types(&self) -> &'static [&'static str] {
        self.model_types
    }

    fn architectures(&self) -> &'static [&'static str] {
        self.architectures
    }

    fn map_name(&self, ctx: &LoadContext<'_>, name: &str) -> Option<String> {
        self.names.map(ctx, name)
    }

    fn is_new(&self, param: &str) -> bool {
        self.new_by_design.is_some_and(|p| param.contains(p))
    }

    fn resize(&self, param: &str, tensor: &Tensor, target: &[i64]) -> Option<Tensor> {
        (Some(param) == self.grid_positions)
            .then(|| crate::hf::interpolate_grid_positions(tensor, target))
            .flatten()
    }

    fn read_arch(&self, dir: &Path) -> Result<Option<CheckpointArch>> {
        match self.read_arch {
            Some(read) => read(dir),
            None => Defaults.read_arch(dir),
        }
    }

    fn export(&self, ctx: &ExportContext<'_>) -> Result<Option<ExportFiles>> {
        match self.export {
            Some(export) => export(ctx),
            None => Defaults.export(ctx),
        }
    }
}

/// `config.json` for `transformers`' `architecture` of `model_type`: every
/// key of the resolved architecture `cfg` under its own name, then the
/// run's (`run`, which wins: the tokenizer's size, the resolution), and
/// `initializer_range` 0.02.
pub fn hub_config<C: Serialize>(
    model_type: &str,
    architecture: &str,
    cfg: &C,
    run: Value,
) -> Value {
    let mut config = match serde_json::to_value(cfg).expect("a resolved architecture serialises") {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    config.insert("model_type".into(), model_type.into());
    config.insert("architectures".into(), json!([architecture]));
    config.insert("initializer_range".into(), json!(0.02));
    if let Value::Object(run) = run {
        config.extend(run);
    }
    Value::Object(config)
}

/// The plugin's export: `config`, its tensors under their own names, and
/// `files`.
pub fn export_files(
    ctx: &ExportContext<'_>,
    config: Value,
    files: Vec<(String, Value)>,
) -> Result<Option<ExportFiles>> {
    Ok(Some(ExportFiles {
        config,
        tensors: ctx.tensors_prefixed(""),
        files,
    }))
}

/// `preprocessor_config.json` for image processor `class` holding the
/// run's normalisation (bicubic resize, rescale to [0, 1]), with `sizes`
/// (the processor's own resize and crop keys).
pub fn image_processor(ctx: &ExportContext<'_>, class: &str, sizes: Value) -> (String, Value) {
    let mut p = json!({
        "image_processor_type": class,
        "do_resize": true,
        "resample": 3,
        "do_rescale": true,
        "rescale_factor": 1.0 / 255.0,
        "do_normalize": true,
        "image_mean": ctx.mean,
        "image_std": ctx.std,
    });
    if let (Value::Object(p), Value::Object(sizes)) = (&mut p, sizes) {
        p.extend(sizes);
    }
    ("preprocessor_config.json".into(), p)
}

/// What a checkpoint directory describes for an LM head: its section, the
/// head's epsilon.
pub fn head_arch(layer_norm_eps: f64) -> Result<Option<CheckpointArch>> {
    let mut section = Map::new();
    section.insert("layer_norm_eps".into(), layer_norm_eps.into());
    Ok(Some(CheckpointArch {
        section,
        max_text_len: None,
        vocab_size: None,
    }))
}

/// What a checkpoint directory describes for a text encoder: the section
/// `init = DIR`, its longest text and vocabulary size.
pub fn text_arch(
    dir: &Path,
    max_text_len: i64,
    vocab_size: Option<i64>,
) -> Result<Option<CheckpointArch>> {
    let mut section = Map::new();
    section.insert("init".into(), Value::String(dir.display().to_string()));
    Ok(Some(CheckpointArch {
        section,
        max_text_len: Some(max_text_len),
        vocab_size,
    }))
}
