//! The `weir` command.

use std::process::ExitCode;

mod cli;

/// mimalloc instead of glibc's allocator. weir allocates and frees many small values (JSON
/// documents, map entries, Arrow buffers), often on another thread than the one that made
/// them, in waves of one batch: glibc spent ~30% of the lake writer's CPU in malloc, free
/// and chunk consolidation, and kept freed memory in per-thread arenas (resident memory
/// several times the live heap, which needed a trim thread). With mimalloc (transparent
/// huge pages off: they round small heaps up to 2 MiB pages), `weir bench e2e`: throughput
/// +10%; one 1,000,000-row transaction in 40 s instead of 53 s, in 181 MiB instead of
/// 200 MiB with freed pages purged after 1 ms (mimalloc's default, 10 ms, left 237 MiB).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn main() -> ExitCode {
    // SAFETY: sets one of mimalloc's options, before any other thread exists.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 1) };
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
