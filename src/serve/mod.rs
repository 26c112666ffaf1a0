//! `vlmatch serve`: a trained matcher over HTTP, with one web page.
//!
//! A model thread owns the run ([`batcher`]): requests reach it over a
//! bounded channel and those that arrive within a small window are answered
//! by one forward. The HTTP side ([`routes`], axum on tokio) checks each
//! request against the run's `[data]` limits, decodes images (a large one on
//! tokio's blocking threads) and serves the page from `assets/serve/`,
//! embedded in the binary. [`server`] starts both and drains them on
//! SIGTERM; [`load`] is the load generator (one event loop) that the load
//! test and the benchmark share.

pub mod batcher;
pub mod load;
pub mod routes;
pub mod server;
