//! HuggingFace hub-layout directories (`config.json` + `model.safetensors`):
//! resolving an architecture from `config.json` against vlmatch's config
//! ([`resolve_arch`]), the [`hf_arch!`](crate::hf_arch) macro that defines an
//! encoder's config section and resolved architecture from one field list,
//! and resizing position embeddings to another resolution.

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use std::path::Path;
use vlmatch_core::{Error, Result};
use vlmatch_registry::check;
use vlmatch_registry::weights::check_model_type;

/// How a plugin resolves a section that may start from a checkpoint: the
/// checkpoint's `model_type` must be one of `model_types`
/// ([`check_model_type`]), the architecture comes from [`resolve_arch`]
/// with `nested` and `take_first_layers` ([`ArchSource`]), and the
/// plugin's check errors name the checkpoint ([`check::with_init`]); with
/// `only_gelu`, `hidden_act` must be `gelu`.
#[derive(Debug, Clone, Copy)]
pub struct Resolve<'a> {
    pub plugin: &'a str,
    pub model_types: &'a [&'a str],
    pub nested: Option<&'a str>,
    pub take_first_layers: bool,
    /// The layers have no activation but GELU: `hidden_act` must be `gelu`
    /// ([`only_gelu`], after the plugin's check).
    pub only_gelu: bool,
}

impl<'a> Resolve<'a> {
    /// `plugin`, loading the `model_type`s of `layout`, its architecture at
    /// the top level of `config.json` with every layer.
    pub fn new(plugin: &'a str, layout: &'a crate::layout::HubLayout) -> Self {
        Resolve {
            plugin,
            model_types: layout.model_types,
            nested: None,
            take_first_layers: false,
            only_gelu: false,
        }
    }

    /// The architecture is `config.json`'s object `name` (CLIP's
    /// `vision_config`).
    pub fn nested(self, name: &'a str) -> Self {
        Resolve {
            nested: Some(name),
            ..self
        }
    }

    /// A section may take a checkpoint's first layers (ALBEF's split).
    pub fn first_layers(self) -> Self {
        Resolve {
            take_first_layers: true,
            ..self
        }
    }

    /// `hidden_act` must be `gelu`.
    pub fn only_gelu(self) -> Self {
        Resolve {
            only_gelu: true,
            ..self
        }
    }

    /// `resolve` from the section `key` with checkpoint `init`, then `check`.
    pub fn run<T: serde::Serialize>(
        &self,
        key: &str,
        init: Option<&Path>,
        resolve: impl FnOnce(ArchSource<'_>) -> Result<T>,
        check: impl FnOnce(&T, &str) -> Result<()>,
    ) -> Result<T> {
        check_model_type(key, self.plugin, init, self.model_types)?;
        let cfg = resolve(ArchSource {
            init,
            nested: self.nested,
            take_first_layers: self.take_first_layers,
        })?;
        check::with_init(check(&cfg, key), init)?;
        if self.only_gelu {
            let keys = serde_json::to_value(&cfg).expect("a resolved architecture serialises");
            only_gelu(self.plugin, keys["hidden_act"].as_str().unwrap_or_default())?;
        }
        Ok(cfg)
    }
}

/// `hidden_act` must be `gelu`, the only activation of `plugin`'s layers.
pub fn only_gelu(plugin: &str, hidden_act: &str) -> Result<()> {
    if hidden_act == "gelu" {
        return Ok(());
    }
    Err(Error::plugin(
        plugin,
        format!("hidden_act `{hidden_act}` is not supported (only `gelu`)"),
    ))
}

/// A config section an encoder is built from (an [`hf_arch!`](crate::hf_arch)
/// section with `init`): its resolved architecture and checkpoint.
pub trait ArchSection: DeserializeOwned {
    /// The resolved architecture.
    type Arch;
    /// The architecture the section `key` describes, checked.
    fn resolve(&self, key: &str) -> Result<Self::Arch>;
    /// The checkpoint directory it starts from (`init`).
    fn init(&self) -> Option<&Path>;
}

/// A resolved architecture's own checks (its config's `check`); errors
/// name `{key}.<field>`.
pub trait CheckedArch {
    fn check_arch(&self, key: &str) -> Result<()>;
}

/// Where a section's architecture comes from ([`resolve_arch`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct ArchSource<'a> {
    /// A hub-layout directory whose `config.json` gives the architecture.
    pub init: Option<&'a Path>,
    /// The object of `config.json` that holds it, when present (CLIP's
    /// `vision_config` in a `CLIPModel` directory); else its top level.
    pub nested: Option<&'a str>,
    /// With `init`, a `num_hidden_layers` the section sets may be fewer than
    /// the checkpoint's: the first layers are taken (ALBEF's split of one
    /// BERT into text and fusion layers).
    pub take_first_layers: bool,
}

