//! The pipeline: capture → Delta sink, and the checkpoint between them.
//!
//! Changes are gathered into batches that close at a source transaction boundary when
//! the oldest change has waited the update delay (0: as soon as the capture has nothing
//! more ready, or every 200 ms while it has a backlog, so a busy source groups many
//! transactions into one commit), when the
//! batch holds `max_batch_rows` changes or `max_batch_bytes`, or on shutdown. A closed
//! batch is written to every table with its end position ([`DeltaSink::write`]); only
//! then is that position acknowledged to PostgreSQL. The backfill, one long snapshot,
//! is written in parts of `max_batch_rows` (or `max_batch_bytes`) with no position; each
//! table's copy is recorded in it as it completes ([`DeltaSink::complete`]). A source
//! transaction with more than `part_rows` changes is written in parts of that many, its
//! position going with its last part; its parts are staged and reach each table in one
//! commit at its end ([`DeltaSink::close_parts`]).

use std::time::{Duration, Instant};

use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use crate::relation::Relation;
use crate::sink::delta::{DeltaError, DeltaSink, SinkStats};
use crate::source::{Capture, CaptureEvent, CaptureOptions, Resume, SourceError};
use crate::telemetry::{Telemetry, count_by_table};

mod plugins;
mod retry;
pub use retry::run_with_retries;

use plugins::{PluginBatch, PluginStage};

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
    /// A plugin could not be loaded or started.
    #[error(transparent)]
    Plugin(#[from] crate::plugin::LoadError),
}

