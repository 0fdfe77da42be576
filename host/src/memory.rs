//! Giving freed memory back to the system.
//!
//! With glibc, memory a thread frees stays in that thread's arena, and blocks above the
//! mmap threshold move into the arenas too once the threshold adapts upwards (it does
//! after the first large block is freed). weir's work comes in waves (a batch is decoded,
//! converted to Arrow, written, dropped), on several threads, so resident memory climbed
//! to well above what was live (a 1,000,000-row transaction: live heap mostly under 50 MB,
//! resident 454 MiB at peak). A fixed mmap threshold keeps large buffers out of the arenas
//! (they go back to the system when freed), and a trim every second releases the arenas'
//! free pages: 373 MiB on the same transaction, at no measurable cost in time
//! (`weir bench e2e --big-rows 1000000`).

/// Blocks from this size on are mapped on their own (glibc's default starts at 128 KiB and
/// adapts up to 32 MiB).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: i32 = 256 * 1024;
/// How often free arena pages are released.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Sets the allocator up and starts the trimming thread (glibc only; elsewhere a no-op).
pub fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt and malloc_trim only tune and walk glibc's own heaps.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) };
        let spawned = std::thread::Builder::new()
            .name("weir-trim".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(TRIM_EVERY);
                    // SAFETY: as above.
                    unsafe { libc::malloc_trim(0) };
                }
            });
        if let Err(e) = spawned {
            tracing::debug!(error = %e, "no memory trimming thread");
        }
    }
}