/// The architecture `T` for the config section `key`: from `init`'s
/// `config.json` when given, with every key the section also sets required
/// to agree (see [`ArchSource::take_first_layers`]); otherwise from the
/// section's keys alone; `defaults` fill what neither sets. `section` holds
/// the section's architecture keys that were set (nulls are ignored).
pub fn resolve_arch<T: DeserializeOwned>(
    key: &str,
    source: ArchSource<'_>,
    section: Map<String, Value>,
    defaults: Map<String, Value>,
) -> Result<T> {
    let mut section: Map<String, Value> =
        section.into_iter().filter(|(_, v)| !v.is_null()).collect();
    let taken = match source.init {
        Some(_) if source.take_first_layers => {
            section.remove("num_hidden_layers").and_then(|v| v.as_i64())
        }
        _ => None,
    };
    let mut merged = match source.init {
        None => section,
        Some(dir) => {
            let file = dir.join("config.json");
            let text = std::fs::read_to_string(&file).map_err(|e| {
                Error::Config(format!(
                    "config key `{key}.init`: cannot read {}: {e}",
                    file.display()
                ))
            })?;
            let mut base: Map<String, Value> =
                serde_json::from_str(&text).map_err(|e| Error::Data {
                    path: file.clone(),
                    line: Some(e.line()),
                    message: format!("invalid config.json: {e}"),
                })?;
            if let Some(Value::Object(inner)) = source.nested.and_then(|n| base.get(n)) {
                base = inner.clone();
            }
            for (k, v) in section {
                match base.get(&k) {
                    Some(b) if !same_number_or_value(b, &v) => {
                        return Err(Error::Config(format!(
                            "config key `{key}.{k}` = {v} contradicts {} ({k} = {b}); remove the key or the init",
                            file.display()
                        )))
                    }
                    _ => {
                        base.insert(k, v);
                    }
                }
            }
            base
        }
    };
    for (k, v) in defaults {
        if merged.get(&k).is_none_or(Value::is_null) {
            merged.insert(k, v);
        }
    }
    if let Some(n) = taken {
        let have = merged
            .get("num_hidden_layers")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        if n > have || n < 1 {
            return Err(Error::Config(format!(
                "config key `{key}.num_hidden_layers` = {n}: the checkpoint has {have} layers; \
                 use 1 to {have} (the first layers are taken)"
            )));
        }
        merged.insert("num_hidden_layers".into(), n.into());
    }
    serde_json::from_value(Value::Object(merged)).map_err(|e| {
        let from = source
            .init
            .map(|d| format!(" with {}/config.json", d.display()))
            .unwrap_or_default();
        Error::Config(format!("config key `{key}`{from}: {e}"))
    })
}

fn same_number_or_value(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-12 * x.abs().max(1.0),
        _ => a == b,
    }
}

/// A value of an architecture key: a number a section sets must be finite
/// (a NaN would serialise as null, that is as unset, on its way to the
/// resolved architecture).
pub trait ArchValue {
    fn check_finite(&self, key: &str) -> Result<()> {
        let _ = key;
        Ok(())
    }
}

impl ArchValue for f64 {
    fn check_finite(&self, key: &str) -> Result<()> {
        if self.is_finite() {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "config key `{key}`: must be a finite number, got {self}"
            )))
        }
    }
}
impl ArchValue for i64 {}
impl ArchValue for bool {}
impl ArchValue for String {}
impl<T: ArchValue> ArchValue for Option<T> {
    fn check_finite(&self, key: &str) -> Result<()> {
        self.as_ref().map_or(Ok(()), |v| v.check_finite(key))
    }
}