/// How a run ends, beyond a shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop once every transaction that committed before this position is written.
    pub stop_at: Option<Lsn>,
    /// For crash tests: abort the process after this many batches are committed to the
    /// lake (idle positions recorded do not count), before their position is acknowledged.
    pub crash_after_commits: Option<u64>,
    /// For crash tests: abort the process after this many parts (of a backfill or of a
    /// large transaction) are committed to the lake.
    pub crash_after_parts: Option<u64>,
    /// Record, per change, the time from its PostgreSQL commit to its Delta commit.
    pub record_latency: bool,
    /// Show a one-line live status (changes, rate, position, lag) on standard error.
    pub status_line: bool,
    /// Where to record live figures (for `/metrics` and the dashboard).
    pub telemetry: Option<Arc<Telemetry>>,
    /// Start over: a new slot (the old one dropped) and a backfill of every table, as if
    /// the lake held nothing (`weir run --start-over`).
    pub start_over: bool,
    /// How often a pipeline with nothing to write records (and acknowledges) the server's
    /// position, so that PostgreSQL frees WAL it does not need (default 30 s).
    pub idle_interval: Option<Duration>,
    /// Set once a run has opened the lake: from then on, a lake out of reach is waited
    /// for ([`run_with_retries`]); before, it is a configuration to fix.
    pub lake_opened: Arc<std::sync::atomic::AtomicBool>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunStats {
    /// Changes written (backfill rows included).
    pub changes: u64,
    /// Batches written (each one Delta commit per table it touched).
    pub batches: u64,
    /// Idle positions recorded (one commit each, with no changes).
    pub idle_records: u64,
    /// Parts written with no position (of the backfill or of large transactions).
    pub parts: u64,
    /// The last position acknowledged.
    pub position: Option<Lsn>,
    /// Milliseconds from PostgreSQL commit to Delta commit, per streamed change (with
    /// [`RunOptions::record_latency`]).
    pub latencies_ms: Vec<u32>,
    /// Milliseconds from PostgreSQL commit to the capture handing over the commit, per
    /// streamed transaction (with [`RunOptions::record_latency`]).
    pub capture_latencies_ms: Vec<u32>,
    /// Milliseconds from PostgreSQL commit to the plugins' outputs, per streamed change
    /// that produced one (with [`RunOptions::record_latency`]).
    pub plugin_latencies_ms: Vec<u32>,
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
    /// How many of `docs` went through the plugins (each transaction at its commit).
    processed: usize,
    /// What the plugins made of them.
    plugins: Option<PluginBatch>,
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

    /// Changes of the transaction (or backfill) still open.
    fn open_rows(&self) -> usize {
        self.docs.len() - self.complete
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

    /// Takes the complete transactions out, with what the plugins made of them.
    fn take_complete(&mut self) -> (Vec<ChangeDocument>, Option<Lsn>, Option<PluginBatch>) {
        let rest = self.docs.split_off(self.complete);
        let done = std::mem::replace(&mut self.docs, rest);
        let end = self.end.take();
        self.processed = self.processed.saturating_sub(self.complete);
        self.complete = 0;
        self.bytes = self.docs.iter().map(approximate_size).sum();
        self.since = (!self.docs.is_empty()).then(Instant::now);
        (done, end, self.plugins.take())
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

/// Work for the sink task, in source order.
enum Job {
    /// A table's new shape.
    Schema(Arc<Relation>),
    /// A table's backfill starts (its OID).
    BeginBackfill(u32),
    /// `weir resync` asked to copy a table (its OID) again, at this position.
    Resync(u32, Lsn),
    /// Nothing to write up to this position: recorded, then acknowledged.
    Idle(Lsn),
    /// Changes to write; with a position, recorded with them (and, with `complete`, in
    /// the tables a backfill copied).
    Write {
        docs: Vec<ChangeDocument>,
        position: Option<Lsn>,
        complete: Completes,
        /// What the plugins made of `docs`.
        plugins: Option<PluginBatch>,
    },
}

/// Which tables a write completes the backfill of: they record its position also
/// where they took no rows.
#[derive(Debug, Clone, PartialEq)]
enum Completes {
    /// None: an ordinary write.
    Nothing,
    /// Every table (the initial backfill).
    All,
    /// These (tables added since the lake's last position).
    Tables(Vec<u32>),
}

/// A write the sink made durable.
struct Done {
    position: Option<Lsn>,
    /// An idle position recorded (no changes): not a batch.
    idle: bool,
    changes: usize,
    /// Commit time of the newest change written (Unix ms).
    newest_ts_ms: Option<i64>,
    latencies_ms: Vec<u32>,
    /// Rows written per table (source tables, collections, dead letters).
    rows: Vec<(String, u64)>,
    /// How long the write took.
    took: Duration,
}

/// Runs the sink on its own runtime (DataFusion merges keep its threads busy; the capture
/// must keep reading meanwhile), one job at a time, reporting each write.
fn spawn_sink(
    mut sink: DeltaSink,
    runtime: &tokio::runtime::Handle,
    record_latency: bool,
) -> (
    mpsc::Sender<Job>,
    mpsc::UnboundedReceiver<Result<Done, DeltaError>>,
    tokio::task::JoinHandle<SinkStats>,
) {
    // One job queued while one is written: the next batch gathers meanwhile.
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(1);
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let task = runtime.spawn(async move {
        while let Some(job) = jobs.recv().await {
            let wrote = matches!(job, Job::Write { .. });
            let result = match job {
                Job::Schema(rel) => match sink.schema(rel) {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                },
                Job::BeginBackfill(oid) => sink.begin_backfill(oid).await.map(|()| None),
                Job::Resync(oid, lsn) => sink.resync(oid, lsn).await.map(|()| None),
                Job::Idle(position) => {
                    let started = Instant::now();
                    sink.record_idle(position).await.map(|()| {
                        Some(Done {
                            rows: Vec::new(),
                            took: started.elapsed(),
                            position: Some(position),
                            idle: true,
                            changes: 0,
                            newest_ts_ms: None,
                            latencies_ms: Vec::new(),
                        })
                    })
                }
                Job::Write {
                    docs,
                    position,
                    complete,
                    plugins,
                } => {
                    let started = Instant::now();
                    let mut r = sink.write(&docs, position).await;
                    if let (Ok(()), Some(p)) = (&r, position) {
                        r = match &complete {
                            Completes::Nothing => Ok(()),
                            Completes::All => sink.complete(p, None).await,
                            Completes::Tables(oids) => sink.complete(p, Some(oids)).await,
                        };
                    }
                    if let (Ok(()), Some(b)) = (&r, &plugins) {
                        r = sink
                            .write_plugin_batch(&b.outputs, &b.dead_letters, &b.state, position)
                            .await;
                    }
                    if let (Ok(()), Some(p)) = (&r, position) {
                        r = sink.close_parts(p).await;
                    }
                    r.map(|()| {
                        let now = unix_ms();
                        let mut rows = count_by_table(&docs);
                        if let Some(b) = &plugins {
                            rows.extend(b.outputs.iter().map(|(c, o)| (c.clone(), o.len() as u64)));
                            if !b.dead_letters.is_empty() {
                                rows.push((
                                    crate::sink::delta::collection::DEAD_LETTERS.to_string(),
                                    b.dead_letters.len() as u64,
                                ));
                            }
                        }
                        Some(Done {
                            rows,
                            took: started.elapsed(),
                            position,
                            idle: false,
                            changes: docs.len(),
                            newest_ts_ms: docs.iter().map(|d| d.source.ts_ms).max(),
                            latencies_ms: if record_latency && complete == Completes::Nothing {
                                docs.iter()
                                    .map(|d| (now - d.source.ts_ms).max(0) as u32)
                                    .collect()
                            } else {
                                Vec::new()
                            },
                        })
                    })
                }
            };
            match result {
                Ok(Some(done)) => {
                    let _ = done_tx.send(Ok(done));
                }
                Ok(None) => {}
                Err(e) => {
                    let _ = done_tx.send(Err(e));
                    break;
                }
            }
            // After a write has been reported (its position may be acknowledged): the
            // small files it left are compacted once a table has enough of them, one
            // table at a time. The next write waits meanwhile; the cost is paid once per
            // `compact_files` commits of a table, and every later commit and read of it
            // is cheaper for it.
            if wrote && let Err(e) = sink.compact_step().await {
                let _ = done_tx.send(Err(e));
                break;
            }
        }
        if let Err(e) = sink.settle().await {
            // The data and positions are committed; only a reader's shortcut is missing.
            tracing::warn!(error = %e, "a Delta log checkpoint was not written");
        }
        sink.stats
    });
    (jobs_tx, done_rx, task)
}

/// The pipeline's side of the sink task.
struct SinkLink<'a> {
    jobs: Option<mpsc::Sender<Job>>,
    /// The plugins, when configured.
    plugins: Option<PluginStage>,
    /// The live status line and when the run started.
    status: Option<(indicatif::ProgressBar, Instant)>,
    /// Writes sent and not yet reported done.
    in_flight: usize,
    /// Commit-to-plugin-output latencies (with `record_latency`).
    plugin_latencies_ms: Vec<u32>,
    done: mpsc::UnboundedReceiver<Result<Done, DeltaError>>,
    opts: &'a RunOptions,
    /// The table the backfill copies, for the status line.
    copying: Option<Copying>,
}

/// A table being copied: `schema.table`, estimated rows, rows so far, since when.
struct Copying {
    table: String,
    estimated: u64,
    rows: u64,
    started: Instant,
}

impl Copying {
    fn view(&self) -> crate::telemetry::BackfillView {
        let secs = self.started.elapsed().as_secs_f64();
        let rate = if secs > 0.0 {
            self.rows as f64 / secs
        } else {
            0.0
        };
        crate::telemetry::BackfillView {
            table: self.table.clone(),
            rows: self.rows,
            estimated_rows: self.estimated,
            done: false,
            rows_per_second: rate,
            eta_seconds: (rate > 0.0 && self.estimated > self.rows)
                .then(|| (self.estimated - self.rows) as f64 / rate),
        }
    }
}

impl SinkLink<'_> {
    async fn send(&mut self, job: Job) -> Result<(), PipelineError> {
        let Some(jobs) = &self.jobs else {
            return Ok(());
        };
        if matches!(job, Job::Write { .. } | Job::Idle(_)) {
            self.in_flight += 1;
        }
        if jobs.send(job).await.is_err() {
            // The sink stopped: its error is waiting in `done`, behind the writes it
            // finished before (left unacknowledged: the next run starts from the lake).
            while let Some(done) = self.done.recv().await {
                if let Err(e) = done {
                    return Err(e.into());
                }
            }
            return Err(PipelineError::Config("the lake writer stopped".into()));
        }
        Ok(())
    }

    /// Records a finished write and acknowledges its position (writes finish in order).
    fn finished(
        &mut self,
        done: Result<Done, DeltaError>,
        stats: &mut RunStats,
        capture: &Capture,
    ) -> Result<(), PipelineError> {
        let done = done?;
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(t) = &self.opts.telemetry {
            t.committed(&done.rows, done.took, done.position, done.newest_ts_ms);
        }
        stats.changes += done.changes as u64;
        if let (Some(position), true) = (done.position, done.idle) {
            stats.idle_records += 1;
            capture.acknowledge(position);
            stats.position = Some(position);
        } else if let Some(position) = done.position {
            stats.batches += 1;
            stats.latencies_ms.extend(done.latencies_ms);
            crash_point(self.opts, stats);
            capture.acknowledge(position);
            stats.position = Some(position);
            if let Some((bar, started)) = &self.status {
                let rate = stats.changes as f64 / started.elapsed().as_secs_f64().max(1e-3);
                let lag = done
                    .newest_ts_ms
                    .map(|t| format!(", {} ms behind PostgreSQL", (unix_ms() - t).max(0)))
                    .unwrap_or_default();
                bar.set_message(format!(
                    "{} changes ({rate:.0}/s) in {} commits, acknowledged {position}{lag}",
                    stats.changes, stats.batches
                ));
            }
        } else {
            stats.parts += 1;
            if self
                .opts
                .crash_after_parts
                .is_some_and(|n| stats.parts >= n)
            {
                eprintln!(
                    "crashing on purpose after {} parts (WEIR_CRASH_AFTER_PARTS)",
                    stats.parts
                );
                std::process::abort();
            }
        }
        Ok(())
    }

    /// Counts the documents as captured and runs them through the plugins (with
    /// `checkpoint`, their state changes are taken too).
    fn process(&mut self, docs: &mut [ChangeDocument], checkpoint: bool) -> Option<PluginBatch> {
        let streamed = docs.first().is_some_and(|d| !d.source.snapshot);
        let telemetry = self.opts.telemetry.as_deref();
        if let Some(t) = telemetry {
            t.captured(docs);
        }
        let batch = self.plugins.as_mut().map(|p| p.run(docs, checkpoint))?;
        if self.opts.record_latency && streamed {
            let now = unix_ms();
            let lsns: std::collections::HashSet<Lsn> =
                batch.outputs.values().flatten().map(|o| o.lsn).collect();
            self.plugin_latencies_ms.extend(
                docs.iter()
                    .filter(|d| lsns.contains(&d.source.lsn))
                    .map(|d| (now - d.source.ts_ms).max(0) as u32),
            );
        }
        if let Some(t) = telemetry {
            t.plugins_took(batch.documents);
            for (plugin, took) in &batch.timings {
                t.plugin_ran(plugin, batch.documents, *took);
            }
            t.failed(&batch.dead_letters);
        }
        Some(batch)
    }

    /// Runs the transactions completed since the last call through the plugins, right
    /// away (their outputs wait in the batch for its commit).
    fn process_complete(&mut self, batch: &mut Batch) {
        if batch.processed >= batch.complete {
            return;
        }
        let range = batch.processed..batch.complete;
        let out = self.process(&mut batch.docs[range], false);
        batch.processed = batch.complete;
        if let Some(out) = out {
            match &mut batch.plugins {
                Some(acc) => acc.absorb(out),
                None => batch.plugins = Some(out),
            }
        }
    }

    /// Takes the complete transactions for a positioned write: every one of them has gone
    /// through the plugins, so the plugins' state changes taken now are exactly theirs.
    fn take_for_write(
        &mut self,
        batch: &mut Batch,
    ) -> (Vec<ChangeDocument>, Option<Lsn>, Option<PluginBatch>) {
        self.process_complete(batch);
        let (docs, end, outputs) = batch.take_complete();
        let plugins = self.plugins.as_mut().map(|p| {
            let mut b = outputs.unwrap_or_default();
            b.state = p.take_state_changes();
            b
        });
        (docs, end, plugins)
    }

    /// Hands the complete transactions of the batch to the sink.
    async fn flush(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        if !batch.is_ready() {
            return Ok(());
        }
        let (docs, end, plugins) = self.take_for_write(batch);
        let Some(position) = end else { return Ok(()) };
        // Even with no changes the position goes through the sink, so that it is
        // acknowledged only after the writes before it.
        self.send(Job::Write {
            docs,
            position: Some(position),
            complete: Completes::Nothing,
            plugins,
        })
        .await
    }

    /// Copies are complete at `position`: the rest of the batch is written with it, and
    /// the tables `complete` names record it (with the plugins' state as of them). The
    /// backfill as a whole is `finished`, or it goes on with another table.
    async fn complete_backfill(
        &mut self,
        batch: &mut Batch,
        position: Lsn,
        complete: Completes,
        finished: bool,
    ) -> Result<(), PipelineError> {
        self.copying = None;
        if let (Some(t), true) = (&self.opts.telemetry, finished) {
            t.backfill_finished();
        }
        batch.close_transaction(position);
        let (docs, _, plugins) = self.take_for_write(batch);
        self.send(Job::Write {
            docs,
            position: Some(position),
            complete,
            plugins,
        })
        .await
    }

    /// Hands a part of the backfill, or of an open transaction, to the sink (no
    /// position: nothing is acknowledged). The batch holds no complete transaction.
    async fn write_part(&mut self, batch: &mut Batch) -> Result<(), PipelineError> {
        if batch.docs.is_empty() {
            return Ok(());
        }
        debug_assert_eq!(
            batch.complete, 0,
            "complete transactions go with a position"
        );
        let mut docs = std::mem::take(&mut batch.docs);
        *batch = Batch::default();
        if let (Some((bar, _)), Some(c)) = (&self.status, &self.copying) {
            bar.set_message(format!("backfill {}", c.view().describe()));
        }
        // The state changes wait for the end of the backfill, which has a position.
        let plugins = self.process(&mut docs, false);
        self.send(Job::Write {
            docs,
            position: None,
            complete: Completes::Nothing,
            plugins,
        })
        .await
    }
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
    let part_rows = config.lake.part_rows;
    // The tables' one identity, from the catalog: the lake's tables are opened for it.
    let tables = Capture::describe_tables(&config.source).await?;
    let mut sink = DeltaSink::open(config, &tables).await?;
    opts.lake_opened
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let (resume, added) = if opts.start_over {
        tracing::warn!("starting over: the slot is dropped and every table backfilled again");
        (Resume::Fresh, Vec::new())
    } else {
        sink.resume()
    };
    tracing::info!(lake = %config.lake.url, ?resume, tables = ?sink.positions(), "lake opened");
    if !added.is_empty() {
        let names: Vec<String> = tables
            .iter()
            .filter(|t| added.contains(&t.oid))
            .map(|t| t.display())
            .collect();
        tracing::info!(
            tables = ?names,
            "tables that hold nothing yet are backfilled (only they); the others stream on from where they stand"
        );
    }
    let plugins = if config.plugins.is_empty() {
        None
    } else {
        let (state, position) = sink.plugin_state(resume == Resume::Fresh).await?;
        let stage = PluginStage::start(&config.plugins, state, position)?;
        tracing::info!(plugins = config.plugins.len(), state_position = ?position, "plugins started");
        Some(stage)
    };
    if resume != Resume::Fresh {
        // Which keys the replicas hold is read now, before the stream starts, rather than
        // on its first changes (5,000,000 keys: 0.6 s that the first commits would wait).
        sink.preload_keys(&tables).await?;
    }
    let mut capture = Capture::start(
        &config.source,
        CaptureOptions {
            resume,
            stop_at: opts.stop_at,
            recorded: sink.highest_position_in_lake().await?,
            backfill_streamed: sink.copied_again(&added),
            backfill_tables: added,
            idle_interval: opts
                .idle_interval
                .unwrap_or(CaptureOptions::default().idle_interval),
            ..CaptureOptions::default()
        },
    )
    .await?;
    // The slot is ours now: what an unfinished transaction left in the lake can go, and
    // the tables this run leaves out are marked before any change they miss is
    // acknowledged.
    sink.repair().await?;
    sink.mark_detached().await?;
    if let Some(t) = &opts.telemetry {
        t.started(capture.progress());
    }
    let lake_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("weir-lake")
        .enable_all()
        .build()
        .map_err(|e| PipelineError::Config(format!("starting the lake writer: {e}")))?;
    let (jobs, done, sink_task) = spawn_sink(sink, lake_runtime.handle(), opts.record_latency);
    let mut stats = RunStats::default();
    let mut batch = Batch::default();
    // The last shape of each table.
    let mut shapes: std::collections::HashMap<u32, Arc<Relation>> =
        std::collections::HashMap::new();
    let status = opts.status_line.then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(Duration::from_millis(250));
        bar.set_message("starting");
        (bar, Instant::now())
    });
    let mut link = SinkLink {
        jobs: Some(jobs),
        plugins,
        status,
        in_flight: 0,
        plugin_latencies_ms: Vec::new(),
        done,
        opts: &opts,
        copying: None,
    };
    let result: Result<(), PipelineError> = async {
        loop {
            // With no update delay, a batch waits for the sink to be free rather than
            // queueing behind its write: the loop would block on the queue, and with it
            // the capture and the plugins.
            let sink_busy = delay.is_zero() && link.in_flight > 0;
            let deadline = if sink_busy {
                None
            } else {
                batch.deadline(delay)
            };
            let ev = tokio::select! {
                biased;
                () = stopped(&mut shutdown) => break,
                Some(done) = link.done.recv() => {
                    link.finished(done, &mut stats, &capture)?;
                    // The sink is free: what gathered while it wrote goes now if the
                    // capture has caught up. With a backlog it keeps gathering, up to
                    // the busy interval (the deadline above) or the size limits: a
                    // commit's fixed cost (files, log entry, per table) is then paid
                    // for many more changes (5x fewer commits on a 1,000,000-change
                    // backlog).
                    if link.in_flight == 0
                        && delay.is_zero()
                        && (!capture.has_pending() || batch.should_flush_for_age(delay))
                    {
                        link.flush(&mut batch).await?;
                    }
                    continue;
                }
                _ = sleep_until(deadline) => {
                    link.flush(&mut batch).await?;
                    continue;
                }
                ev = capture.next() => ev?,
            };
            let Some(ev) = ev else { break };
            match ev {
                CaptureEvent::Schema(rel) => {
                    // A table's new shape applies to the changes after it: the ones before
                    // (in this transaction too) are written with the shape they came in,
                    // so that a renamed or dropped column keeps their values.
                    let reshaped = shapes
                        .insert(rel.oid, rel.clone())
                        .is_some_and(|old| old.columns != rel.columns);
                    if reshaped && batch.docs.iter().any(|d| d.source.oid == rel.oid) {
                        link.flush(&mut batch).await?;
                        link.write_part(&mut batch).await?;
                    }
                    link.send(Job::Schema(rel)).await?
                }
                CaptureEvent::BackfillTable {
                    oid,
                    table,
                    estimated_rows,
                    connections,
                } => {
                    tracing::info!(%table, estimated_rows, connections, "copying a table");
                    if let Some(t) = &opts.telemetry {
                        t.backfill_started(&table, estimated_rows);
                    }
                    link.copying = Some(Copying {
                        table,
                        estimated: estimated_rows,
                        rows: 0,
                        started: Instant::now(),
                    });
                    // Tables added to a running pipeline are copied after the complete
                    // transactions before their snapshot: those go first, with their
                    // position.
                    link.flush(&mut batch).await?;
                    link.write_part(&mut batch).await?;
                    link.send(Job::BeginBackfill(oid)).await?;
                }
                CaptureEvent::Change(doc) => {
                    let snapshot = doc.source.snapshot;
                    if let (true, Some(c)) = (snapshot, link.copying.as_mut()) {
                        c.rows += 1;
                    }
                    batch.push(doc);
                    // A part of the backfill, or of a transaction too large to hold
                    // whole, is written as it comes (the complete transactions before
                    // it first, with their position). A transaction's parts are staged
                    // until its end (see `DeltaSink::close_parts`); the backfill's are
                    // as large as a batch (`max_batch_rows`): each is one commit per
                    // table, and commits, not rows, are most of a small part's cost
                    // (`weir bench backfill`: 2,500-row parts 0.08x of COPY, 20,000-row
                    // parts 0.18x, for 5 MiB more).
                    let part = if snapshot {
                        max_rows
                    } else {
                        part_rows.min(max_rows)
                    };
                    if batch.open_rows() >= part
                        || (batch.open_rows() > 0 && batch.bytes >= max_bytes)
                    {
                        link.flush(&mut batch).await?;
                        link.write_part(&mut batch).await?;
                    }
                }
                CaptureEvent::Resync { oid, table, lsn } => {
                    // After the writes before it: the sink marks the table to be copied
                    // and ends the run, which starts again and copies it (nothing after
                    // `lsn` is acknowledged before that copy is in the lake).
                    tracing::info!(%table, %lsn, "a resync was asked");
                    link.flush(&mut batch).await?;
                    link.send(Job::Resync(oid, lsn)).await?;
                }
                CaptureEvent::Idle { position } => {
                    // Everything before it was delivered. With nothing gathered, the
                    // position is recorded (after the writes in flight) and then
                    // acknowledged; a batch that waits for its update delay goes first,
                    // and a later idle position covers this one.
                    if batch.docs.is_empty() {
                        link.flush(&mut batch).await?;
                        link.send(Job::Idle(position)).await?;
                    }
                }
                CaptureEvent::TableCopied { oid, position } => {
                    // Recorded at once: a crash or a shutdown during a later table's copy
                    // keeps this one, and the next start copies only the others.
                    link.complete_backfill(
                        &mut batch,
                        position,
                        Completes::Tables(vec![oid]),
                        false,
                    )
                    .await?;
                }
                CaptureEvent::BackfillDone { position } => {
                    link.complete_backfill(&mut batch, position, Completes::All, true)
                        .await?;
                    tracing::info!(%position, "backfill read; streaming");
                }
                CaptureEvent::TablesBackfilled { position, tables } => {
                    link.complete_backfill(&mut batch, position, Completes::Tables(tables), true)
                        .await?;
                    tracing::info!(%position, "added tables copied; streaming on");
                }
                CaptureEvent::Commit { position, .. } => {
                    if opts.record_latency
                        && let Some(last) = batch.docs.last()
                    {
                        stats
                            .capture_latencies_ms
                            .push((unix_ms() - last.source.ts_ms).max(0) as u32);
                    }
                    batch.close_transaction(position);
                    link.process_complete(&mut batch);
                    // Group commit: with no delay, a batch goes when the capture has
                    // nothing more ready and the sink is not busy with the previous one.
                    let caught_up =
                        delay.is_zero() && !capture.has_pending() && link.in_flight == 0;
                    let sink_busy = delay.is_zero() && link.in_flight > 0;
                    if caught_up
                        || batch.should_flush_for_size(max_rows, max_bytes)
                        || (!sink_busy && batch.should_flush_for_age(delay))
                    {
                        link.flush(&mut batch).await?;
                    }
                }
            }
        }
        // Shutdown or the stop position: commit what is complete, and wait for every
        // write in flight.
        link.flush(&mut batch).await?;
        link.jobs = None;
        while let Some(done) = link.done.recv().await {
            link.finished(done, &mut stats, &capture)?;
        }
        Ok(())
    }
    .await;
    if let Some((bar, _)) = link.status.take() {
        bar.finish_and_clear();
    }
    if let Some(t) = &opts.telemetry {
        t.stopped();
    }
    stats.plugin_latencies_ms = std::mem::take(&mut link.plugin_latencies_ms);
    drop(link);
    let sink_stats = sink_task.await;
    lake_runtime.shutdown_background();
    let stopped = capture.shutdown().await;
    if let Ok(s) = sink_stats {
        stats.sink = s;
    }
    result?;
    stopped?;
    Ok(stats)
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
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
