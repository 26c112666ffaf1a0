//! [`assemble`] and [`assemble_model`]: the model and objectives a config
//! names, each plugin built by its registered factory.

use super::{Assembly, ModelEnv, Sections, WeightedObjective, Widths};
use crate::config::LoadedConfig;
use crate::{BuildContext, Factory, Kind, Registry};
use std::rc::Rc;
use tch::nn;
use vlmatch_core::{
    ContrastiveHead, Discriminator, Encoder, Error, Generator, Modality, Result, VlModel,
};

fn context<'a>(
    registry: &'a Registry,
    config: &'a LoadedConfig,
    env: &'a ModelEnv,
    root: &nn::Path<'a>,
    key: &str,
    plugin: &'a str,
    widths: Widths,
) -> BuildContext<'a> {
    let mut ctx = BuildContext::new(
        root.clone(),
        plugin,
        key,
        env,
        registry,
        Sections::from(config),
        None,
    );
    ctx.widths = widths;
    ctx
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
