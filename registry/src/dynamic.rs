//! Dynamic plugins: encoders, objectives, negative samplers, generators,
//! discriminators and hooks in a shared library (`cdylib`) loaded at run
//! time (`--plugin PATH`, or `plugins.paths` of a config given on the
//! command line), without
//! rebuilding vlmatch, and picked by name in the config like any plugin.
//!
//! Rust has no stable ABI, so nothing Rust-specific crosses the boundary
//! ([`abi`], ABI 5): the library exports one `extern "C"` function,
//! [`ENTRY_SYMBOL`], returning a `#[repr(C)]` [`PluginTable`]: the ABI
//! version, the rustc, vlmatch, tch and libtorch versions it was built
//! with, and C vtables of its plugins. The loader ([`load`]) checks every
//! field before calling anything else and refuses a mismatch naming both
//! sides. Tensors cross as libtorch tensor handles (one libtorch in the
//! process), configs and run facts as JSON, errors as strings. The library
//! stays loaded for the life of the process.
//!
//! A plugin crate implements the core traits as for static linking,
//! registers with [`crate::register!`] and exports with
//! `vlmatch_plugin_sdk::export!()` ([`crate::export_dynamic_samplers!`]):
//! the library's side ([`guest`]) builds each plugin with its own factory
//! in a `VarStore` whose variables then join the host's under the plugin's
//! path; the host's side ([`host`]) wraps each in the core trait's
//! implementation (`Encoder`, `Objective`, ...) that calls the library. Text-level samplers
//! ([`TextSampler`], [`sampler`]) exchange C strings.
//!
//! The boundary's contract: nothing unwinds across it. Every function
//! either side exports catches its panics ([`catch_panics`]) and returns
//! them as an error string, which the host reports naming the plugin, the
//! call and the library; a failing tch call panics and so becomes such an
//! error; throwing a C++ exception across it is forbidden (libtorch's are
//! caught by torch-sys's wrapper; other C++ code catches its own). Function
//! pointers read from the table are `Option`s, checked when the library is
//! loaded. The file opened is the canonical path of the file checked.

pub mod abi;
pub mod calls;
pub mod guest;
pub mod hook_points;
pub mod host;
pub(crate) mod json_call;
pub mod layout;
pub mod load;
pub mod sampler;
pub mod view;

pub use abi::{
    catch_panics, error_string, PluginTable, SamplerVTable, ABI_VERSION, ENTRY_SYMBOL,
    LIBTORCH_VERSION, RUSTC_VERSION, TCH_VERSION, VLMATCH_VERSION,
};
pub use sampler::{DynamicSampler, DynamicSamplerInstance, HostSampler, TextSampler};
