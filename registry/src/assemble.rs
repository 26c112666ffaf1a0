//! Building a model and its objectives from configuration: what a run's
//! plugins are built against ([`ModelEnv`], [`Widths`], the config
//! [`Sections`] a [`crate::BuildContext`] reads) and what assembly yields
//! ([`Assembly`]); [`assemble`] and [`assemble_model`] (in `build`) do it.

use crate::config::LoadedConfig;
use std::rc::Rc;
use tch::{nn, Device, Kind as DType};
use vlmatch_core::{Encoder, Generator, Objective, Result, SpecialTokens, TextCodec, VlModel};

mod build;
pub use build::{assemble, assemble_model};

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
    /// Activation checkpointing (`vlmatch_core::checkpoint`): the host's
    /// service for the layer stacks of the roles that
    /// `train.activation_checkpointing` names
    /// ([`crate::BuildContext::checkpointer`]). `None` where the host
    /// offers none.
    pub checkpointer: Option<vlmatch_core::checkpoint::Checkpointer>,
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

/// Where a [`BuildContext`] reads plugin sections: a run's config, or
/// (outside a run) a figment holding only the sections being built.
#[derive(Clone, Copy)]
pub(crate) struct Sections<'a> {
    pub(crate) figment: &'a figment::Figment,
    pub(crate) stale: Option<&'a std::collections::BTreeSet<String>>,
    pub(crate) config: Option<&'a crate::Config>,
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
