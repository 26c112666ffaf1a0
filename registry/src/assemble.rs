//! Building a model and its objectives from configuration.

use crate::config::LoadedConfig;
use crate::{Factory, Kind, Registry};
use std::rc::Rc;
use tch::{nn, Device, Kind as DType};
use vlmatch_core::{
    ContrastiveHead, Discriminator, Encoder, Error, Generator, Modality, NegativeSampler,
    Objective, Result, SpecialTokens, TextCodec, VlModel,
};

/// Facts about the run that plugins build against, fixed before assembly.
#[derive(Clone)]
pub struct ModelEnv {
    pub vocab_size: i64,
    pub special: SpecialTokens,
    /// The tokenizer, for plugins that write text.
    pub text: Rc<dyn TextCodec>,
    /// Square input resolution (`data.image_size`).
    pub image_size: i64,
    /// Maximum text length (`data.max_len`).
    pub max_text_len: i64,
    pub device: Device,
    /// dtype of matmuls and attention: `Float`, or `BFloat16` on CUDA.
    pub compute: DType,
    /// Loads a HuggingFace masked language model (`BertForMaskedLM` layout,
    /// with its own tokenizer) from a directory: the host's service for
    /// plugins that fill text with a fixed model (NegGen's `fill_model`).
    /// `None` where the host offers none.
    pub masked_lm: Option<MaskedLmLoader>,
}

/// See [`ModelEnv::masked_lm`]: `(directory, device, compute dtype)`.
pub type MaskedLmLoader = fn(&std::path::Path, Device, DType) -> Result<MaskedLm>;

/// A frozen masked language model with its own tokenizer, loaded from a
/// checkpoint directory. It is not part of the trained model: its weights
/// live in their own `VarStore`, are never updated and never checkpointed.
pub struct MaskedLm {
    pub encoder: Rc<dyn Encoder>,
    pub head: Rc<dyn Generator>,
    /// Its tokenizer (which need not be the run's).
    pub codec: Rc<dyn TextCodec>,
    /// The longest input it takes, in tokens.
    pub max_len: usize,
    /// What was loaded, for the log.
    pub report: String,
    /// Owns the weights.
    pub store: nn::VarStore,
}

/// Widths of the encoders built so far, for the components that read them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Widths {
    pub image: Option<i64>,
    pub text: Option<i64>,
    pub fusion: Option<i64>,
}

/// What a plugin factory gets: where to put its parameters, its own config
/// section, the run facts, and access to other plugins (objectives build
/// their negative samplers through it).
pub struct BuildContext<'a> {
    /// The plugin's parameters go under this path (and so on its device).
    pub path: nn::Path<'a>,
    /// The plugin's registered name.
    pub plugin: &'a str,
    /// The dotted config key of its section (`model.image`).
    pub key: String,
    pub env: &'a ModelEnv,
    pub widths: Widths,
    registry: &'a Registry,
    config: Sections<'a>,
    /// The text encoder, once built (generators tie their decoder to its
    /// word embeddings).
    pub text_encoder: Option<Rc<dyn Encoder>>,
    /// The model, for objectives and samplers (built after it).
    pub model: Option<&'a VlModel>,
}

