//! Latency and throughput of `vlmatch serve`'s `/match` at 1, 8 and 32
//! concurrent clients on loopback, with batching and without (one request
//! per forward), in one call: the numbers in bench/SERVE.md.
//!
//! ```text
//! cargo run --features vlmatch/fault-injection --example serve_bench -- \
//!     --checkpoint RUN --image IMAGE.png --caption "TEXT" \
//!     [--requests N] [--window-ms W] [--max-batch B] [--workers W]
//! ```
//!
//! The server runs in this process (its model thread and tokio workers, as
//! `vlmatch serve` runs them) and the clients on one event-loop thread
//! beside it, each with one keep-alive connection; every level sends about
//! `N` requests in all (default 32000), after a warm-up. At 32 clients one
//! scheduler stall delays all 32 requests in flight at once, so a p99 needs
//! many more than 100 rounds of them to say anything but "one stall
//! happened": 32000 requests are 1000 rounds (about 90 s for all six rows
//! on 2 cores).

use std::path::PathBuf;
use std::time::Duration;
use vlmatch::serve::batcher::Batching;
use vlmatch::serve::load;
use vlmatch::serve::server::{serve_until, ServeOptions};

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// One server with `batching`, measured at each concurrency.
fn measure(
    run: &std::path::Path,
    batching: Batching,
    body: &(String, Vec<u8>),
    total: usize,
    workers: usize,
) -> vlmatch_core::Result<Vec<load::LoadResult>> {
    let opts = ServeOptions {
        run: run.to_path_buf(),
        index: None,
        addr: "127.0.0.1:0".parse().expect("an address"),
        sets: vec![],
        batching,
        workers,
        threads: vlmatch::serve::server::default_threads(),
    };
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        serve_until(
            &opts,
            move |a| {
                let _ = addr_tx.send(a);
            },
            async move {
                let _ = stop_rx.await;
            },
        )
    });
    let addr = match addr_rx.recv() {
        Ok(a) => a,
        Err(_) => return Err(server.join().expect("the server thread").unwrap_err()),
    };
    let (kind, bytes) = body;
    let warm = load::run(addr, 8, 8, "/match", kind, bytes);
    assert_eq!(warm.errors, 0, "warm-up failed: {:?}", warm.first_error);
    let mut out = Vec::new();
    for clients in [1, 8, 32] {
        let r = load::run(
            addr,
            clients,
            total.div_ceil(clients),
            "/match",
            kind,
            bytes,
        );
        out.push(r);
    }
    let _ = stop_tx.send(());
    server.join().expect("the server thread")?;
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> vlmatch_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "--checkpoint RUN --image IMAGE --caption TEXT [--requests N] \
                 [--window-ms W] [--max-batch B]";
    let run = PathBuf::from(arg(&args, "--checkpoint").expect(usage));
    let image = std::fs::read(arg(&args, "--image").expect(usage)).expect("the image file");
    let caption = arg(&args, "--caption").expect(usage);
    let total: usize = arg(&args, "--requests").map_or(32_000, |s| s.parse().expect("N"));
    let window: f64 = arg(&args, "--window-ms").map_or(5.0, |s| s.parse().expect("W"));
    let max_batch: usize = arg(&args, "--max-batch").map_or(32, |s| s.parse().expect("B"));
    let workers: usize = arg(&args, "--workers").map_or(2, |s| s.parse().expect("W"));
    let body = load::multipart(&image, &caption);
    let modes = [
        (
            format!("batched ({window} ms, <= {max_batch})"),
            Batching {
                window: Duration::from_secs_f64(window / 1e3),
                max_batch,
                queue: 1024,
            },
        ),
        (
            "unbatched".to_string(),
            Batching {
                window: Duration::ZERO,
                max_batch: 1,
                queue: 1024,
            },
        ),
    ];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "POST /match (multipart, {} bytes), {} CPU threads, libtorch {} threads, {workers} HTTP workers",
        body.1.len(),
        threads,
        vlmatch::serve::server::default_threads()
    );
    println!("| batching | clients | requests | p50 ms | p99 ms | requests/s | errors |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut ratios = Vec::new();
    for (label, batching) in modes {
        let results = measure(&run, batching, &body, total, workers)?;
        for r in &results {
            println!(
                "| {label} | {} | {} | {:.2} | {:.2} | {:.1} | {} |",
                r.clients,
                r.latencies.len() + r.errors,
                ms(r.percentile(50.0)),
                ms(r.percentile(99.0)),
                r.requests_per_s(),
                r.errors
            );
        }
        let single = results[0].percentile(50.0);
        let p99 = results[2].percentile(99.0);
        let speedup = results[2].requests_per_s() / results[0].requests_per_s();
        ratios.push(format!(
            "{label}: p99 at 32 clients / p50 at 1 = {:.2}; requests/s at 32 / at 1 = {:.2}",
            ms(p99) / ms(single),
            speedup
        ));
    }
    for r in ratios {
        println!("{r}");
    }
    Ok(())
}
