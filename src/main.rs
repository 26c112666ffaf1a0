fn main() -> std::process::ExitCode {
    vlmatch::cli::main()
}