impl<'a> BuildContext<'a> {
    /// This plugin's config section as `T` (use `#[serde(deny_unknown_fields)]`
    /// so a typo is an error naming the key and file).
    pub fn params<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        crate::config::section_of(self.config.figment, self.config.stale, &self.key)
    }

    /// A context for building one plugin outside a run (a frozen fill
    /// model's text encoder and head, [`crate::weights::build_masked_lm`]):
    /// its section is `key` in `sections`, and it cannot build generators or
    /// samplers of a run.
    pub(crate) fn standalone(
        path: nn::Path<'a>,
        plugin: &'a str,
        key: &str,
        env: &'a ModelEnv,
        registry: &'a Registry,
        sections: Sections<'a>,
        text_encoder: Option<Rc<dyn Encoder>>,
    ) -> Self {
        BuildContext {
            path,
            plugin,
            key: key.to_string(),
            env,
            widths: Widths::default(),
            registry,
            config: sections,
            text_encoder,
            model: None,
        }
    }

    /// The last component of the section key: an objective's loss name.
    pub fn section_name(&self) -> &str {
        self.key.rsplit('.').next().unwrap_or(&self.key)
    }

    /// The width of states from a role, or an error saying it is missing.
    pub fn width(&self, role: &str) -> Result<i64> {
        let w = match role {
            "image" => self.widths.image,
            "text" => self.widths.text,
            "fusion" => self.widths.fusion,
            _ => None,
        };
        w.ok_or_else(|| {
            Error::plugin(
                self.plugin,
                format!("needs the {role} encoder's width, which is not built yet"),
            )
        })
    }

    /// Build an extra encoder from the plugin section at `key` (for example a
    /// separate VL-RTD generator encoder), its parameters under `path`.
    pub fn encoder(
        &self,
        key: &str,
        expected: Modality,
        path: nn::Path<'a>,
    ) -> Result<Rc<dyn Encoder>> {
        let plugin: String = self
            .config
            .figment
            .extract_inner(&format!("{key}.plugin"))
            .map_err(|e| {
                Error::Config(crate::config::describe_error(e, self.config.figment, &[]))
            })?;
        let entry = self
            .registry
            .get(Kind::Encoder, &plugin, &format!("{key}.plugin"))?;
        let Factory::Encoder(build) = entry.factory else {
            unreachable!("kind checked")
        };
        let ctx = BuildContext {
            path,
            plugin: &entry.name,
            key: key.to_string(),
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: None,
            model: None,
        };
        let enc = build(&ctx)?;
        if enc.modality() != expected {
            return Err(Error::Config(format!(
                "config key `{key}.plugin`: `{plugin}` is a {:?} encoder, expected a {expected:?} encoder",
                enc.modality()
            )));
        }
        Ok(enc)
    }

    /// Build another instance of the model's generator (`[model.generator]`)
    /// tied to `text`, its parameters under `path`.
    pub fn generator(
        &self,
        text: Rc<dyn Encoder>,
        path: nn::Path<'a>,
    ) -> Result<Rc<dyn Generator>> {
        let generator = self.config.config.and_then(|c| c.model.generator.as_ref());
        let section = generator.ok_or_else(|| {
            Error::Config(format!(
                "config key `{}`: needs `[model.generator]` (e.g. plugin = \"mlm_head\")",
                self.key
            ))
        })?;
        let entry =
            self.registry
                .get(Kind::Generator, &section.plugin, "model.generator.plugin")?;
        let Factory::Generator(build) = entry.factory else {
            unreachable!("kind checked")
        };
        let ctx = BuildContext {
            path,
            plugin: &entry.name,
            key: "model.generator".to_string(),
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: Some(text),
            model: None,
        };
        build(&ctx)
    }

    /// Build the negative sampler configured as `[samplers.<name>]`.
    pub fn negative_sampler(&self, name: &str) -> Result<Box<dyn NegativeSampler>> {
        let samplers = self.config.config.map(|c| &c.samplers);
        let section = samplers.and_then(|s| s.get(name)).ok_or_else(|| {
            let known: Vec<&String> = samplers.into_iter().flat_map(|s| s.keys()).collect();
            Error::Config(format!(
                "config key `{}`: sampler `{name}` has no `[samplers.{name}]` section (configured samplers: {known:?})",
                self.key
            ))
        })?;
        let key = format!("samplers.{name}");
        let entry = self.registry.get(
            Kind::NegativeSampler,
            &section.plugin,
            &format!("{key}.plugin"),
        )?;
        let build = match entry.factory {
            Factory::NegativeSampler(build) => build,
            Factory::DynamicSampler(spec) => {
                let json = self
                    .config
                    .figment
                    .find_value(&key)
                    .ok()
                    .and_then(|v| serde_json::to_string(&v).ok())
                    .unwrap_or_else(|| "{}".into());
                let instance =
                    crate::dynamic::DynamicSamplerInstance::new(spec, &json, &entry.name)?;
                return Ok(Box::new(crate::dynamic::HostSampler::new(
                    instance,
                    self.env.text.clone(),
                )));
            }
            _ => unreachable!("kind checked"),
        };
        let ctx = BuildContext {
            path: &self.path / "samplers" / name,
            plugin: &entry.name,
            key,
            env: self.env,
            widths: self.widths,
            registry: self.registry,
            config: self.config,
            text_encoder: self.text_encoder.clone(),
            model: self.model,
        };
        build(&ctx)
    }
}