/// An encoder's config section and its resolved architecture, from one
/// list of architecture keys (each named, typed, documented and defaulted
/// once):
///
/// ```text
/// vlmatch_layers::hf_arch! {
///     /// `[model.text]` for `plugin = "bert"`.
///     pub struct BertSection {
///         #[serde(default, skip_serializing)]
///         pub init: Option<PathBuf>,          // keys of the section only
///     }
///     /// A resolved BERT architecture.
///     pub struct BertConfig {
///         pub hidden_size: i64,               // required
///         pub layer_norm_eps: f64 = 1e-12,    // with a default
///     }
///     from_checkpoint {
///         pub vocab_size: Option<i64> = None, // read from config.json only
///     }
/// }
/// ```
///
/// The section (`#[serde(deny_unknown_fields)]`, `Default`) holds its own
/// keys plus each architecture key as an `Option`; the config holds each
/// architecture and checkpoint key resolved, and serialises under the same
/// names (as [`LayerKeys::of`](crate::arch::LayerKeys::of) reads them).
/// `Config::defaults()` gives the
/// defaults as JSON, and `Section::resolve_arch(key, source)` resolves
/// through [`resolve_arch`] (checkpoint, then section, then defaults). The
/// calling crate depends on `serde` and `serde_json`.
///
/// `pub struct Section: init { ... }` is an encoder's section that may
/// start from a checkpoint. It adds the keys `init` (a hub-layout
/// directory) and `allow_partial_init` (let `init` leave parameters
/// missing), with `Section::from_init(dir)` and `Section::resolve_checked`
/// ([`Resolve`]); it is followed by `resolve = <a Resolve>;`, which gives
/// `Section::resolve(key)` (through the config's own `check(&self, key)`)
/// and the [`ArchSection`] and [`CheckedArch`] impls; and the config's
/// list starts with `layer_sizes,` (the four sizes every HuggingFace
/// transformer config has, `hidden_size`, `num_hidden_layers`,
/// `num_attention_heads`, `intermediate_size`, all required) or
/// `layer_sizes(768, 12, 12, 3072),` (the same with those defaults).
#[macro_export]
macro_rules! hf_arch {
    (
        $(#[$smeta:meta])*
        pub struct $section:ident : init {
            $( $(#[$xmeta:meta])* pub $x:ident : $xt:ty, )*
        }
        resolve = $how:expr;
        $(#[$cmeta:meta])*
        pub struct $config:ident {
            layer_sizes $( ($h:expr, $l:expr, $a:expr, $i:expr) )?,
            $($cbody:tt)*
        }
        from_checkpoint { $($kbody:tt)* }
    ) => {
        $crate::hf_arch! {
            $(#[$smeta])*
            pub struct $section {
                #[serde(default, skip_serializing)]
                pub init: Option<std::path::PathBuf>,
                /// Let `init` leave parameters missing (they keep their random init).
                #[serde(default, skip_serializing)]
                pub allow_partial_init: bool,
                $( $(#[$xmeta])* pub $x : $xt, )*
            }
            $(#[$cmeta])*
            pub struct $config {
                pub hidden_size: i64 $(= $h)?,
                pub num_hidden_layers: i64 $(= $l)?,
                pub num_attention_heads: i64 $(= $a)?,
                pub intermediate_size: i64 $(= $i)?,
                $($cbody)*
            }
            from_checkpoint { $($kbody)* }
        }

        impl $section {
            /// The architecture this section describes: `init`'s
            /// `model_type` checked, then the config's `check`.
            pub fn resolve(&self, key: &str) -> vlmatch_core::Result<$config> {
                self.resolve_checked(key, $how, $config::check)
            }
        }

        impl $crate::hf::ArchSection for $section {
            type Arch = $config;
            fn resolve(&self, key: &str) -> vlmatch_core::Result<$config> {
                $section::resolve(self, key)
            }
            fn init(&self) -> Option<&std::path::Path> {
                self.init.as_deref()
            }
        }

        impl $crate::hf::CheckedArch for $config {
            fn check_arch(&self, key: &str) -> vlmatch_core::Result<()> {
                $config::check(self, key)
            }
        }

        impl $section {
            /// The section `init = dir`, every other key unset.
            pub fn from_init(dir: &std::path::Path) -> Self {
                $section {
                    init: Some(dir.to_path_buf()),
                    ..Default::default()
                }
            }

            /// The architecture this section describes, `init`'s
            /// `model_type` checked and `check` applied
            /// ([`$crate::hf::Resolve`]).
            pub fn resolve_checked(
                &self,
                key: &str,
                how: $crate::hf::Resolve<'_>,
                check: impl FnOnce(&$config, &str) -> vlmatch_core::Result<()>,
            ) -> vlmatch_core::Result<$config> {
                how.run(key, self.init.as_deref(), |source| self.resolve_arch(key, source), check)
            }
        }
    };
    (
        $(#[$smeta:meta])*
        pub struct $section:ident {
            $( $(#[$xmeta:meta])* pub $x:ident : $xt:ty, )*
        }
        $(#[$cmeta:meta])*
        pub struct $config:ident {
            $( $(#[$ameta:meta])* pub $a:ident : $at:ty $(= $ad:expr)? , )*
        }
        from_checkpoint {
            $( $(#[$kmeta:meta])* pub $k:ident : $kt:ty = $kd:expr , )*
        }
    ) => {
        $(#[$smeta])*
        #[derive(Debug, Clone, Default, serde::Deserialize, serde::Serialize)]
        #[serde(deny_unknown_fields)]
        pub struct $section {
            $( $(#[$xmeta])* pub $x: $xt, )*
            $( $(#[$ameta])* #[serde(default)] pub $a: Option<$at>, )*
        }

        $(#[$cmeta])*
        #[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
        pub struct $config {
            $( $(#[$ameta])* pub $a: $at, )*
            $( $(#[$kmeta])* pub $k: $kt, )*
        }

        impl $config {
            /// The defaults of the keys that have one, as `config.json`
            /// would write them.
            pub fn defaults() -> serde_json::Map<String, serde_json::Value> {
                #[allow(unused_mut)]
                let mut m = serde_json::Map::new();
                $( $(
                    let v: $at = $ad.into();
                    m.insert(
                        stringify!($a).into(),
                        serde_json::to_value(v).expect("a default serialises"),
                    );
                )? )*
                $(
                    let v: $kt = $kd.into();
                    m.insert(
                        stringify!($k).into(),
                        serde_json::to_value(v).expect("a default serialises"),
                    );
                )*
                m
            }
        }

        impl $section {
            /// The architecture keys this section sets, each checked to be
            /// finite where it is a number; errors name `{key}.<field>`.
            pub fn arch_keys(
                &self,
                key: &str,
            ) -> vlmatch_core::Result<serde_json::Map<String, serde_json::Value>> {
                #[allow(unused_mut)]
                let mut m = serde_json::Map::new();
                $(
                    if let Some(v) = &self.$a {
                        $crate::hf::ArchValue::check_finite(
                            v,
                            &format!("{key}.{}", stringify!($a)),
                        )?;
                        m.insert(
                            stringify!($a).into(),
                            serde_json::to_value(v).expect("a config value serialises"),
                        );
                    }
                )*
                Ok(m)
            }

            /// The architecture this section describes, from `source`
            /// ([`$crate::hf::resolve_arch`]).
            pub fn resolve_arch(
                &self,
                key: &str,
                source: $crate::hf::ArchSource<'_>,
            ) -> vlmatch_core::Result<$config> {
                $crate::hf::resolve_arch(key, source, self.arch_keys(key)?, $config::defaults())
            }
        }
    };
}

/// Learned position embeddings over a square patch grid, `[1, 1 + g*g, D]`
/// (ViT's `embeddings.position_embeddings`) or `[1 + g*g, D]` (CLIP's
/// `embeddings.position_embedding.weight`), resized to the model's `target`
/// shape of the same form: the `[CLS]` position kept, the grid resized
/// bicubically (`align_corners = false`), as timm and ALBEF do to fine-tune
/// at another resolution. `None` when the shapes already agree or are not
/// of that form.
pub fn interpolate_grid_positions(t: &tch::Tensor, target: &[i64]) -> Option<tch::Tensor> {
    use tch::{Kind, Tensor};
    if t.size() == target {
        return None;
    }
    if t.dim() == 2 && target.len() == 2 {
        let target = [1, target[0], target[1]];
        return interpolate_grid_positions(&t.unsqueeze(0), &target).map(|t| t.squeeze_dim(0));
    }
    if t.dim() != 3 || target.len() != 3 {
        return None;
    }
    let (n_old, d) = (t.size()[1] - 1, t.size()[2]);
    let n_new = target[1] - 1;
    let side = |n: i64| (1..=n).find(|s| s * s == n);
    let (g, h) = (side(n_old)?, side(n_new)?);
    if target[2] != d || target[0] != 1 || t.size()[0] != 1 {
        return None;
    }
    let cls = t.narrow(1, 0, 1);
    let grid = t
        .narrow(1, 1, n_old)
        .reshape([1, g, g, d])
        .permute([0, 3, 1, 2]);
    let grid = grid
        .to_kind(Kind::Float)
        .upsample_bicubic2d([h, h], false, None, None)
        .permute([0, 2, 3, 1])
        .reshape([1, h * h, d]);
    Some(Tensor::cat(&[cls.to_kind(Kind::Float), grid], 1))
}
