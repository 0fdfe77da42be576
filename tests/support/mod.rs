//! Test support: a private PostgreSQL per test, and helpers to drive a capture.
#![allow(dead_code)]

use std::time::Duration;

pub mod lake;
pub mod proxy;

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
            CaptureEvent::Commit { position, .. }
            | CaptureEvent::BackfillDone { position }
            | CaptureEvent::TablesBackfilled { position, .. } => capture.acknowledge(position),
            CaptureEvent::BackfillTable { .. }
            | CaptureEvent::TableCopied { .. }
            | CaptureEvent::Schema(_)
            | CaptureEvent::Resync { .. }
            | CaptureEvent::Idle { .. } => {}
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
            CaptureEvent::BackfillTable { .. }
            | CaptureEvent::TableCopied { .. }
            | CaptureEvent::Schema(_)
            | CaptureEvent::Resync { .. }
            | CaptureEvent::Idle { .. } => {}
            CaptureEvent::Commit { .. } | CaptureEvent::TablesBackfilled { .. } => {
                panic!("commit before the backfill was done")
            }
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

/// A private S3-compatible server for object-store tests: moto's server (`moto[server]`
/// from PyPI, installed by `tests/run.sh` into `~/.cache/weir-venv`, or
/// `$WEIR_MOTO_SERVER`) on a free loopback port, stopped when dropped.
pub struct S3Server {
    child: std::process::Child,
    /// `http://127.0.0.1:<port>`.
    pub endpoint: String,
    port: u16,
}

/// Credentials the test S3 server is given (it accepts any).
pub const S3_ACCESS_KEY: &str = "AKIAWEIRTESTKEY00001";
pub const S3_SECRET_KEY: &str = "weir-test-secret-9f8e7d6c5b4a";

impl S3Server {
    pub fn start() -> S3Server {
        let bin = std::env::var_os("WEIR_MOTO_SERVER")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default())
                    .join(".cache/weir-venv/bin/moto_server")
            });
        assert!(
            bin.exists(),
            "the S3 test server is missing at {}: run ./tests/run.sh (it installs moto[server] \
             from PyPI into ~/.cache/weir-venv) or set WEIR_MOTO_SERVER",
            bin.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(&bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the S3 test server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        S3Server {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
        }
    }

    /// The server's port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            s,
            "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "creating bucket {name}: {answer}"
        );
    }

    /// `[lake.storage]` options for this server, without credentials.
    pub fn options(&self) -> std::collections::BTreeMap<String, String> {
        [
            ("aws_endpoint", self.endpoint.as_str()),
            ("aws_region", "us-east-1"),
            ("aws_allow_http", "true"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    }

    /// The same with the test credentials.
    pub fn options_with_credentials(&self) -> std::collections::BTreeMap<String, String> {
        let mut o = self.options();
        o.insert("aws_access_key_id".into(), S3_ACCESS_KEY.into());
        o.insert("aws_secret_access_key".into(), S3_SECRET_KEY.into());
        o
    }

    /// The credentials as the standard AWS environment variables.
    pub fn env(&self) -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY),
            ("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY),
        ]
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