/// An objective with its name (the config section) and loss weight.
pub struct WeightedObjective {
    pub name: String,
    pub weight: f64,
    pub objective: Box<dyn Objective>,
}

/// A built model: its variables, the model, and the objectives to train.
pub struct Assembly {
    pub vs: nn::VarStore,
    pub model: VlModel,
    pub objectives: Vec<WeightedObjective>,
}

impl Assembly {
    /// The number of trainable parameters.
    pub fn trainable_parameters(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// The per-caption CPU work the objectives' samplers want the data
    /// loader to do (`NegativeSampler::caption_prep`).
    pub fn caption_preps(&self) -> Vec<std::sync::Arc<dyn vlmatch_core::CaptionPrep>> {
        self.objectives
            .iter()
            .flat_map(|o| o.objective.caption_preps())
            .collect()
    }
}

fn context<'a>(
    registry: &'a Registry,
    config: &'a LoadedConfig,
    env: &'a ModelEnv,
    root: &nn::Path<'a>,
    key: &str,
    plugin: &'a str,
    widths: Widths,
) -> BuildContext<'a> {
    BuildContext {
        path: root.clone(),
        plugin,
        key: key.to_string(),
        env,
        widths,
        registry,
        config: Sections::from(config),
        text_encoder: None,
        model: None,
    }
}

/// Where a [`BuildContext`] reads plugin sections: a run's config, or
/// (outside a run) a figment holding only the sections being built.
#[derive(Clone, Copy)]
pub(crate) struct Sections<'a> {
    figment: &'a figment::Figment,
    stale: Option<&'a std::collections::BTreeSet<String>>,
    config: Option<&'a crate::Config>,
}

impl<'a> Sections<'a> {
    pub(crate) fn standalone(figment: &'a figment::Figment) -> Self {
        Sections {
            figment,
            stale: None,
            config: None,
        }
    }
}

impl<'a> From<&'a LoadedConfig> for Sections<'a> {
    fn from(c: &'a LoadedConfig) -> Self {
        Sections {
            figment: &c.figment,
            stale: Some(&c.stale),
            config: Some(&c.config),
        }
    }
}

/// Build the encoder of a model role (`image`, `text`, `fusion`) under its
/// parameter prefix (`vision_encoder`, `text_encoder`, `fusion`).
fn encoder(
    registry: &Registry,
    config: &LoadedConfig,
    env: &ModelEnv,
    root: &nn::Path<'_>,
    role: &str,
    expected: Modality,
    widths: Widths,
) -> Result<Rc<dyn Encoder>> {
    let prefix = match role {
        "image" => "vision_encoder",
        "text" => "text_encoder",
        _ => "fusion",
    };
    let key = format!("model.{role}");
    let ctx = context(registry, config, env, root, &key, "model", widths);
    ctx.encoder(&key, expected, root / prefix)
}

/// Build the model and objectives that `config` names, on `env.device`.
/// A plugin's error about one of its keys (`config key `K`: ...`) gains the
/// layer that set the key.
pub fn assemble(registry: &Registry, config: &LoadedConfig, env: &ModelEnv) -> Result<Assembly> {
    assemble_inner(registry, config, env)
        .map_err(|e| crate::config::with_key_source(e, &config.figment))
}

/// The model alone, without objectives, in a fresh `VarStore` (the
/// momentum copy of ALBEF's momentum distillation).
pub fn assemble_model(
    registry: &Registry,
    config: &LoadedConfig,
    env: &ModelEnv,
) -> Result<(nn::VarStore, VlModel)> {
    let vs = nn::VarStore::new(env.device);
    let model = build_model(registry, config, env, &vs)
        .map_err(|e| crate::config::with_key_source(e, &config.figment))?;
    Ok((vs, model))
}

