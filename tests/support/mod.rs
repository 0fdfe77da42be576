//! Test support: a private PostgreSQL per test, and helpers to drive a capture.
#![allow(dead_code)]

use std::time::Duration;

use serde_json::Value;
use weir::config::SourceConfig;
use weir::local_postgres::LocalPostgres;
use weir::source::{Capture, CaptureEvent};

/// A private cluster with one database for this test.
pub struct TestDb {
    pub cluster: LocalPostgres,
    pub db: String,
}

impl TestDb {
    /// Starts a cluster and creates `db` in it.
    pub fn new(db: &str) -> TestDb {
        Self::with_conf(db, "")
    }

    /// Same, with extra `postgresql.conf` lines.
    pub fn with_conf(db: &str, conf: &str) -> TestDb {
        weir::source::install_crypto_provider();
        let cluster = LocalPostgres::start_with(conf).expect("start a private PostgreSQL");
        cluster
            .create_database(db)
            .expect("create the test database");
        TestDb {
            cluster,
            db: db.to_string(),
        }
    }

    /// Runs SQL; returns psql's unaligned output.
    pub fn sql(&self, sql: &str) -> String {
        self.cluster
            .psql(&self.db, sql)
            .unwrap_or_else(|e| panic!("SQL failed: {sql}: {e:#}"))
    }

    /// A source configuration for `tables`.
    pub fn source(&self, tables: &[&str]) -> SourceConfig {
        let mut s = SourceConfig::new(
            self.cluster.url(&self.db),
            tables.iter().map(|t| t.to_string()).collect(),
        );
        s.password_file = Some(self.cluster.password_file());
        s.tls = weir::config::TlsMode::Disable;
        s.status_interval_ms = 100;
        s
    }

    /// A SQL client.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(
            &self.cluster.url_with_password(&self.db),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect");
        tokio::spawn(conn);
        client
    }

    /// The slot's confirmed flush position.
    pub fn confirmed_flush(&self, slot: &str) -> weir::Lsn {
        self.sql(&format!(
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .parse()
        .expect("slot has a confirmed position")
    }
}

/// Waits for the next event, failing the test after `secs`.
pub async fn next_event(capture: &mut Capture, secs: u64) -> CaptureEvent {
    match tokio::time::timeout(Duration::from_secs(secs), capture.next()).await {
        Err(_) => panic!("no capture event within {secs} s"),
        Ok(Err(e)) => panic!("capture failed: {e}"),
        Ok(Ok(None)) => panic!("capture ended"),
        Ok(Ok(Some(ev))) => ev,
    }
}

/// Collects change documents (as JSON) until `n` arrived, acknowledging every commit.
pub async fn changes(capture: &mut Capture, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        match next_event(capture, 30).await {
            CaptureEvent::Change(doc) => out.push(serde_json::from_str(&doc.to_json()).unwrap()),
            CaptureEvent::Commit { position, .. } | CaptureEvent::BackfillDone { position } => {
                capture.acknowledge(position)
            }
            CaptureEvent::BackfillTable { .. } | CaptureEvent::Schema(_) => {}
        }
    }
    out
}

/// Collects the backfill's documents, through `BackfillDone` (acknowledged).
pub async fn backfill(capture: &mut Capture) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        match next_event(capture, 30).await {
            CaptureEvent::Change(doc) => out.push(serde_json::from_str(&doc.to_json()).unwrap()),
            CaptureEvent::BackfillDone { position } => {
                capture.acknowledge(position);
                return out;
            }
            CaptureEvent::BackfillTable { .. } | CaptureEvent::Schema(_) => {}
            CaptureEvent::Commit { .. } => panic!("commit before the backfill was done"),
        }
    }
}

/// Polls `cond` every 50 ms until it holds, failing after `secs`.
pub async fn wait_for(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {secs} s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
