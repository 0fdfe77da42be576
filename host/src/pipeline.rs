//! The pipeline: capture → Delta sink, and the checkpoint between them.
//!
//! Changes are gathered into batches that close at a source transaction boundary when
//! the oldest change has waited the update delay (0: as soon as the capture has nothing
//! more ready, or every 200 ms while it has a backlog, so a busy source groups many
//! transactions into one commit), when the
//! batch holds `max_batch_rows` changes or `max_batch_bytes`, or on shutdown. A closed
//! batch is written to every table with its end position ([`DeltaSink::write`]); only
//! then is that position acknowledged to PostgreSQL. The backfill, one long snapshot,
//! is written in parts of `max_batch_rows` with no position; its end is recorded in
//! every table at once ([`DeltaSink::complete`]).

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::config::Config;
use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use crate::sink::delta::{DeltaError, DeltaSink};
use crate::source::{Capture, CaptureEvent, CaptureOptions, SourceError};

/// Why a pipeline stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The source failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The lake failed.
    #[error(transparent)]
    Sink(#[from] DeltaError),
    /// The configuration is unusable.
    #[error("{0}")]
    Config(String),
}

/// How a run ends, beyond a shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once every transaction that committed before this position is written.
    pub stop_at: Option<Lsn>,
    /// For crash tests: abort the process after this many batches are committed to the
    /// lake, before their position is acknowledged.
    pub crash_after_commits: Option<u64>,
    /// Record, per change, the time from its PostgreSQL commit to its Delta commit.
    pub record_latency: bool,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Changes written (backfill rows included).
    pub changes: u64,
    /// Batches written (each one Delta commit per table it touched).
    pub batches: u64,
    /// The last position acknowledged.
    pub position: Option<Lsn>,
    /// Milliseconds from PostgreSQL commit to Delta commit, per streamed change (with
    /// [`RunOptions::record_latency`]).
    pub latencies_ms: Vec<u32>,
    /// The sink's figures.
    pub sink: crate::sink::delta::SinkStats,
}

/// Changes waiting for their commit.
#[derive(Default)]
struct Batch {
    docs: Vec<ChangeDocument>,
    /// How many of `docs` belong to complete transactions.
    complete: usize,
    /// End of the last complete transaction.
    end: Option<Lsn>,
    bytes: usize,
    since: Option<Instant>,
}

impl Batch {
    fn push(&mut self, doc: ChangeDocument) {
        self.bytes += approximate_size(&doc);
        self.since.get_or_insert_with(Instant::now);
        self.docs.push(doc);
    }

    fn close_transaction(&mut self, position: Lsn) {
        self.complete = self.docs.len();
        self.end = Some(position);
    }

    fn is_ready(&self) -> bool {
        self.end.is_some()
    }

    fn should_flush_for_size(&self, max_rows: usize, max_bytes: usize) -> bool {
        self.is_ready() && (self.complete >= max_rows || self.bytes >= max_bytes)
    }

    fn should_flush_for_age(&self, delay: Duration) -> bool {
        self.is_ready()
            && self
                .since
                .is_none_or(|t| t.elapsed() >= longest_wait(delay))
    }

    fn deadline(&self, delay: Duration) -> Option<tokio::time::Instant> {
        self.is_ready()
            .then(|| self.since.map(|t| (t + longest_wait(delay)).into()))
            .flatten()
    }

    /// Takes the complete transactions out.
    fn take_complete(&mut self) -> (Vec<ChangeDocument>, Option<Lsn>) {
        let rest = self.docs.split_off(self.complete);
        let done = std::mem::replace(&mut self.docs, rest);
        let end = self.end.take();
        self.complete = 0;
        self.bytes = self.docs.iter().map(approximate_size).sum();
        self.since = (!self.docs.is_empty()).then(Instant::now);
        (done, end)
    }
}

/// With an update delay of 0 a batch is committed as soon as the capture has nothing
/// more ready; while it keeps having more (a backlog), batches still close this often.
const BUSY_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// How long the oldest change of a complete batch may wait.
fn longest_wait(delay: Duration) -> Duration {
    if delay.is_zero() {
        BUSY_FLUSH_INTERVAL
    } else {
        delay
    }
}

fn approximate_size(doc: &ChangeDocument) -> usize {
    64 + doc
        .columns
        .iter()
        .map(|(k, v)| {
            k.len()
                + match v {
                    serde_json::Value::String(s) => s.len(),
                    other => other.to_string().len().min(64),
                }
        })
        .sum::<usize>()
}

