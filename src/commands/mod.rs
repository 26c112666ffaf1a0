//! The bodies of the `vlmatch` subcommands, one module each; `cli` parses
//! the arguments and dispatches here. Loading a trained run back is shared
//! in [`crate::run`].

pub mod env;
pub mod eval;
pub mod explain;
pub mod export;
pub mod finetune;
pub mod matcher;
pub mod neggen;
pub mod plugins;
pub mod preview;
pub mod serve;
pub mod train;
