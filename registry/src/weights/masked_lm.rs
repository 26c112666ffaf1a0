//! A masked language model built from a checkpoint directory alone (a
//! frozen fill model): the text encoder and LM head plugins whose layouts
//! load its `model_type` ([`plan_masked_lm`]), built from the sections
//! their layouts read from it ([`build_masked_lm`]).

use super::{model_type, CheckpointArch};
use crate::assemble::{ModelEnv, Sections};
use crate::{BuildContext, Factory, Kind, Registry};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use vlmatch_core::{Encoder, Error, Generator, Modality, Result};

/// The plugins that build a masked language model from `dir` alone: the
/// text encoder and the generator (LM head) whose layouts load its
/// `model_type`, each with its section ([`CheckpointLayout::read_arch`]).
pub struct MaskedLmPlan {
    pub dir: PathBuf,
    pub model_type: String,
    pub encoder: String,
    pub encoder_arch: CheckpointArch,
    pub generator: String,
    pub generator_arch: CheckpointArch,
}

/// Find the plugins for a masked LM directory; errors name the directory,
/// its `model_type` and the plugins that load it.
pub fn plan_masked_lm(registry: &Registry, dir: &Path) -> Result<MaskedLmPlan> {
    let config = dir.join("config.json");
    let Some(model_type) = model_type(dir) else {
        return Err(Error::Data {
            path: config,
            line: None,
            message: "no `model_type`: a fill model is a HuggingFace masked LM directory \
                      whose config.json names its model_type (e.g. `bert`, `roberta`)"
                .into(),
        });
    };
    let pick = |kind: Kind, what: &str| -> Result<(String, CheckpointArch)> {
        let mut found = Vec::new();
        for (name, layout) in registry.loading(kind, &model_type) {
            if let Some(arch) = layout.read_arch(dir)? {
                found.push((name.to_string(), arch));
            }
        }
        // Several: the one named after the model type, else ambiguous.
        if found.len() > 1 {
            if let Some(i) = found.iter().position(|(n, _)| *n == model_type) {
                return Ok(found.swap_remove(i));
            }
        }
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => Err(Error::Data {
                path: config.clone(),
                line: None,
                message: format!(
                    "model_type `{model_type}`: no {what} plugin loads it as a masked LM \
                     (registered {kind} layouts load: {})",
                    registry.loadable(kind).join(", ")
                ),
            }),
            _ => Err(Error::Data {
                path: config.clone(),
                line: None,
                message: format!(
                    "model_type `{model_type}`: several {what} plugins load it ({})",
                    found
                        .iter()
                        .map(|f| f.0.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    };
    let (encoder, encoder_arch) = pick(Kind::Encoder, "text encoder")?;
    let (generator, generator_arch) = pick(Kind::Generator, "generator")?;
    Ok(MaskedLmPlan {
        dir: dir.to_path_buf(),
        model_type,
        encoder,
        encoder_arch,
        generator,
        generator_arch,
    })
}

/// Build the text encoder (under `root / "text_encoder"`) and the generator
/// (under `root / "generator"`, tied to it) that `plan` names, from their
/// checkpoint sections, in `env`.
pub fn build_masked_lm(
    registry: &Registry,
    plan: &MaskedLmPlan,
    env: &ModelEnv,
    root: &tch::nn::Path<'_>,
) -> Result<(Rc<dyn Encoder>, Rc<dyn Generator>)> {
    let in_dir = |e: Error| match e {
        Error::Config(m) => Error::Config(format!("fill model {}: {m}", plan.dir.display())),
        other => other,
    };
    let figment = figment::Figment::new()
        .merge(figment::providers::Serialized::global(
            "fill_model.text",
            &plan.encoder_arch.section,
        ))
        .merge(figment::providers::Serialized::global(
            "fill_model.generator",
            &plan.generator_arch.section,
        ));
    let sections = Sections::standalone(&figment);
    let entry = registry.get(Kind::Encoder, &plan.encoder, "fill_model.text.plugin")?;
    let Factory::Encoder(build) = entry.factory else {
        unreachable!("kind checked")
    };
    let ctx = BuildContext::new(
        root / "text_encoder",
        &entry.name,
        "fill_model.text",
        env,
        registry,
        sections,
        None,
    );
    let text = build(&ctx).map_err(in_dir)?;
    if text.modality() != Modality::Text {
        return Err(Error::Config(format!(
            "fill model {}: plugin `{}` is not a text encoder",
            plan.dir.display(),
            plan.encoder
        )));
    }
    let entry = registry.get(
        Kind::Generator,
        &plan.generator,
        "fill_model.generator.plugin",
    )?;
    let Factory::Generator(build) = entry.factory else {
        unreachable!("kind checked")
    };
    let ctx = BuildContext::new(
        root / "generator",
        &entry.name,
        "fill_model.generator",
        env,
        registry,
        sections,
        Some(text.clone()),
    );
    let head = build(&ctx).map_err(in_dir)?;
    Ok((text, head))
}
