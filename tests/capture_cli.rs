//! `weir capture` as users run it: a process that is interrupted, killed and restarted.

mod support;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::TestDb;

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

fn write_config(db: &TestDb, dir: &Path, tables: &[&str]) -> std::path::PathBuf {
    let path = dir.join("weir.toml");
    let tables = tables
        .iter()
        .map(|t| format!("\"{t}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [{tables}]\ntls = \"disable\"\nstatus_interval_ms = 100\n",
            db.cluster.url(&db.db),
            db.cluster.password_file().display()
        ),
    )
    .unwrap();
    path
}

fn start_capture(config: &Path, out: &Path, stderr: &Path) -> Child {
    weir()
        .args(["capture", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(stderr).unwrap())
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
}

fn ids_in(out: &Path) -> HashMap<i64, usize> {
    let mut ids = HashMap::new();
    for line in std::fs::read_to_string(out).unwrap_or_default().lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("bad line {line:?}: {e}"));
        *ids.entry(v["id"].as_i64().unwrap()).or_default() += 1;
    }
    ids
}

fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// kill -9 at varied moments and Ctrl-C, each followed by a restart, while a writer keeps
/// committing: the output holds every row exactly once.
#[test]
fn restarts_after_sigint_and_kill9_lose_and_repeat_nothing() {
    let db = TestDb::new("restarts");
    db.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v text); INSERT INTO t (v) SELECT 'seed' FROM generate_series(1, 20000);");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&db, dir.path(), &["public.t"]);
    let out = dir.path().join("changes.jsonl");
    let log = dir.path().join("stderr.log");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let url = db.cluster.url_with_password(&db.db);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    i += 1;
                    // Mixed sizes: single rows and small batches.
                    let n = 1 + i % 7;
                    client
                        .batch_execute(&format!(
                            "INSERT INTO t (v) SELECT 'w' FROM generate_series(1, {n})"
                        ))
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
    };

    // Kill during the backfill, then at varied moments while streaming; one Ctrl-C.
    let delays_ms = [30u64, 400, 900, 250, 1300, 600];
    for (round, delay) in delays_ms.iter().enumerate() {
        let child = start_capture(&config, &out, &log);
        std::thread::sleep(Duration::from_millis(*delay));
        if round == 3 {
            signal(&child, libc::SIGINT);
        } else {
            signal(&child, libc::SIGKILL);
        }
        let mut child = child;
        let status = child.wait().unwrap();
        if round == 3 {
            assert!(
                status.success(),
                "Ctrl-C exits cleanly: {}",
                std::fs::read_to_string(&log).unwrap()
            );
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
    let total: usize = db.sql("SELECT count(*) FROM t").parse().unwrap();

    let mut child = start_capture(&config, &out, &log);
    wait_until("the capture to catch up", 60, || {
        ids_in(&out).len() >= total
    });
    signal(&child, libc::SIGINT);
    assert!(child.wait().unwrap().success());

    let ids = ids_in(&out);
    let dupes: Vec<_> = ids.iter().filter(|(_, n)| **n > 1).take(5).collect();
    assert!(dupes.is_empty(), "rows captured twice: {dupes:?}");
    assert_eq!(ids.len(), total, "every row captured");
    let max: i64 = db.sql("SELECT max(id) FROM t").parse().unwrap();
    assert!((1..=max).all(|id| ids.contains_key(&id)));
}

#[test]
fn warns_about_tables_without_identity_and_stops_at_until() {
    let db = TestDb::new("cliwarn");
    db.sql("CREATE TABLE events (msg text); INSERT INTO events VALUES ('old');");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&db, dir.path(), &["public.events"]);
    let out = dir.path().join("changes.jsonl");
    let log = dir.path().join("stderr.log");
    let mut child = start_capture(&config, &out, &log);
    wait_until("the backfill", 30, || ids_len(&out) >= 1);
    signal(&child, libc::SIGINT);
    assert!(child.wait().unwrap().success());
    let stderr = std::fs::read_to_string(&log).unwrap();
    assert!(
        stderr.contains("ALTER TABLE \"public\".\"events\" REPLICA IDENTITY FULL"),
        "the fix is named: {stderr}"
    );

    // --until: stops by itself at the position: transactions before it, none after.
    db.sql("INSERT INTO events VALUES ('a')");
    let until = db.sql("SELECT pg_current_wal_insert_lsn()");
    db.sql("INSERT INTO events VALUES ('b')");
    db.sql("INSERT INTO events VALUES ('c')");
    let status = weir()
        .args(["capture", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .args(["--until", &until])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let msgs: Vec<String> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["msg"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(msgs, ["old", "a"]);
}

fn ids_len(out: &Path) -> usize {
    std::fs::read_to_string(out)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Runs `weir capture` with `config` as its file; returns whether it succeeded and stderr.
fn capture_with_config(dir: &Path, config: &str) -> (bool, String) {
    let path = dir.join("bad.toml");
    std::fs::write(&path, config).unwrap();
    let out = weir()
        .args(["capture", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_fails_with_the_key_and_exit_code() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, stderr) = capture_with_config(
        dir.path(),
        "[source]\nurl = \"postgres://u@127.0.0.1:1/db\"\ntables = [\"t\"]\npublicaton = \"x\"\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("publicaton") && stderr.contains("bad.toml"),
        "{stderr}"
    );

    let (ok, stderr) = capture_with_config(
        dir.path(),
        "[source]\nurl = \"postgres://u:hunter2@127.0.0.1:1/db\"\ntables = [\"t\"]\n",
    );
    assert!(!ok);
    assert!(
        stderr.contains("cannot connect to PostgreSQL at 127.0.0.1:1"),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
}

/// `weir datagen` writes the bank data with recorded anomalies; captured and scored by the
/// fraud rule (`weir plugin test`), the injected anomalies are found and nothing else is.
#[test]
fn datagen_anomalies_are_found_by_the_fraud_rule() {
    let db = TestDb::new("bank");
    let dir = tempfile::tempdir().unwrap();
    let url = db.cluster.url(&db.db);
    let generated = weir()
        .args([
            "datagen",
            "--url",
            &url,
            "--rate",
            "2000",
            "--operations",
            "600",
        ])
        .args(["--anomaly-share", "0.1", "--seed", "7"])
        .env("PGPASSWORD", weir::local_postgres::SUPERUSER_PASSWORD)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&generated.stderr);
    assert!(generated.status.success(), "{stderr}");
    assert!(
        stderr.contains("wrote") && stderr.contains("anomalies"),
        "{stderr}"
    );
    assert_eq!(db.sql("SELECT count(*) FROM users"), "50");
    let truth: std::collections::HashSet<i64> = db
        .sql("SELECT transaction_id FROM weir_ground_truth")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert!(truth.len() > 20, "anomalies injected: {}", truth.len());

    // Capture everything written so far.
    let config = write_config(&db, dir.path(), &["public.users", "public.transactions"]);
    let out = dir.path().join("changes.jsonl");
    let until = db.sql("SELECT pg_current_wal_insert_lsn()");
    let status = weir()
        .args(["capture", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .args(["--until", &until])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());

    // Score it.
    let scored = weir()
        .args(["plugin", "test"])
        .arg(PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("fraud_rule.wasm"))
        .arg("--input")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        scored.status.success(),
        "{}",
        String::from_utf8_lossy(&scored.stderr)
    );
    let mut flagged = std::collections::HashSet::new();
    for line in String::from_utf8(scored.stdout).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["document"]["is_anomaly"] == serde_json::json!(true) {
            flagged.insert(v["document"]["transaction_id"].as_i64().unwrap());
        }
    }
    // The anomalies the rule's definition covers: the user had an earlier transaction and
    // no earlier anomaly (whose amount would lift the average it is compared with).
    let mut covered = std::collections::HashSet::new();
    let mut history: HashMap<i64, (u32, bool)> = HashMap::new();
    for line in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["_meta"]["source"]["table"] != serde_json::json!("transactions") {
            continue;
        }
        let (id, user) = (
            v["transaction_id"].as_i64().unwrap(),
            v["user_id"].as_i64().unwrap(),
        );
        let seen = history.entry(user).or_default();
        let injected = truth.contains(&id);
        if injected && seen.0 > 0 && !seen.1 {
            covered.insert(id);
        }
        seen.0 += 1;
        seen.1 |= injected;
    }
    let hits = flagged.intersection(&truth).count();
    let precision = hits as f64 / flagged.len().max(1) as f64;
    let recall = hits as f64 / truth.len() as f64;
    eprintln!(
        "precision {precision:.3}, recall {recall:.3} ({hits} of {} injected; {} covered by the rule's definition)",
        truth.len(),
        covered.len()
    );
    assert_eq!(
        precision,
        1.0,
        "normal transactions flagged: {:?}",
        flagged.difference(&truth).collect::<Vec<_>>()
    );
    let missed: Vec<_> = covered.difference(&flagged).collect();
    assert!(
        missed.is_empty(),
        "covered anomalies not flagged: {missed:?}"
    );
    assert!(
        covered.len() > 10,
        "the data must exercise the rule: {}",
        covered.len()
    );
}

#[test]
fn capture_to_standard_output_never_touches_a_pipelines_slot() {
    let db = TestDb::new("clistdout");
    db.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);");
    db.sql("SELECT pg_create_logical_replication_slot('weir', 'pgoutput');");
    let slot_before = db.sql("SELECT confirmed_flush_lsn FROM pg_replication_slots");
    db.sql("INSERT INTO t VALUES (2)");
    let until = db.sql("SELECT pg_current_wal_insert_lsn()");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(&db, dir.path(), &["t"]);
    let out = weir()
        .args(["capture", "--config"])
        .arg(&config)
        .args(["--until", &until])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let ids: Vec<i64> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ids, [1, 2]);
    // The pipeline's slot is where it was; the capture's temporary slot is gone.
    assert_eq!(
        db.sql("SELECT slot_name || ' ' || confirmed_flush_lsn FROM pg_replication_slots"),
        format!("weir {slot_before}")
    );
}
