//! The `weir` command.

use std::process::ExitCode;

mod cli;

/// mimalloc instead of glibc's allocator. weir allocates and frees many small values (JSON
/// documents, map entries, Arrow buffers), often on another thread than the one that made
/// them, in waves of one batch: glibc spent ~30% of the lake writer's CPU in malloc, free
/// and chunk consolidation, and kept freed memory in per-thread arenas (resident memory
/// several times the live heap, which needed a trim thread). With mimalloc (transparent
/// huge pages off: they round small heaps up to 2 MiB pages), `weir bench e2e`: throughput
/// +10%. Memory is committed page by page on demand and freed pages are given back after
/// 10 ms: with mimalloc's defaults a 2,000,000-row transaction's resident memory grew all
/// along (to 260 MiB); with these settings it stays flat (5,000,000 rows: peak 190 MiB).
/// Giving pages back at once (a delay of 0) kept it as flat but cost ~8% of weir's CPU in
/// `madvise`, TLB flushes and page faults on the pages taken again right after.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_t` (mimalloc v3, the crate's default).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// `mi_option_page_commit_on_demand`, likewise.
const MI_OPTION_PAGE_COMMIT_ON_DEMAND: libmimalloc_sys::mi_option_t = 40;

fn main() -> ExitCode {
    // SAFETY: sets mimalloc's options, before any other thread exists.
    // Both can still be set from the environment (`MIMALLOC_PURGE_DELAY`, ...).
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10);
        }
        if std::env::var_os("MIMALLOC_PAGE_COMMIT_ON_DEMAND").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PAGE_COMMIT_ON_DEMAND, 1);
        }
    }
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
