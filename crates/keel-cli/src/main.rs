//! The `keel` binary: see `keel --help`.

fn main() -> std::process::ExitCode {
    keel_cli::main()
}
