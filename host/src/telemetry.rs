//! Live figures of a running pipeline: Prometheus metrics (`/metrics`) and the snapshot
//! behind the dashboard's pipeline view.
//!
//! The pipeline records into one [`Telemetry`] shared with the dashboard server; nothing
//! here blocks the pipeline for more than a counter update or a short lock per batch.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use crate::sink::delta::collection::DeadLetter;
use crate::source::ServerProgress;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabel {
    table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn plugin_ns_histogram() -> Histogram {
    // 250 ns .. ~8 ms per document.
    Histogram::new(exponential_buckets(250.0, 2.0, 16))
}

/// How many recent plugin failures the pipeline view keeps.
const RECENT_FAILURES: usize = 10;

/// A pipeline's live figures.
pub struct Telemetry {
    registry: Registry,
    captured: Family<TableLabel, Counter>,
    written: Family<TableLabel, Counter>,
    plugin_documents: Family<PluginLabel, Counter>,
    plugin_failures: Family<PluginLabel, Counter>,
    plugin_ns: HistogramFamily<PluginLabel>,
    commit_seconds: Histogram,
    acknowledged: Gauge,
    server_wal_end: Gauge,
    lag_bytes: Gauge,
    lag_seconds: Gauge<f64, AtomicU64>,
    backfill_rows: Family<TableLabel, Gauge>,
    backfill_estimated: Family<TableLabel, Gauge>,
    backfill_done: Family<TableLabel, Gauge>,
    totals: Totals,
    live: Mutex<Live>,
}

impl std::fmt::Debug for Telemetry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Telemetry").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Totals {
    captured: AtomicU64,
    plugins: AtomicU64,
    written: AtomicU64,
    failures: AtomicU64,
    commits: AtomicU64,
}

#[derive(Default)]
struct Live {
    running: bool,
    started: Option<Instant>,
    position: Option<Lsn>,
    /// Commit time (Unix ms) of the newest change written.
    newest_written_ts_ms: Option<i64>,
    server: Option<Arc<ServerProgress>>,
    /// Per table (source table or collection): when the pipeline last committed to it.
    last_commit_ms: BTreeMap<String, i64>,
    plugins: BTreeMap<String, PluginFigures>,
    recent_failures: VecDeque<FailureView>,
    /// (when, captured, plugins, written) samples for the rates.
    samples: VecDeque<(Instant, [u64; 3])>,
    /// Per table copied by a backfill in this process, in the order copied.
    backfill: Vec<(String, BackfillFigures)>,
}

struct BackfillFigures {
    estimated: u64,
    rows: u64,
    started: Instant,
    finished: Option<Instant>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct PluginFigures {
    documents: u64,
    failures: u64,
    nanos: u64,
}

/// A plugin failure, as the pipeline view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct FailureView {
    /// The plugin.
    pub plugin: String,
    /// Trap, timeout, memory, error...
    pub kind: String,
    /// The reason.
    pub error: String,
    /// The source table of the document.
    pub table: String,
    /// The document's source LSN.
    pub lsn: Lsn,
    /// When it failed (Unix ms).
    pub at_ms: i64,
}

/// The pipeline view's figures at one moment.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    /// Whether a pipeline runs in this process.
    pub running: bool,
    /// Seconds since the pipeline started.
    pub uptime_seconds: f64,
    /// The position acknowledged to PostgreSQL (everything before it is in the lake).
    pub position: Option<Lsn>,
    /// The end of the server's WAL, as of its last message.
    pub server_wal_end: Option<Lsn>,
    /// Bytes of WAL between the server's end and what it was last told we applied.
    pub lag_bytes: u64,
    /// Seconds since the oldest change not yet in the lake committed (0 when caught up).
    pub lag_seconds: f64,
    /// Changes per second over the last seconds: captured, through the plugins, written.
    pub rates: StageFigures,
    /// Totals since the start.
    pub totals: StageFigures,
    /// Plugin failures since the start.
    pub failures: u64,
    /// Lake commits (batches) since the start.
    pub commits: u64,
    /// Per plugin: documents, failures, mean nanoseconds per document.
    pub plugins: Vec<PluginView>,
    /// The last plugin failures, newest first.
    pub recent_failures: Vec<FailureView>,
    /// Per table: when the pipeline last committed to it (Unix ms).
    pub last_commit_ms: BTreeMap<String, i64>,
    /// The tables a backfill copied or copies in this process, in order.
    pub backfill: Vec<BackfillView>,
}

