//! Lake test support: pipelines run to "now", rows of the lake and of PostgreSQL as text,
//! and row-by-row comparisons.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::arrow::util::display::array_value_to_string;
use weir::Lsn;
use weir::config::{Config, LakeConfig};
use weir::pipeline::{RunOptions, RunStats, run_with_retries};
use weir::query::LakeQuery;
use weir::sink::delta::Lake;

use super::TestDb;

pub fn config(db: &TestDb, tables: &[&str], lake: &Path) -> Config {
    Config {
        source: db.source(tables),
        lake: LakeConfig {
            url: lake.display().to_string(),
            change_log: true,
            ..LakeConfig::default()
        },
        plugins: Vec::new(),
        dashboard: None,
    }
}

pub fn now_lsn(db: &TestDb) -> Lsn {
    db.sql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap()
}

/// Runs the pipeline until everything committed so far is in the lake, as `weir run` does
/// (started again after a transient failure, or to copy a rewritten table again).
pub async fn run_until_now(db: &TestDb, cfg: &Config) -> RunStats {
    let until = now_lsn(db);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    tokio::time::timeout(
        Duration::from_secs(120),
        run_with_retries(
            cfg,
            RunOptions {
                stop_at: Some(until),
                ..RunOptions::default()
            },
            rx,
        ),
    )
    .await
    .expect("pipeline reached the stop position in time")
    .expect("pipeline ran")
}

pub fn batches_to_rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            "NULL".to_string()
                        } else {
                            array_value_to_string(c, r).unwrap()
                        }
                    })
                    .collect(),
            );
        }
    }
    rows
}

/// A lake folder, or a lake with its object-store options.
pub trait AsLake {
    fn lake(&self) -> Lake;
}

impl AsLake for Path {
    fn lake(&self) -> Lake {
        Lake::open(&self.display().to_string(), false).unwrap()
    }
}

impl AsLake for PathBuf {
    fn lake(&self) -> Lake {
        self.as_path().lake()
    }
}

impl AsLake for Lake {
    fn lake(&self) -> Lake {
        self.clone()
    }
}

pub async fn lake_query(lake: &(impl AsLake + ?Sized), catalog: &str) -> LakeQuery {
    LakeQuery::open(&lake.lake(), catalog, "default")
        .await
        .unwrap()
}

/// Rows of a query over the lake, as display strings (`NULL` for null).
pub async fn lake_rows(lake: &(impl AsLake + ?Sized), sql: &str) -> Vec<Vec<String>> {
    let q = lake_query(lake, "weir").await;
    let batches = q
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("lake query failed: {sql}: {e}"));
    batches_to_rows(&batches)
}

/// Rows of a query in PostgreSQL, as text (`NULL` for null).
pub async fn pg_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for m in client.simple_query(sql).await.unwrap() {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            rows.push(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            );
        }
    }
    rows
}

/// Row-by-row equality, reporting the first difference rather than both tables.
pub fn assert_same_rows(source: &[Vec<String>], replica: &[Vec<String>], what: &str) {
    if let Some(i) = (0..source.len().min(replica.len())).find(|&i| source[i] != replica[i]) {
        panic!(
            "{what}: row {i} differs: source {:?}, replica {:?}",
            source[i], replica[i]
        );
    }
    assert_eq!(
        source.len(),
        replica.len(),
        "{what}: {} rows in the source, {} in the replica",
        source.len(),
        replica.len()
    );
}

pub async fn assert_change_log_has_no_duplicates(
    lake: &(impl AsLake + ?Sized),
    table: &str,
) -> usize {
    let rows = lake_rows(lake, &format!("SELECT _lsn, _seq FROM {table}_changes")).await;
    let unique: HashSet<&Vec<String>> = rows.iter().collect();
    assert_eq!(
        unique.len(),
        rows.len(),
        "{table}_changes holds a change twice"
    );
    rows.len()
}

/// A query over PostgreSQL and one over the lake, compared row by row.
pub async fn assert_query_equal(db: &TestDb, lake: &Path, pg: &str, delta: &str, what: &str) {
    let client = db.client().await;
    assert_same_rows(
        &pg_rows(&client, pg).await,
        &lake_rows(lake, delta).await,
        what,
    );
}

/// Runs `weir run --config <config>` and kills it with SIGKILL after a pseudo-random
/// `min_ms` to `min_ms + spread_ms`, `rounds` times (xorshift from `seed`).
pub async fn kill_9_runs(config: &Path, rounds: u32, mut seed: u64, min_ms: u64, spread_ms: u64) {
    use std::process::{Command, Stdio};
    for round in 0..rounds {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(min_ms + seed % spread_ms)).await;
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        assert!(!child.wait().unwrap().success(), "round {round}: killed");
    }
}