/// Runs the pipeline until `shutdown` turns true, the stop position is reached, or an
/// error. On shutdown the complete transactions gathered so far are committed and
/// acknowledged first.
pub async fn run(
    config: &Config,
    opts: RunOptions,
    mut shutdown: watch::Receiver<bool>,
) -> Result<RunStats, PipelineError> {
    let delay = config.lake.update_delay().map_err(PipelineError::Config)?;
    let max_rows = config.lake.max_batch_rows;
    let max_bytes = config.lake.max_batch_bytes;
    let mut sink = DeltaSink::open(config).await?;
    let resume = sink.resume();
    tracing::info!(lake = %config.lake.url, ?resume, tables = ?sink.positions(), "lake opened");
    let mut capture = Capture::start(
        &config.source,
        CaptureOptions {
            resume,
            stop_at: opts.stop_at,
            ..CaptureOptions::default()
        },
    )
    .await?;
    let mut stats = RunStats::default();
    let mut batch = Batch::default();
    let result: Result<(), PipelineError> = async {
        loop {
            let deadline = batch.deadline(delay);
            let ev = tokio::select! {
                biased;
                () = stopped(&mut shutdown) => break,
                _ = sleep_until(deadline) => {
                    flush(&mut sink, &capture, &mut batch, &mut stats, &opts).await?;
                    continue;
                }
                ev = capture.next() => ev?,
            };
            let Some(ev) = ev else { break };
            match ev {
                CaptureEvent::Schema(rel) => sink.schema(rel),
                CaptureEvent::BackfillTable { table, .. } => {
                    write_part(&mut sink, &mut batch, &mut stats).await?;
                    sink.begin_backfill(&table).await?;
                }
                CaptureEvent::Change(doc) => {
                    batch.push(doc);
                    if batch.end.is_none()
                        && batch.docs.first().is_some_and(|d| d.source.snapshot)
                        && batch.docs.len() >= max_rows
                    {
                        write_part(&mut sink, &mut batch, &mut stats).await?;
                    }
                }
                CaptureEvent::BackfillDone { position } => {
                    batch.close_transaction(position);
                    let (docs, _) = batch.take_complete();
                    sink.write(&docs, Some(position)).await?;
                    sink.complete(position).await?;
                    stats.changes += docs.len() as u64;
                    stats.batches += 1;
                    crash_point(&opts, &stats);
                    capture.acknowledge(position);
                    stats.position = Some(position);
                    tracing::info!(%position, "backfill written; streaming");
                }
                CaptureEvent::Commit { position, .. } => {
                    batch.close_transaction(position);
                    let caught_up = delay.is_zero() && !capture.has_pending();
                    if caught_up
                        || batch.should_flush_for_size(max_rows, max_bytes)
                        || batch.should_flush_for_age(delay)
                    {
                        flush(&mut sink, &capture, &mut batch, &mut stats, &opts).await?;
                    }
                }
            }
        }
        // Shutdown or the stop position: commit what is complete.
        flush(&mut sink, &capture, &mut batch, &mut stats, &opts).await
    }
    .await;
    let stopped = capture.shutdown().await;
    stats.sink = sink.stats.clone();
    result?;
    stopped?;
    Ok(stats)
}

/// The crash tests' hook: dies between a Delta commit and its acknowledgment.
fn crash_point(opts: &RunOptions, stats: &RunStats) {
    if opts.crash_after_commits.is_some_and(|n| stats.batches >= n) {
        eprintln!(
            "crashing on purpose after {} commits (WEIR_CRASH_AFTER_COMMITS)",
            stats.batches
        );
        std::process::abort();
    }
}

/// Resolves once shutdown is asked for (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes the complete transactions of the batch and acknowledges their end.
async fn flush(
    sink: &mut DeltaSink,
    capture: &Capture,
    batch: &mut Batch,
    stats: &mut RunStats,
    opts: &RunOptions,
) -> Result<(), PipelineError> {
    if !batch.is_ready() {
        return Ok(());
    }
    let (docs, end) = batch.take_complete();
    let Some(position) = end else { return Ok(()) };
    if !docs.is_empty() {
        sink.write(&docs, Some(position)).await?;
        stats.changes += docs.len() as u64;
        stats.batches += 1;
        if opts.record_latency {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            stats
                .latencies_ms
                .extend(docs.iter().map(|d| (now_ms - d.source.ts_ms).max(0) as u32));
        }
        crash_point(opts, stats);
    }
    capture.acknowledge(position);
    stats.position = Some(position);
    tracing::debug!(%position, changes = docs.len(), "committed");
    Ok(())
}

/// Writes a part of the backfill (no position: nothing is acknowledged).
async fn write_part(
    sink: &mut DeltaSink,
    batch: &mut Batch,
    stats: &mut RunStats,
) -> Result<(), PipelineError> {
    if batch.docs.is_empty() {
        return Ok(());
    }
    let docs = std::mem::take(&mut batch.docs);
    *batch = Batch::default();
    sink.write(&docs, None).await?;
    stats.changes += docs.len() as u64;
    Ok(())
}
