//! Starting the pipeline again after transient source failures.

use std::time::Duration;

use tokio::sync::watch;

use super::{PipelineError, RunOptions, RunStats, run};
use crate::config::Config;

/// First wait before reconnecting after a transient failure; doubled up to the maximum.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the pipeline, starting it again (from what the lake holds) after transient source
/// failures such as a PostgreSQL restart, with exponential backoff.
pub async fn run_with_retries(
    config: &Config,
    opts: RunOptions,
    stop: watch::Receiver<bool>,
) -> Result<RunStats, PipelineError> {
    let mut backoff = FIRST_BACKOFF;

    let mut opts = opts;
    loop {
        let started = std::time::Instant::now();
        let attempt = run(config, opts.clone(), stop.clone()).await;
        // Starting over happens once: a retry resumes (and one that finds the backfill
        // unfinished stops with SlotAhead, which says to start over again).
        opts.start_over = false;
        match attempt {
            // (A failed attempt reports nothing: what it wrote is written again by this
            // one, and counted here.)
            Ok(stats) => return Ok(stats),
            // A table PostgreSQL rewrote is copied again by the next run, at once.
            Err(PipelineError::Sink(e @ crate::sink::delta::DeltaError::Rewritten { .. }))
                if !*stop.borrow() =>
            {
                tracing::warn!(error = %e, "copying a rewritten table again");
            }
            Err(e) if is_transient(&e, &opts) && !*stop.borrow() => {
                if started.elapsed() > MAX_BACKOFF {
                    backoff = FIRST_BACKOFF;
                }
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "{} failed; reconnecting (the run starts again from what the lake holds)",
                    if matches!(e, PipelineError::Source(_)) { "the source" } else { "the lake" });
                let mut stop = stop.clone();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return Ok(RunStats::default()),
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Failures that a later attempt may get past: the source's connection faults, and the
/// lake's (its object store out of reach for a while) once a run has reached it (a lake
/// never reached is more likely misconfigured: that stops at once). A new attempt starts
/// from what the lake holds, as after a crash: nothing is lost or written twice.
fn is_transient(e: &PipelineError, opts: &RunOptions) -> bool {
    match e {
        PipelineError::Source(e) => e.is_retryable(),
        PipelineError::Sink(e) => {
            e.is_transient() && opts.lake_opened.load(std::sync::atomic::Ordering::Relaxed)
        }
        _ => false,
    }
}
