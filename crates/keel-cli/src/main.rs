//! The `keel` binary: see `keel --help`.

// Many small, short-lived allocations per request on several threads: mimalloc's
// thread-local pages cost a fraction of glibc's arenas (bench/README.md, keel serve).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    keel_cli::main()
}
