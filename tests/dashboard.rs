//! The dashboard: a pipeline with the fraud rule on a private PostgreSQL, the page opened
//! in headless Chromium (Debian's `chromium`), the red points checked against the lake's
//! alerts; `/metrics` and the pipeline view from the same run; and every bad request
//! answered plainly.

mod support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::TestDb;
use weir::Lsn;
use weir::config::{Config, DashboardConfig, LakeConfig};
use weir::pipeline::{RunOptions, run};
use weir::query::LakeQuery;
use weir::serve::Dashboard;
use weir::sink::delta::Lake;
use weir::telemetry::Telemetry;

const CHROMIUM: &str = "/usr/bin/chromium";

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn now_lsn(db: &TestDb) -> Lsn {
    db.sql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap()
}

/// A plain HTTP/1.0 GET: status and body.
fn get(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n").unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, body.to_string())
}

fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let (status, body) = get(addr, path, None);
    let json =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
    (status, json)
}

fn error_of(v: &Value) -> &str {
    v.get("error").and_then(Value::as_str).unwrap_or("")
}

/// Headless Chromium's DOM of `url` after its scripts ran (and, with `screenshot`, a PNG).
fn chromium_dom(url: &str, screenshot: Option<&Path>) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-quic",
        "--no-first-run",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1360,1280",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()));
    match screenshot {
        Some(path) => cmd.arg(format!("--screenshot={}", path.display())),
        None => cmd.arg("--dump-dom"),
    };
    let out = cmd
        .arg(url)
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{CHROMIUM} cannot run ({e}): install Debian's chromium"));
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Transaction ids of the chart's points, (all, red).
fn chart_points(dom: &str) -> (BTreeSet<i64>, BTreeSet<i64>) {
    let (mut all, mut red) = (BTreeSet::new(), BTreeSet::new());
    for circle in dom.split("<circle ").skip(1) {
        let tag = &circle[..circle.find('>').unwrap_or(circle.len())];
        let Some(id) = attr(tag, "data-transaction-id") else {
            continue; // the legend's
        };
        let id: i64 = id.parse().unwrap();
        all.insert(id);
        if attr(tag, "class").is_some_and(|c| c.split(' ').any(|x| x == "anomaly")) {
            red.insert(id);
        }
    }
    (all, red)
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let start = tag.find(&format!("{name}=\""))? + name.len() + 2;
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

async fn ids(lake: &Path, sql: &str) -> BTreeSet<i64> {
    let lake = Lake::open(&lake.display().to_string(), false).unwrap();
    let q = LakeQuery::open(&lake, "weir", "default").await.unwrap();
    q.json(sql)
        .await
        .unwrap()
        .iter()
        .map(|r| r.values().next().and_then(Value::as_i64).unwrap())
        .collect()
}

/// Waits until the lake holds every transaction of PostgreSQL, each scored by the rule
/// (whose state, committed after its alerts, has caught up with the replica).
async fn wait_until_caught_up(db: &TestDb, lake: &Path, log: &Path) {
    let client = db.client().await;
    let source = |sql: &'static str| {
        let client = &client;
        async move {
            let row = client.query_one(sql, &[]).await.unwrap();
            row.get::<_, Option<String>>(0).unwrap_or_default()
        }
    };
    let want =
        source("SELECT count(*)::text || '/' || coalesce(sum(amount), 0)::text FROM transactions")
            .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let got = match Lake::open(&lake.display().to_string(), false) {
            Ok(l) => match LakeQuery::open(&l, "weir", "default").await {
                Ok(q) => {
                    let replica = q
                        .json("SELECT CAST(count(*) AS VARCHAR) || '/' || CAST(COALESCE(sum(amount), 0) AS VARCHAR) AS s FROM transactions")
                        .await
                        .ok()
                        .and_then(|r| r.first().and_then(|r| r["s"].as_str().map(str::to_string)));
                    let scored = q
                        .json("SELECT (SELECT max(_lsn) FROM weir_plugin_state) >= (SELECT max(_lsn) FROM transactions) AS scored")
                        .await
                        .ok()
                        .and_then(|r| r.first().and_then(|r| r["scored"].as_bool()));
                    replica.zip(scored)
                }
                Err(_) => None,
            },
            Err(_) => None,
        };
        if let Some((replica, scored)) = &got
            && *replica == want
            && *scored
        {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the lake did not catch up with PostgreSQL ({want}): {got:?}\nweir run said:\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_each_users_flagged_transactions_in_red() {
    let db = TestDb::new("dashboard");
    let client = db.client().await;
    let settings = weir::datagen::Settings {
        users: 12,
        rate: 10_000.0,
        operations: Some(700),
        seed: 11,
        anomaly_share: 0.06,
        ..weir::datagen::Settings::default()
    };
    weir::datagen::prepare(&client, &settings).await.unwrap();
    weir::datagen::run(&client, &settings, std::future::pending())
        .await
        .unwrap();
    // Statistics, for the backfill's estimate.
    db.sql("ANALYZE users; ANALYZE transactions");

    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let port = free_port();
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"public.users\", \"public.transactions\"]\ntls = \"disable\"\nstatus_interval_ms = 100\n\n\
             [lake]\nurl = \"{}\"\n\n[[plugins]]\npath = \"{}\"\n\n[dashboard]\nlisten = \"127.0.0.1:{port}\"\n",
            db.cluster.url(&db.db),
            db.cluster.password_file().display(),
            lake.display(),
            PathBuf::from(env!("WEIR_PLUGIN_DIR"))
                .join("fraud_rule.wasm")
                .display(),
        ),
    )
    .unwrap();
    let log = dir.path().join("weir-run.log");
    let _pipeline = Running(
        weir()
            .args(["run", "--config"])
            .arg(&config)
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_until_caught_up(&db, &lake, &log).await;

    // The user with most alerts comes first, and has some.
    let (status, users) = get_json(addr, "/api/users");
    assert_eq!(status, 200, "{users}");
    let top = &users["users"][0];
    let user = top["user_id"].as_i64().unwrap();
    assert!(top["alerts"].as_i64().unwrap() > 0, "{users}");
    let flagged = ids(
        &lake,
        &format!(
            "SELECT a.transaction_id FROM fraud_alerts a JOIN transactions t \
             ON t.transaction_id = a.transaction_id WHERE a.is_anomaly AND t.user_id = {user}"
        ),
    )
    .await;
    let all = ids(
        &lake,
        &format!("SELECT transaction_id FROM transactions WHERE user_id = {user}"),
    )
    .await;
    assert!(!flagged.is_empty());

    // The page, as a browser renders it.
    let url = format!("http://{addr}/?user={user}");
    let dom = chromium_dom(&url, None);
    assert!(
        dom.contains(&format!("data-user=\"{user}\"")),
        "the chart of user {user} was drawn:\n{dom}"
    );
    let (points, red) = chart_points(&dom);
    assert_eq!(points, all, "one point per transaction of user {user}");
    assert_eq!(
        red, flagged,
        "red points = the rule's anomalies of user {user}"
    );
    assert!(dom.contains("Latest alerts"));
    let (status, latest) = get_json(addr, "/api/alerts?limit=15");
    assert_eq!(status, 200, "{latest}");
    assert_eq!(
        dom.matches("<tr class=\"clickable\"").count(),
        latest["alerts"].as_array().unwrap().len(),
        "the latest alerts table has a row per alert: {latest}"
    );
    assert!(!latest["alerts"].as_array().unwrap().is_empty());

    // A screenshot for people (the README shows one).
    let shots = PathBuf::from(
        std::env::var("CARGO_TARGET_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_string() + "/../target"),
    )
    .join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let png = shots.join("dashboard.png");
    chromium_dom(&url, Some(&png));
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 20_000,
        "screenshot at {}",
        png.display()
    );
    eprintln!("screenshot: {}", png.display());
    // The pipeline view, from the same run.
    let dom = chromium_dom(&format!("http://{addr}/#pipeline"), None);
    assert!(
        dom.contains("fraud_rule") && dom.contains("weir_plugin_state"),
        "{dom}"
    );
    // The backfill's progress, per table: both copied.
    assert!(
        dom.contains("Backfill") && dom.contains("public.transactions") && dom.contains(">done<"),
        "{dom}"
    );
    chromium_dom(
        &format!("http://{addr}/#pipeline"),
        Some(&shots.join("pipeline.png")),
    );

    // Another user: still exactly their anomalies.
    let other = users["users"][1]["user_id"].as_i64().unwrap();
    let dom = chromium_dom(&format!("http://{addr}/?user={other}"), None);
    let (_, red) = chart_points(&dom);
    let flagged_other = ids(
        &lake,
        &format!(
            "SELECT a.transaction_id FROM fraud_alerts a JOIN transactions t \
             ON t.transaction_id = a.transaction_id WHERE a.is_anomaly AND t.user_id = {other}"
        ),
    )
    .await;
    assert_eq!(red, flagged_other, "red points of user {other}");

    // The pipeline view's figures and /metrics, from the same run.
    let (_, p) = get_json(addr, "/api/pipeline");
    assert_eq!(p["live"]["running"], true, "{p}");
    // Every captured change written (to its replica), plus the alerts.
    let totals = &p["live"]["totals"];
    assert!(
        totals["captured"].as_f64().unwrap() >= 600.0
            && totals["written"].as_f64().unwrap() > totals["captured"].as_f64().unwrap(),
        "{p}"
    );
    assert_eq!(p["live"]["plugins"][0]["name"], "fraud_rule", "{p}");
    let copies = p["live"]["backfill"].as_array().unwrap();
    let copied: Vec<&str> = copies.iter().filter_map(|b| b["table"].as_str()).collect();
    assert_eq!(copied, ["public.users", "public.transactions"], "{p}");
    assert!(
        copies
            .iter()
            .all(|b| b["done"] == true && b["rows"].as_u64().unwrap() > 0),
        "{p}"
    );
    // PostgreSQL's estimate of each table's rows (its statistics are fresh: exact).
    assert!(
        copies
            .iter()
            .all(|b| b["estimated_rows"].as_u64().unwrap() == b["rows"].as_u64().unwrap()),
        "{p}"
    );
    let tables: Vec<&str> = p["tables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        tables.contains(&"fraud_alerts") && tables.contains(&"transactions"),
        "{p}"
    );
    let (status, metrics) = get(addr, "/metrics", None);
    assert_eq!(status, 200);
    for needle in [
        "weir_changes_captured_total{table=\"public.transactions\"}",
        "weir_plugin_documents_total{plugin=\"fraud_rule\"}",
        "weir_plugin_nanoseconds_per_document_bucket{",
        "weir_commit_seconds_count",
        "weir_lag_bytes",
        "weir_lag_seconds",
        "weir_acknowledged_lsn",
        "weir_backfill_rows{table=\"public.transactions\"}",
        "weir_backfill_done{table=\"public.transactions\"} 1",
    ] {
        assert!(
            metrics.contains(needle),
            "/metrics has {needle}:\n{metrics}"
        );
    }
    let captured: f64 = metrics
        .lines()
        .find(|l| l.starts_with("weir_changes_captured_total{table=\"public.transactions\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(captured >= 600.0, "{metrics}");

    // Live: new transactions show up on the next load.
    let before = all.len();
    let more = weir::datagen::Settings {
        operations: Some(300),
        seed: 12,
        ..settings
    };
    weir::datagen::run(&client, &more, std::future::pending())
        .await
        .unwrap();
    wait_until_caught_up(&db, &lake, &log).await;
    let all = ids(
        &lake,
        &format!("SELECT transaction_id FROM transactions WHERE user_id = {user}"),
    )
    .await;
    let (points, _) = chart_points(&chromium_dom(&url, None));
    assert_eq!(points, all, "the chart follows the lake");
    assert!(all.len() >= before);
}

/// Serves `lake` in this process on a free port.
async fn serve(lake: &Path, token: Option<&str>) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let listener = weir::serve::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = tokio::sync::watch::channel(false);
    let dashboard = Dashboard {
        lake: LakeConfig {
            url: lake.display().to_string(),
            ..LakeConfig::default()
        },
        tables: DashboardConfig::default(),
        telemetry: Arc::new(Telemetry::new()),
        token: token.map(str::to_string),
    };
    tokio::spawn(weir::serve::serve(listener, dashboard, rx));
    (addr, stop)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_plain_answers_and_never_stop_the_server() {
    let dir = tempfile::tempdir().unwrap();
    // No lake at all yet.
    let lake = dir.path().join("lake");
    let (addr, _stop) = serve(&lake, None).await;
    let (status, v) = blocking(move || get_json(addr, "/api/users")).await;
    assert_eq!(status, 503);
    assert!(error_of(&v).contains("Start `weir run`"), "{v}");
    // The page itself loads and says so.
    let dom = blocking(move || chromium_dom(&format!("http://{addr}/"), None)).await;
    assert!(dom.contains("Start `weir run`"), "{dom}");
    let (status, p) = blocking(move || get_json(addr, "/api/pipeline")).await;
    assert_eq!(status, 200);
    assert_eq!(p["live"]["running"], false);

    // A lake with the replicas but no alerts yet (no plugin).
    let db = TestDb::new("dashbad");
    let client = db.client().await;
    let settings = weir::datagen::Settings {
        users: 5,
        rate: 10_000.0,
        operations: Some(60),
        seed: 3,
        ..weir::datagen::Settings::default()
    };
    weir::datagen::prepare(&client, &settings).await.unwrap();
    weir::datagen::run(&client, &settings, std::future::pending())
        .await
        .unwrap();
    let cfg = Config {
        source: db.source(&["public.users", "public.transactions"]),
        lake: LakeConfig {
            url: lake.display().to_string(),
            ..LakeConfig::default()
        },
        plugins: Vec::new(),
        dashboard: None,
    };
    let (_tx, rx) = tokio::sync::watch::channel(false);
    run(
        &cfg,
        RunOptions {
            stop_at: Some(now_lsn(&db)),
            ..RunOptions::default()
        },
        rx,
    )
    .await
    .unwrap();
    let (status, v) = blocking(move || get_json(addr, "/api/users")).await;
    assert_eq!(status, 200, "{v}");
    let user = v["users"][0]["user_id"].as_i64().unwrap();
    assert_eq!(v["users"][0]["alerts"], 0);
    let (status, c) = blocking(move || get_json(addr, &format!("/api/users/{user}/chart"))).await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["scored"], false);
    assert!(c["svg"].as_str().unwrap().contains("data-transaction-id"));
    let (_, a) = blocking(move || get_json(addr, "/api/alerts")).await;
    assert!(
        a["note"].as_str().unwrap().contains("`fraud_alerts`"),
        "{a}"
    );

    // Unknown user, not a number, odd paths.
    let (status, v) = blocking(move || get_json(addr, "/api/users/999999/chart")).await;
    assert_eq!(status, 404);
    assert!(error_of(&v).contains("No user 999999"), "{v}");
    let (status, v) = blocking(move || get_json(addr, "/api/users/abc'%20OR%201=1/chart")).await;
    assert_eq!(status, 400);
    assert!(error_of(&v).contains("is not a user id"), "{v}");
    for path in [
        "/api/users/99999999999999999999999/chart",
        "/api/nope",
        "/api/alerts?limit=-1",
        "/%00",
    ] {
        let (status, _) = blocking(move || get(addr, path, None)).await;
        assert!((400..500).contains(&status), "{path}: {status}");
    }
    // The page says an unknown user plainly.
    let dom = blocking(move || chromium_dom(&format!("http://{addr}/?user=424242"), None)).await;
    assert!(dom.contains("No user 424242"), "{dom}");
    // Still serving.
    assert_eq!(blocking(move || get(addr, "/healthz", None)).await.0, 200);

    // A lake without the transactions table.
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (src, dst) = (lake.join("users"), other.join("users"));
    blocking(move || copy_dir(&src, &dst)).await;
    let (addr2, _stop2) = serve(&other, None).await;
    let (status, v) = blocking(move || get_json(addr2, "/api/users")).await;
    assert_eq!(status, 404);
    assert!(error_of(&v).contains("no `transactions` table"), "{v}");

    // With a token: the data needs it, the page does not.
    let (addr3, _stop3) = serve(&lake, Some("s3cret-token")).await;
    assert_eq!(
        blocking(move || get(addr3, "/api/users", None)).await.0,
        401
    );
    assert_eq!(blocking(move || get(addr3, "/metrics", None)).await.0, 401);
    assert_eq!(
        blocking(move || get(addr3, "/api/users", Some("wrong")))
            .await
            .0,
        401
    );
    assert_eq!(
        blocking(move || get(addr3, "/api/users", Some("s3cret-token")))
            .await
            .0,
        200
    );
    assert_eq!(
        blocking(move || get(addr3, "/api/users?token=s3cret-token", None))
            .await
            .0,
        200
    );
    assert_eq!(blocking(move || get(addr3, "/", None)).await.0, 200);
    let dom = blocking(move || {
        chromium_dom(
            &format!("http://{addr3}/?token=s3cret-token&user={user}"),
            None,
        )
    })
    .await;
    assert!(dom.contains(&format!("data-user=\"{user}\"")), "{dom}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}
