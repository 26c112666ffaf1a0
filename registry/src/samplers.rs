//! Negative samplers built outside training, by name, for what they offer
//! apart from `sample` (`NegativeSampler::candidates`,
//! `NegativeSampler::word_swapper`): a run's `[samplers.<name>]` over its
//! built model (offline generation, benchmarks), or a plugin with a section
//! of its own and no model (the matching evaluation's word swapper). The
//! host reaches sampler plugins only this way, never through their types.

use crate::assemble::{ModelEnv, Sections, Widths};
use crate::config::LoadedConfig;
use crate::{BuildContext, Factory, Kind, Registry};
use tch::nn;
use vlmatch_core::{Error, NegativeSampler, Result, VlModel};

/// The run's `[samplers.<name>]` for the built `model`. Any parameters it
/// creates live in a store of their own, not in the model's. An error
/// about one of its keys names the layer that set the key.
pub fn run_sampler(
    registry: &Registry,
    config: &LoadedConfig,
    env: &ModelEnv,
    model: &VlModel,
    name: &str,
) -> Result<Box<dyn NegativeSampler>> {
    let vs = nn::VarStore::new(env.device);
    let key = format!("samplers.{name}");
    let mut ctx = BuildContext::new(
        vs.root(),
        "host",
        &key,
        env,
        registry,
        Sections::from(config),
        Some(model.text.clone()),
    );
    ctx.model = Some(model);
    ctx.widths = Widths {
        image: Some(model.image.hidden_size()),
        text: Some(model.text.hidden_size()),
        fusion: Some(model.fusion.hidden_size()),
    };
    ctx.negative_sampler(name)
        .map_err(|e| crate::config::with_key_source(e, &config.figment))
}

/// Sampler plugin `plugin` with its section at `key` of `figment` (which
/// need hold nothing else; absent keys take the plugin's defaults), seeing
/// no model: for a sampler used on text alone.
pub fn standalone_sampler(
    registry: &Registry,
    plugin: &str,
    key: &str,
    figment: &figment::Figment,
    env: &ModelEnv,
) -> Result<Box<dyn NegativeSampler>> {
    let entry = registry.get(Kind::NegativeSampler, plugin, &format!("{key}.plugin"))?;
    let Factory::NegativeSampler(build) = entry.factory else {
        return Err(Error::Config(format!(
            "config key `{key}.plugin`: `{plugin}` is a sampler from a dynamic library, which \
             only samples in training"
        )));
    };
    let vs = nn::VarStore::new(env.device);
    let ctx = BuildContext::new(
        vs.root(),
        &entry.name,
        key,
        env,
        registry,
        Sections::standalone(figment),
        None,
    );
    build(&ctx)
}