/// The backfill of one table, as the pipeline view shows it.
#[derive(Debug, Clone, Serialize)]
pub struct BackfillView {
    /// `schema.table`.
    pub table: String,
    /// Rows copied so far.
    pub rows: u64,
    /// PostgreSQL's estimate of the table's rows when its copy started.
    pub estimated_rows: u64,
    /// Whether the copy is complete.
    pub done: bool,
    /// Rows per second since its copy started (until it ended).
    pub rows_per_second: f64,
    /// Seconds left at that rate, by the estimate (while copying).
    pub eta_seconds: Option<f64>,
}

impl BackfillView {
    /// `public.users: 1,200 of ~5,000 rows (24%), 300 rows/s, 13 s left`.
    pub fn describe(&self) -> String {
        let mut s = if self.estimated_rows > 0 {
            format!(
                "{}: {} of ~{} rows",
                self.table, self.rows, self.estimated_rows
            )
        } else {
            format!("{}: {} rows", self.table, self.rows)
        };
        if self.estimated_rows > 0 {
            let pct = (self.rows as f64 / self.estimated_rows as f64 * 100.0).min(100.0);
            s.push_str(&format!(" ({pct:.0}%)"));
        }
        s.push_str(&format!(", {:.0} rows/s", self.rows_per_second));
        match (self.done, self.eta_seconds) {
            (true, _) => s.push_str(", done"),
            (false, Some(eta)) => s.push_str(&format!(", {eta:.0} s left")),
            (false, None) => {}
        }
        s
    }
}

/// One figure per stage.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StageFigures {
    /// Changes read from PostgreSQL.
    pub captured: f64,
    /// Documents run through the plugins.
    pub plugins: f64,
    /// Changes committed to the lake.
    pub written: f64,
}

/// A plugin's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PluginView {
    /// Its name.
    pub name: String,
    /// Documents processed.
    pub documents: u64,
    /// Documents it failed on.
    pub failures: u64,
    /// Mean time per document (ns).
    pub mean_ns_per_document: f64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry::new()
    }
}

