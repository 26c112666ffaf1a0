fn main() -> std::process::ExitCode {
    // Before anything else: the libtorch this process loaded must be the
    // 2.11.x this binary was built for (see src/version.rs).
    if let Err(e) = vlmatch::version::check_or_exit() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    vlmatch::cli::main()
}
