// Counts allocations per thread for `vlmatch bench`'s loader rows.
#[global_allocator]
static ALLOC: vlmatch::bench::alloc::Counting = vlmatch::bench::alloc::Counting;

fn main() -> std::process::ExitCode {
    vlmatch::cli::main()
}