impl Telemetry {
    /// Empty figures, registered under the `weir_` prefix.
    pub fn new() -> Telemetry {
        let mut registry = Registry::with_prefix("weir");
        let captured = Family::<TableLabel, Counter>::default();
        let written = Family::<TableLabel, Counter>::default();
        let plugin_documents = Family::<PluginLabel, Counter>::default();
        let plugin_failures = Family::<PluginLabel, Counter>::default();
        let plugin_ns: HistogramFamily<PluginLabel> =
            Family::new_with_constructor(plugin_ns_histogram);
        let commit_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let acknowledged = Gauge::default();
        let server_wal_end = Gauge::default();
        let lag_bytes = Gauge::default();
        let lag_seconds = Gauge::<f64, AtomicU64>::default();
        let backfill_rows = Family::<TableLabel, Gauge>::default();
        let backfill_estimated = Family::<TableLabel, Gauge>::default();
        let backfill_done = Family::<TableLabel, Gauge>::default();
        registry.register(
            "backfill_rows",
            "Rows a backfill has copied, per table",
            backfill_rows.clone(),
        );
        registry.register(
            "backfill_estimated_rows",
            "PostgreSQL's estimate of the rows of a table being backfilled",
            backfill_estimated.clone(),
        );
        registry.register(
            "backfill_done",
            "1 once a table's backfill is complete, 0 while it copies",
            backfill_done.clone(),
        );
        registry.register(
            "changes_captured",
            "Changes read from PostgreSQL, per source table",
            captured.clone(),
        );
        registry.register(
            "changes_written",
            "Changes and plugin outputs committed to the lake, per table",
            written.clone(),
        );
        registry.register(
            "plugin_documents",
            "Documents run through each plugin",
            plugin_documents.clone(),
        );
        registry.register(
            "plugin_failures",
            "Documents a plugin failed on (sent to the dead-letter table)",
            plugin_failures.clone(),
        );
        registry.register(
            "plugin_nanoseconds_per_document",
            "Mean time a plugin spent per document, one observation per batch",
            plugin_ns.clone(),
        );
        registry.register(
            "commit_seconds",
            "Time to commit one batch to every lake table it touches",
            commit_seconds.clone(),
        );
        registry.register(
            "acknowledged_lsn",
            "The position acknowledged to PostgreSQL (everything before it is in the lake)",
            acknowledged.clone(),
        );
        registry.register(
            "server_wal_end_lsn",
            "The end of PostgreSQL's WAL as of its last message",
            server_wal_end.clone(),
        );
        registry.register(
            "lag_bytes",
            "WAL bytes between the server's end and the position it was last told",
            lag_bytes.clone(),
        );
        registry.register(
            "lag_seconds",
            "Seconds since the oldest change not yet in the lake committed in PostgreSQL",
            lag_seconds.clone(),
        );
        Telemetry {
            registry,
            captured,
            written,
            plugin_documents,
            plugin_failures,
            plugin_ns,
            commit_seconds,
            acknowledged,
            server_wal_end,
            lag_bytes,
            lag_seconds,
            backfill_rows,
            backfill_estimated,
            backfill_done,
            totals: Totals::default(),
            live: Mutex::new(Live::default()),
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pipeline started (or restarted after a reconnect).
    pub fn started(&self, server: Arc<ServerProgress>) {
        let mut live = self.live();
        live.running = true;
        live.started.get_or_insert_with(Instant::now);
        live.server = Some(server);
    }

    /// The pipeline stopped.
    pub fn stopped(&self) {
        self.live().running = false;
    }

    /// The backfill starts copying `table` (`schema.table`), of about `estimated_rows`;
    /// the table before it is complete.
    pub fn backfill_started(&self, table: &str, estimated_rows: u64) {
        self.backfill_finished();
        let label = TableLabel {
            table: table.to_string(),
        };
        self.backfill_estimated
            .get_or_create(&label)
            .set(estimated_rows as i64);
        self.backfill_rows.get_or_create(&label).set(0);
        self.backfill_done.get_or_create(&label).set(0);
        let mut live = self.live();
        live.backfill.retain(|(t, _)| t != table);
        live.backfill.push((
            table.to_string(),
            BackfillFigures {
                estimated: estimated_rows,
                rows: 0,
                started: Instant::now(),
                finished: None,
            },
        ));
    }

    /// Every table being copied is complete (the backfill's position is recorded).
    pub fn backfill_finished(&self) {
        let mut live = self.live();
        for (table, f) in live
            .backfill
            .iter_mut()
            .filter(|(_, f)| f.finished.is_none())
        {
            f.finished = Some(Instant::now());
            self.backfill_done
                .get_or_create(&TableLabel {
                    table: table.clone(),
                })
                .set(1);
        }
    }

    /// Changes handed from the capture to the rest of the pipeline.
    pub fn captured(&self, docs: &[ChangeDocument]) {
        for (table, n) in count_by_table(docs) {
            self.captured.get_or_create(&TableLabel { table }).inc_by(n);
        }
        if docs.iter().any(|d| d.source.snapshot) {
            let mut live = self.live();
            for (table, n) in count_by_table(docs) {
                if let Some((_, f)) = live.backfill.iter_mut().find(|(t, _)| *t == table) {
                    f.rows += n;
                    self.backfill_rows
                        .get_or_create(&TableLabel { table })
                        .set(f.rows as i64);
                }
            }
        }
        self.totals.captured.fetch_add(docs.len() as u64, Relaxed);
    }

    /// A plugin ran over `documents` documents in `took`.
    pub fn plugin_ran(&self, plugin: &str, documents: usize, took: Duration) {
        if documents == 0 {
            return;
        }
        let label = PluginLabel {
            plugin: plugin.to_string(),
        };
        self.plugin_documents
            .get_or_create(&label)
            .inc_by(documents as u64);
        let per_doc = took.as_nanos() as f64 / documents as f64;
        self.plugin_ns.get_or_create(&label).observe(per_doc);
        let mut live = self.live();
        let f = live.plugins.entry(plugin.to_string()).or_default();
        f.documents += documents as u64;
        f.nanos += took.as_nanos() as u64;
    }

    /// Documents entered the plugin stage (each goes through every plugin).
    pub fn plugins_took(&self, documents: usize) {
        self.totals.plugins.fetch_add(documents as u64, Relaxed);
    }

    /// Plugins failed on documents.
    pub fn failed(&self, dead_letters: &[DeadLetter]) {
        if dead_letters.is_empty() {
            return;
        }
        let now = unix_ms();
        let mut live = self.live();
        for d in dead_letters {
            self.plugin_failures
                .get_or_create(&PluginLabel {
                    plugin: d.plugin.clone(),
                })
                .inc();
            live.plugins.entry(d.plugin.clone()).or_default().failures += 1;
            if live.recent_failures.len() == RECENT_FAILURES {
                live.recent_failures.pop_back();
            }
            live.recent_failures.push_front(FailureView {
                plugin: d.plugin.clone(),
                kind: d.kind.clone(),
                error: d.error.clone(),
                table: d.source_table.clone(),
                lsn: d.lsn,
                at_ms: now,
            });
        }
        self.totals
            .failures
            .fetch_add(dead_letters.len() as u64, Relaxed);
    }

    /// A batch was committed to the lake: rows per table, the time it took, and the
    /// position then acknowledged.
    pub fn committed(
        &self,
        rows: &[(String, u64)],
        took: Duration,
        position: Option<Lsn>,
        newest_ts_ms: Option<i64>,
    ) {
        let now = unix_ms();
        let mut changes = 0;
        let mut live = self.live();
        for (table, n) in rows {
            self.written
                .get_or_create(&TableLabel {
                    table: table.clone(),
                })
                .inc_by(*n);
            live.last_commit_ms.insert(table.clone(), now);
            changes += n;
        }
        self.commit_seconds.observe(took.as_secs_f64());
        self.totals.commits.fetch_add(1, Relaxed);
        self.totals.written.fetch_add(changes, Relaxed);
        if let Some(p) = position {
            live.position = Some(p);
            self.acknowledged.set(p.0 as i64);
        }
        if newest_ts_ms.is_some() {
            live.newest_written_ts_ms = newest_ts_ms;
        }
    }

    /// The figures now (also brings the lag gauges up to date).
    pub fn snapshot(&self) -> Snapshot {
        let now = Instant::now();
        let totals = [
            self.totals.captured.load(Relaxed),
            self.totals.plugins.load(Relaxed),
            self.totals.written.load(Relaxed),
        ];
        let mut live = self.live();
        let (wal_end, confirmed) = live
            .server
            .as_ref()
            .map(|s| (s.wal_end(), s.confirmed()))
            .unwrap_or_default();
        let lag_bytes = wal_end
            .0
            .saturating_sub(confirmed.0.max(live.position.unwrap_or_default().0));
        // Behind only while something captured is not written yet.
        let lag_seconds = match live.newest_written_ts_ms {
            Some(t) if totals[0] > totals[2] => (unix_ms() - t).max(0) as f64 / 1000.0,
            _ => 0.0,
        };
        self.server_wal_end.set(wal_end.0 as i64);
        self.lag_bytes.set(lag_bytes as i64);
        self.lag_seconds.set(lag_seconds);
        // Rates over the last ~10 s of samples (one kept per second).
        if live
            .samples
            .back()
            .is_none_or(|(t, _)| now.duration_since(*t) >= Duration::from_secs(1))
        {
            live.samples.push_back((now, totals));
        }
        while live
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(10))
        {
            live.samples.pop_front();
        }
        let rates = match live.samples.front() {
            Some((t, old)) if now.duration_since(*t) >= Duration::from_millis(500) => {
                let secs = now.duration_since(*t).as_secs_f64();
                StageFigures {
                    captured: (totals[0] - old[0]) as f64 / secs,
                    plugins: (totals[1] - old[1]) as f64 / secs,
                    written: (totals[2] - old[2]) as f64 / secs,
                }
            }
            _ => StageFigures::default(),
        };
        Snapshot {
            running: live.running,
            uptime_seconds: live
                .started
                .map(|s| now.duration_since(s).as_secs_f64())
                .unwrap_or(0.0),
            position: live.position,
            server_wal_end: (wal_end > Lsn::ZERO).then_some(wal_end),
            lag_bytes,
            lag_seconds,
            rates,
            totals: StageFigures {
                captured: totals[0] as f64,
                plugins: totals[1] as f64,
                written: totals[2] as f64,
            },
            failures: self.totals.failures.load(Relaxed),
            commits: self.totals.commits.load(Relaxed),
            plugins: live
                .plugins
                .iter()
                .map(|(name, f)| PluginView {
                    name: name.clone(),
                    documents: f.documents,
                    failures: f.failures,
                    mean_ns_per_document: if f.documents > 0 {
                        f.nanos as f64 / f.documents as f64
                    } else {
                        0.0
                    },
                })
                .collect(),
            recent_failures: live.recent_failures.iter().cloned().collect(),
            last_commit_ms: live.last_commit_ms.clone(),
            backfill: live
                .backfill
                .iter()
                .map(|(table, f)| {
                    let secs = f
                        .finished
                        .unwrap_or(now)
                        .duration_since(f.started)
                        .as_secs_f64();
                    let rate = if secs > 0.0 {
                        f.rows as f64 / secs
                    } else {
                        0.0
                    };
                    BackfillView {
                        table: table.clone(),
                        rows: f.rows,
                        estimated_rows: f.estimated,
                        done: f.finished.is_some(),
                        rows_per_second: rate,
                        // Unknown without an estimate (a table never analyzed) or past it.
                        eta_seconds: (f.finished.is_none() && rate > 0.0 && f.estimated > f.rows)
                            .then(|| (f.estimated - f.rows) as f64 / rate),
                    }
                })
                .collect(),
        }
    }

    /// The metrics in Prometheus' text format.
    pub fn encode(&self) -> String {
        self.snapshot();
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Changes per `schema.table`.
pub fn count_by_table(docs: &[ChangeDocument]) -> Vec<(String, u64)> {
    let mut counts: Vec<(String, u64)> = Vec::new();
    for d in docs {
        let (schema, table) = (&*d.source.schema, &*d.source.table);
        match counts.last_mut() {
            Some((name, n)) if same_table(name, schema, table) => *n += 1,
            _ => match counts
                .iter_mut()
                .find(|(name, _)| same_table(name, schema, table))
            {
                Some((_, n)) => *n += 1,
                None => counts.push((format!("{schema}.{table}"), 1)),
            },
        }
    }
    counts
}

fn same_table(name: &str, schema: &str, table: &str) -> bool {
    name.len() == schema.len() + 1 + table.len()
        && name.starts_with(schema)
        && name.ends_with(table)
        && name.as_bytes()[schema.len()] == b'.'
}

fn unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_encode_in_prometheus_text_format() {
        let t = Telemetry::new();
        t.plugin_ran("fraud_rule", 10, Duration::from_micros(20));
        t.plugins_took(10);
        t.committed(
            &[("public.transactions".into(), 10)],
            Duration::from_millis(30),
            Some(Lsn(0x1_0000_0010)),
            Some(unix_ms()),
        );
        let text = t.encode();
        assert!(
            text.contains("weir_plugin_documents_total{plugin=\"fraud_rule\"} 10"),
            "{text}"
        );
        assert!(
            text.contains("weir_changes_written_total{table=\"public.transactions\"} 10"),
            "{text}"
        );
        assert!(text.contains("weir_commit_seconds_count 1"), "{text}");
        assert!(text.contains("weir_acknowledged_lsn 4294967312"), "{text}");
        assert!(
            text.contains("# TYPE weir_plugin_nanoseconds_per_document histogram"),
            "{text}"
        );
        let s = t.snapshot();
        assert_eq!(s.plugins[0].mean_ns_per_document, 2000.0);
        assert_eq!(s.totals.written, 10.0);
    }

    #[test]
    fn backfill_progress_is_counted_per_table_and_shown() {
        use crate::document::{Op, Source};
        let t = Telemetry::new();
        let doc = |table: &str, snapshot: bool| ChangeDocument {
            op: if snapshot { Op::Read } else { Op::Insert },
            columns: Vec::new(),
            source: Source {
                oid: 1,
                schema: "public".into(),
                table: table.into(),
                lsn: Lsn(1),
                txid: None,
                ts_ms: 0,
                seq: 0,
                snapshot,
            },
            before: None,
            unchanged: Vec::new(),
            exact: Vec::new(),
        };
        t.backfill_started("public.users", 4);
        t.captured(&[doc("users", true), doc("users", true), doc("other", false)]);
        let text = t.encode();
        assert!(
            text.contains("weir_backfill_rows{table=\"public.users\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("weir_backfill_estimated_rows{table=\"public.users\"} 4"),
            "{text}"
        );
        assert!(
            text.contains("weir_backfill_done{table=\"public.users\"} 0"),
            "{text}"
        );
        let view = &t.snapshot().backfill[0];
        assert_eq!((view.rows, view.estimated_rows, view.done), (2, 4, false));
        assert!(
            view.describe()
                .starts_with("public.users: 2 of ~4 rows (50%)"),
            "{}",
            view.describe()
        );
        // Without an estimate (never analyzed): no share, no time left.
        t.backfill_started("public.fresh", 0);
        t.captured(&[doc("fresh", true)]);
        let fresh = t.snapshot().backfill.pop().unwrap();
        assert_eq!(fresh.eta_seconds, None);
        assert!(
            fresh.describe().starts_with("public.fresh: 1 rows, "),
            "{}",
            fresh.describe()
        );
        // The next table's start completes the ones before.
        t.backfill_started("public.transactions", 0);
        t.backfill_finished();
        let s = t.snapshot();
        assert!(s.backfill.iter().all(|b| b.done), "{:?}", s.backfill);
        assert!(
            t.encode()
                .contains("weir_backfill_done{table=\"public.users\"} 1")
        );
    }
}