fn assemble_inner(registry: &Registry, config: &LoadedConfig, env: &ModelEnv) -> Result<Assembly> {
    let vs = nn::VarStore::new(env.device);
    let model = build_model(registry, config, env, &vs)?;
    let root = vs.root();
    let widths = Widths {
        image: Some(model.image.hidden_size()),
        text: Some(model.text.hidden_size()),
        fusion: Some(model.fusion.hidden_size()),
    };
    let mut objectives = Vec::new();
    for (name, section) in &config.config.objectives {
        if !section.enabled {
            continue;
        }
        let plugin = section.plugin.clone().unwrap_or_else(|| name.clone());
        let key = format!("objectives.{name}");
        let entry = registry.get(Kind::Objective, &plugin, &format!("{key}.plugin"))?;
        let Factory::Objective(build) = entry.factory else {
            unreachable!()
        };
        let mut ctx = context(registry, config, env, &root, &key, &entry.name, widths);
        ctx.path = &root / "objectives" / name.as_str();
        ctx.model = Some(&model);
        ctx.text_encoder = Some(model.text.clone());
        let objective = build(&ctx)?;
        objectives.push(WeightedObjective {
            name: name.clone(),
            weight: section.weight,
            objective,
        });
    }
    if objectives.is_empty() {
        return Err(Error::Config(
            "config: no `[objectives.*]` section; add at least one, e.g. `[objectives.itc]`".into(),
        ));
    }
    Ok(Assembly {
        vs,
        model,
        objectives,
    })
}

fn build_model(
    registry: &Registry,
    config: &LoadedConfig,
    env: &ModelEnv,
    vs: &nn::VarStore,
) -> Result<VlModel> {
    let root = vs.root();
    let mut widths = Widths::default();
    let image = encoder(
        registry,
        config,
        env,
        &root,
        "image",
        Modality::Image,
        widths,
    )?;
    widths.image = Some(image.hidden_size());
    let text = encoder(registry, config, env, &root, "text", Modality::Text, widths)?;
    widths.text = Some(text.hidden_size());
    let fusion = encoder(
        registry,
        config,
        env,
        &root,
        "fusion",
        Modality::Multimodal,
        widths,
    )?;
    widths.fusion = Some(fusion.hidden_size());

    let model_cfg = &config.config.model;
    let disc_entry = registry.get(
        Kind::Discriminator,
        &model_cfg.discriminator.plugin,
        "model.discriminator.plugin",
    )?;
    let Factory::Discriminator(build) = disc_entry.factory else {
        unreachable!()
    };
    let discriminator: Rc<dyn Discriminator> = build(&context(
        registry,
        config,
        env,
        &root,
        "model.discriminator",
        &disc_entry.name,
        widths,
    ))?;

    let generator: Option<Rc<dyn Generator>> = match &model_cfg.generator {
        None => None,
        Some(section) => {
            let entry = registry.get(Kind::Generator, &section.plugin, "model.generator.plugin")?;
            let Factory::Generator(build) = entry.factory else {
                unreachable!()
            };
            let mut ctx = context(
                registry,
                config,
                env,
                &root,
                "model.generator",
                &entry.name,
                widths,
            );
            ctx.path = &root / "generator";
            ctx.text_encoder = Some(text.clone());
            Some(build(&ctx)?)
        }
    };
    if model_cfg.embed_dim <= 0 {
        return Err(Error::Config(format!(
            "config key `model.embed_dim`: must be positive, got {}",
            model_cfg.embed_dim
        )));
    }
    let contrastive = ContrastiveHead::new(
        &root,
        image.hidden_size(),
        text.hidden_size(),
        model_cfg.embed_dim,
    );
    Ok(VlModel {
        image,
        text,
        fusion,
        contrastive,
        discriminator,
        generator,
        device: env.device,
    })
}
