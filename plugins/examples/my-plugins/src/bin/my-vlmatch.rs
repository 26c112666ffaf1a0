//! The stock `vlmatch` CLI with this crate's plugins linked in: referencing
//! the crate keeps its `inventory` registrations in the binary.
use my_plugins as _;

fn main() -> std::process::ExitCode {
    vlmatch::cli::main()
}
