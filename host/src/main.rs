//! The `weir` command.

use std::process::ExitCode;

mod cli;

/// mimalloc instead of glibc's allocator. weir allocates and frees many small values (JSON
/// documents, map entries, Arrow buffers), often on another thread than the one that made
/// them, in waves of one batch: glibc spent ~30% of the lake writer's CPU in malloc, free
/// and chunk consolidation, and kept freed memory in per-thread arenas (resident memory
/// several times the live heap, which needed a trim thread). With mimalloc (transparent
/// huge pages off: they round small heaps up to 2 MiB pages), `weir bench e2e`: throughput
/// +10%, one 1,000,000-row transaction 41 s instead of 53 s in 231-237 MiB instead of
/// 200 MiB (figures in README's benchmarks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    match cli::run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            let mut source = e.source();
            while let Some(inner) = source {
                eprintln!("  caused by: {inner}");
                source = inner.source();
            }
            ExitCode::FAILURE
        }
    }
}
