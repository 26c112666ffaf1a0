//! `vlmatch serve`: the arguments, turned into [`ServeOptions`].

use crate::serve::batcher::Batching;
use crate::serve::server::{default_threads, serve, ServeOptions};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use vlmatch_core::{Error, Result};

#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// The trained run directory (its config.toml and newest checkpoint).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// An index made by `vlmatch embed` with this run, for `/search`.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Address to listen on. The server has no authentication: keep it on
    /// loopback unless a proxy in front of it controls access. Port 0
    /// picks a free port (printed as `listening on http://ADDR`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Milliseconds to wait, after a request arrives, for others to share
    /// its forward.
    #[arg(long, default_value_t = 5.0)]
    pub batch_window_ms: f64,
    /// The most requests in one forward (1: no batching).
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// Requests that may wait for the model before new ones get 503.
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
    /// HTTP worker threads.
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// libtorch threads for the forwards (default: the cores but one).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Override the run's config, e.g. `data.max_image_bytes=8388608`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl ServeArgs {
    pub fn options(&self) -> Result<ServeOptions> {
        if !(self.batch_window_ms.is_finite() && (0.0..=10_000.0).contains(&self.batch_window_ms)) {
            return Err(Error::Config(format!(
                "--batch-window-ms {}: expected 0 to 10000",
                self.batch_window_ms
            )));
        }
        for (flag, v) in [
            ("--max-batch", self.max_batch),
            ("--queue", self.queue),
            ("--workers", self.workers),
            ("--threads", self.threads.unwrap_or(1)),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{flag} 0: expected at least 1")));
            }
        }
        Ok(ServeOptions {
            run: self.checkpoint.clone(),
            index: self.index.clone(),
            addr: self.addr,
            sets: self.sets.clone(),
            batching: Batching {
                window: Duration::from_secs_f64(self.batch_window_ms / 1e3),
                max_batch: self.max_batch,
                queue: self.queue,
            },
            workers: self.workers,
            threads: self.threads.unwrap_or_else(default_threads),
        })
    }
}

/// `vlmatch serve`.
pub fn serve_cmd(a: &ServeArgs) -> Result<()> {
    serve(&a.options()?)
}
