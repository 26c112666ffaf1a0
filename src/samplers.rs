//! Negative samplers the host uses outside training, built through the
//! registry by plugin name and used through `vlmatch_core::NegativeSampler`
//! (never through a plugin's types): a run's `[samplers.<name>]` over its
//! model (`vlmatch neggen`, `vlmatch bench`) and the `word_swap` swapper of
//! the matching evaluation.

use crate::tokenizer::Tokenizer;
use std::sync::Arc;
use vlmatch_core::{Error, NegativeSampler, Result, VlModel, WordSwapper};
use vlmatch_registry::{LoadedConfig, ModelEnv, Registry};

/// `sets` with `samplers.<name>.plugin = "<name>"` in front when `config`
/// has no `[samplers.<name>]`, so that the plugin of that name is built
/// with its defaults (and the `sets` on top).
pub fn sets_with_section(config: &LoadedConfig, name: &str, sets: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(sets.len() + 1);
    if !config.config.samplers.contains_key(name) {
        out.push(format!("samplers.{name}.plugin=\"{name}\""));
    }
    out.extend(sets.iter().cloned());
    out
}

/// The run's `[samplers.<name>]` over `model`, built on `env`.
pub fn run_sampler(
    config: &LoadedConfig,
    env: &ModelEnv,
    model: &VlModel,
    name: &str,
) -> Result<Box<dyn NegativeSampler>> {
    let registry = crate::libraries::registry(config)?;
    vlmatch_registry::run_sampler(&registry, config, env, model, name)
}

/// A `word_swap` sampler with `groups` (its default groups with `None`),
/// for its [`WordSwapper`] (`NegativeSampler::word_swapper`).
pub fn word_swap(groups: Option<&[Vec<String>]>) -> Result<Box<dyn NegativeSampler>> {
    let registry = Registry::from_inventory().map_err(|e| Error::Config(e.to_string()))?;
    let mut section = serde_json::json!({"plugin": "word_swap"});
    if let Some(g) = groups {
        section["groups"] = serde_json::json!(g);
    }
    let figment = figment::Figment::from(figment::providers::Serialized::global(
        "samplers.word_swap",
        section,
    ));
    // Swapping reads no text encoding; the built-in vocabulary stands in.
    let tok = Arc::new(Tokenizer::builtin());
    let env = ModelEnv {
        vocab_size: tok.vocab_size(),
        special: tok.special,
        text: std::rc::Rc::new(crate::tokenizer::Codec {
            tokenizer: tok,
            max_len: usize::MAX,
        }),
        image_size: 0,
        max_text_len: 0,
        device: tch::Device::Cpu,
        compute: tch::Kind::Float,
        masked_lm: None,
        checkpointer: None,
    };
    let sampler = vlmatch_registry::standalone_sampler(
        &registry,
        "word_swap",
        "samplers.word_swap",
        &figment,
        &env,
    )?;
    if sampler.word_swapper().is_none() {
        return Err(Error::plugin("word_swap", "is not a word swapper"));
    }
    Ok(sampler)
}

/// The groups `word_swap` swaps within by default.
pub fn word_swap_default_groups() -> Result<Vec<Vec<String>>> {
    Ok(swapper(word_swap(None)?.as_ref()).groups().to_vec())
}

/// `sampler` as a word swapper; for a sampler [`word_swap`] returned.
pub fn swapper(sampler: &dyn NegativeSampler) -> &dyn WordSwapper {
    sampler
        .word_swapper()
        .expect("word_swap checked it is a word swapper")
}
