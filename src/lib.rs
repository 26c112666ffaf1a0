//! vlmatch: VL-Match vision-language pretraining (ITC, VL-RTD, FG-ITM,
//! NegGen) as a plugin toolkit on libtorch. This crate holds the trainer,
//! the data pipeline, evaluation and the `vlmatch` CLI; the model pieces
//! are plugins (`plugins/`) found through `vlmatch-registry`.
//!
//! See README.md for use and ARCHITECTURE.md for the map.

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod commands;
pub mod data;
pub mod downstream;
pub mod durable;
pub mod eval;
pub mod explain;
pub mod export;
pub mod fault;
pub mod grad_cache;
pub mod guard;
pub mod hooks;
pub mod libraries;
pub mod matcher;
pub mod momentum;
pub mod optim;
pub mod panics;
pub mod parallel;
pub mod plot;
pub mod pretrained;
pub mod rng;
pub mod run;
pub mod samplers;
pub mod serve;
pub mod setup;
pub mod signals;
pub mod step;
pub mod tokenizer;
pub mod tracking;
pub mod train;
pub mod version;
pub mod zero;

/// VQA lives with the other downstream tasks.
pub use downstream::vqa;

// Link every built-in plugin so its `inventory` registration is present; a
// crate nothing references is dropped by the linker with its plugins.
use bert as _;
use clip_vit as _;
use co_attention as _;
use cross_attention as _;
use discriminator as _;
use hard_negative as _;
use heads as _;
use itc as _;
use itm as _;
use mlm as _;
use mlm_head as _;
use neggen as _;
use roberta as _;
use rtd as _;
use siglip as _;
use vit as _;
use word_swap as _;

/// The presets shipped in `configs/`, embedded so the binary works from any
/// directory; a `configs/<name>.toml` file in the working directory wins.
pub const PRESETS: &[(&str, &str)] = &[
    ("tiny", include_str!("../configs/tiny.toml")),
    ("base", include_str!("../configs/base.toml")),
];
