//! Queries per second of `vlmatch search`'s exact top-k over random unit
//! vectors: the numbers in docs/using.md.
//!
//! ```text
//! cargo run --features vlmatch/fault-injection --example search_bench -- \
//!     [ITEMS,ITEMS,...] [DIM] [QUERIES] [K]
//! ```
//!
//! Defaults: 100000,1000000 items of width 256 (ALBEF's ITC width), 256
//! queries at a time, top 10, on the CPU with libtorch's default threads
//! (the workspace's dev profile is optimised; the work is libtorch's).

fn main() -> vlmatch_core::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let items: Vec<usize> = args
        .first()
        .map(|s| {
            s.split(',')
                .map(|n| n.parse().expect("ITEMS: numbers"))
                .collect()
        })
        .unwrap_or_else(|| vec![100_000, 1_000_000]);
    let num = |i: usize, default: usize| {
        args.get(i)
            .map(|s| s.parse().expect("a number"))
            .unwrap_or(default)
    };
    let (dim, queries, k) = (num(1, 256), num(2, 256), num(3, 10));
    tch::manual_seed(0);
    println!(
        "exact top-{k}, {queries} queries per call, width {dim}, f32, CPU, {} threads",
        tch::get_num_threads()
    );
    println!("| items | queries/s | ms per query |");
    println!("|---:|---:|---:|");
    for n in items {
        let qps = vlmatch::matcher::search::bench_exact(
            n,
            dim,
            queries,
            k,
            vlmatch::matcher::search::DEFAULT_BLOCK,
            3,
        )?;
        println!("| {n} | {qps:.0} | {:.3} |", 1000.0 / qps);
    }
    Ok(())
}
