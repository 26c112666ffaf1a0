//! Starting and stopping `vlmatch serve`: the model thread, a tokio runtime
//! with the router on a listener, and a graceful shutdown that lets every
//! request in flight finish (the model thread answers the jobs it holds,
//! then ends when the last sender is dropped).

use super::batcher::{self, Batching};
use super::routes::{router, AppState};
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use vlmatch_core::{Error, Result};

pub struct ServeOptions {
    /// The trained run directory.
    pub run: PathBuf,
    /// An index made by `vlmatch embed` with this run, for `/search`.
    pub index: Option<PathBuf>,
    pub addr: SocketAddr,
    /// `--set` overrides of the run's config (the `[data]` limits, say).
    pub sets: Vec<String>,
    pub batching: Batching,
    /// Tokio worker threads (HTTP parsing; decoding runs on its blocking
    /// pool).
    pub workers: usize,
    /// libtorch's threads for the model's forwards.
    pub threads: usize,
}

/// The default of [`ServeOptions::threads`]: the cores but one, which the
/// HTTP side and the image decoding keep.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// Serve until `shutdown` resolves, then drain. `on_bound` gets the
/// address actually bound (a port 0 picks a free one).
pub fn serve_until(
    opts: &ServeOptions,
    on_bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    if !opts.addr.ip().is_loopback() {
        tracing::warn!(
            addr = %opts.addr,
            "serving beyond this machine: vlmatch serve has no authentication, so anyone \
             who reaches this address can use the model"
        );
    }
    let (jobs, info, model) = batcher::spawn(
        opts.run.clone(),
        opts.index.clone(),
        opts.sets.clone(),
        opts.batching,
        opts.threads,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(opts.workers.max(1))
        .thread_name("vlmatch-http")
        .enable_all()
        .build()
        .map_err(|e| Error::io("tokio runtime", e))?;
    let app = router(AppState::new(jobs, info));
    let addr = opts.addr;
    let served = rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| Error::io(format!("--addr {addr}"), e))?;
        let bound = listener
            .local_addr()
            .map_err(|e| Error::io(format!("--addr {addr}"), e))?;
        on_bound(bound);
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|e| Error::io(format!("serving on {bound}"), e))
    });
    // The router (and with it the job sender) is gone: the model thread
    // finishes what it holds and stops.
    drop(rt);
    let _ = model.join();
    served
}

/// SIGTERM or SIGINT (Ctrl-C).
pub async fn stop_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("cannot watch SIGTERM: {e}");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("stop requested: finishing the requests in flight");
}

/// `vlmatch serve`: serve until SIGTERM or SIGINT, printing
/// `listening on http://ADDR` on standard output once bound.
pub fn serve(opts: &ServeOptions) -> Result<()> {
    serve_until(
        opts,
        |addr| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "listening on http://{addr}");
            let _ = out.flush();
        },
        stop_signal(),
    )
}
