//! Large transactions across several tables, and restarts: every change in every change
//! log exactly once, every replica equal to its source.

mod support;

use support::TestDb;
use support::lake::*;

/// (`_op`, number of changes, distinct keys) of the streamed changes of a change log;
/// fails on a change held twice.
async fn streamed(lake: &std::path::Path, table: &str) -> Vec<Vec<String>> {
    assert_change_log_has_no_duplicates(lake, table).await;
    lake_rows(
        lake,
        &format!(
            "SELECT _op, CAST(count(*) AS VARCHAR), CAST(count(DISTINCT id) AS VARCHAR) \
             FROM {table}_changes WHERE NOT _snapshot GROUP BY _op ORDER BY _op"
        ),
    )
    .await
}

/// Two keyed tables, `b` with 100 rows.
const TWO_TABLES: &str = "CREATE TABLE a (id int PRIMARY KEY, v text); \
     CREATE TABLE b (id int PRIMARY KEY, v text); \
     INSERT INTO b SELECT g, 'start' FROM generate_series(1, 100) g;";

/// Replicas `a` and `b` equal their sources, row by row.
async fn assert_replicas_equal(db: &TestDb, lake: &(impl AsLake + ?Sized)) {
    let client = db.client().await;
    for t in ["a", "b"] {
        assert_same_rows(
            &pg_rows(
                &client,
                &format!("SELECT id::text, v FROM {t} ORDER BY {t}.id"),
            )
            .await,
            &lake_rows(lake, &format!("SELECT id, v FROM {t} ORDER BY id")).await,
            t,
        );
    }
}

fn rows(list: &[(&str, u64, u64)]) -> Vec<Vec<String>> {
    list.iter()
        .map(|(op, n, k)| vec![op.to_string(), n.to_string(), k.to_string()])
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_in_parts_records_its_position_in_every_table_it_touched() {
    let db = TestDb::new("parts");
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         CREATE TABLE b (id int PRIMARY KEY, v text);",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["a", "b"], &lake);
    cfg.lake.part_rows = 1000;
    run_until_now(&db, &cfg).await;
    // 4,000 changes: four full parts, the last part empty at the commit.
    db.sql(
        "BEGIN; INSERT INTO a SELECT g, 'x' FROM generate_series(1, 2500) g; \
         INSERT INTO b SELECT g, 'y' FROM generate_series(1, 1500) g; COMMIT;",
    );
    // `b` only in the first part of this one.
    db.sql(
        "BEGIN; INSERT INTO b SELECT g, 'z' FROM generate_series(1501, 2000) g; \
         UPDATE a SET v = 'u' WHERE id <= 1700; COMMIT;",
    );
    let stats = run_until_now(&db, &cfg).await;
    assert!(
        stats.parts >= 6,
        "the transactions went in parts: {stats:?}"
    );
    // A restart (which clears what unfinished transactions left), then one more change.
    db.sql("INSERT INTO a VALUES (9999, 'last');");
    run_until_now(&db, &cfg).await;

    assert_eq!(
        streamed(&lake, "a").await,
        rows(&[("c", 2501, 2501), ("u", 1700, 1700)])
    );
    assert_eq!(streamed(&lake, "b").await, rows(&[("c", 2000, 2000)]));
    assert_replicas_equal(&db, &lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_walsenders_are_retried_and_every_change_lands_once() {
    let db = TestDb::new("terminate");
    db.sql(TWO_TABLES);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["a", "b"], &lake);
    cfg.lake.part_rows = 500;
    run_until_now(&db, &cfg).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    let mut terminated = 0;
    for round in 0..5 {
        // 700 changes over both tables: written in parts.
        db.sql(&format!(
            "BEGIN; INSERT INTO a SELECT g, 'r{round}' FROM generate_series({}, {}) g; \
             UPDATE b SET v = 'r{round}' WHERE id <= 100; COMMIT;",
            round * 600 + 1,
            round * 600 + 600
        ));
        tokio::time::sleep(std::time::Duration::from_millis(200 + 150 * round as u64)).await;
        terminated += db
            .sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_replication")
            .parse::<u32>()
            .unwrap();
    }
    assert!(terminated >= 3, "walsenders terminated: {terminated}");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let done = lake.join("b_changes").exists()
            && lake_rows(&lake, "SELECT count(*) FROM b_changes WHERE NOT _snapshot").await[0][0]
                == "500"
            && lake_rows(&lake, "SELECT count(*) FROM a").await[0][0] == "3000";
        if done {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pipeline did not catch up after the terminations"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("the pipeline ended without an error");
    // A restart reads the change logs again: still complete.
    run_until_now(&db, &cfg).await;
    assert_eq!(streamed(&lake, "a").await, rows(&[("c", 3000, 3000)]));
    assert_eq!(streamed(&lake, "b").await, rows(&[("u", 500, 100)]));
    assert_replicas_equal(&db, &lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_a_long_backfill_stops_within_seconds_and_the_next_start_copies_only_what_is_missing()
 {
    let db = TestDb::new("longcopy");
    db.sql(
        "CREATE TABLE early (id int PRIMARY KEY, v text); \
         INSERT INTO early SELECT g, 'start' FROM generate_series(1, 2000) g; \
         CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, repeat('x', 40) FROM generate_series(1, 3000000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // Copied in this order: `early` is complete when `big`'s copy is cut short.
    let cfg = config(&db, &["early", "big"], &lake);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    // Once the early part of the copy is in the lake, ask for a shutdown.
    support::wait_for("the early backfill part", 120, || {
        lake.join("big/_delta_log").exists()
    })
    .await;
    let asked = std::time::Instant::now();
    stop.send(true).unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), task)
        .await
        .expect("the shutdown did not wait for the rest of the copy")
        .unwrap()
        .expect("the interrupted run ends without an error");
    eprintln!(
        "stopped {:?} after the shutdown was asked for",
        asked.elapsed()
    );
    let held = lake_rows(&lake, "SELECT count(*) FROM big").await[0][0]
        .parse::<u64>()
        .unwrap();
    assert!(held < 3_000_000, "the copy was interrupted: {held} rows");
    let copied_at = |table: &'static str| {
        let lake = lake.clone();
        async move {
            lake_rows(
                &lake,
                &format!(
                    "SELECT CAST(_lsn AS VARCHAR), CAST(count(*) AS VARCHAR), \
                     CAST(count(DISTINCT id) AS VARCHAR) FROM {table}_changes \
                     WHERE _snapshot GROUP BY _lsn"
                ),
            )
            .await
        }
    };
    let first_copy = copied_at("early").await;
    assert_eq!(first_copy.len(), 1, "one copy of `early`: {first_copy:?}");
    assert_eq!(first_copy[0][1..], ["2000", "2000"]);
    // Changes while weir is stopped, to the table it copied and to the one it did not
    // finish.
    db.sql(
        "UPDATE early SET v = 'after' WHERE id <= 10; DELETE FROM early WHERE id > 1990; \
         INSERT INTO early VALUES (5000, 'new'); \
         UPDATE big SET v = 'after' WHERE id <= 10; DELETE FROM big WHERE id = 3000000; \
         INSERT INTO big VALUES (3000001, 'new');",
    );
    // The next start keeps `early` (it streams on from its copy: the slot was kept) and
    // copies `big` again, into a replica equal to the source.
    run_until_now(&db, &cfg).await;
    assert_eq!(
        copied_at("early").await,
        first_copy,
        "`early` was not copied again"
    );
    assert_eq!(
        streamed(&lake, "early").await,
        rows(&[("c", 1, 1), ("d", 10, 10), ("u", 10, 10)])
    );
    let client = db.client().await;
    assert_same_rows(
        &pg_rows(&client, "SELECT id::text, v FROM early ORDER BY early.id").await,
        &lake_rows(&lake, "SELECT id, v FROM early ORDER BY id").await,
        "early",
    );
    let summary = "SELECT CAST(count(*) AS VARCHAR), CAST(count(DISTINCT id) AS VARCHAR), \
                   CAST(min(id) AS VARCHAR), CAST(max(id) AS VARCHAR), \
                   CAST(sum(CASE WHEN v = 'after' THEN 1 ELSE 0 END) AS VARCHAR), \
                   CAST(sum(CASE WHEN v = 'new' THEN 1 ELSE 0 END) AS VARCHAR) FROM big";
    let want = [["3000000", "3000000", "1", "3000001", "10", "1"]
        .map(String::from)
        .to_vec()];
    assert_eq!(pg_rows(&client, summary).await, want);
    assert_eq!(lake_rows(&lake, summary).await, want);
    // `big` copied once more, whole, at a later snapshot.
    let big_copy = copied_at("big").await;
    assert_eq!(
        big_copy.len(),
        1,
        "one complete copy of `big`: {big_copy:?}"
    );
    assert_eq!(big_copy[0][1..], ["3000000", "3000000"]);
    assert!(
        big_copy[0][0].parse::<i64>().unwrap() > first_copy[0][0].parse::<i64>().unwrap(),
        "`big` was copied at a snapshot after the early one"
    );
}

/// Writes `transactions` transactions, `pause_ms` apart, each updating the 100 rows of `b`,
/// inserting `rows` rows into `a` and deleting an eighth as many of the previous ones.
fn two_table_writer(
    client: tokio_postgres::Client,
    transactions: u64,
    rows: u64,
    pause_ms: u64,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for i in 0..transactions {
            let first = 1000 + i * rows;
            client
                .batch_execute(&format!(
                    "BEGIN; UPDATE b SET v = 'u{i}' WHERE id <= 100; \
                     INSERT INTO a SELECT g, 'n{i}' FROM generate_series({first}, {}) g; \
                     DELETE FROM a WHERE id BETWEEN {} AND {}; COMMIT;",
                    first + rows - 1,
                    first - rows,
                    first - rows + rows / 8
                ))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(pause_ms)).await;
        }
    })
}

/// Records every row change of `tables` (op, key) in `audit`, a table no publication
/// holds: the oracle a change log is compared with.
fn audit(db: &TestDb, tables: &[&str]) {
    db.sql(
        "CREATE TABLE audit (n bigserial PRIMARY KEY, tbl text, op text, id int); \
         CREATE FUNCTION audit_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO audit (tbl, op, id) VALUES (TG_TABLE_NAME, \
             CASE TG_OP WHEN 'INSERT' THEN 'c' WHEN 'UPDATE' THEN 'u' ELSE 'd' END, \
             CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END); \
           RETURN NULL; END $$;",
    );
    for t in tables {
        db.sql(&format!(
            "CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON {t} \
             FOR EACH ROW EXECUTE FUNCTION audit_row();"
        ));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_transactions_in_parts_across_tables_loses_and_repeats_no_change() {
    use std::process::{Command, Stdio};
    let db = TestDb::new("kills");
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         CREATE TABLE b (id int PRIMARY KEY, v text); \
         INSERT INTO a SELECT g, 'start' FROM generate_series(1, 100) g; \
         INSERT INTO b SELECT g, 'start' FROM generate_series(1, 100) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"a\", \"b\"]\n\
             tls = \"disable\"\nstatus_interval_ms = 100\n\n[lake]\nurl = \"{}\"\n\
             change_log = true\npart_rows = 300\n",
            db.cluster.url(&db.db),
            db.cluster.password_file().display(),
            lake.display()
        ),
    )
    .unwrap();
    let weir_until_now = || {
        let until = db.sql("SELECT pg_current_wal_insert_lsn()");
        let status = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(["run", "--config"])
            .arg(&config)
            .args(["--until", &until])
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "weir run --until");
    };
    weir_until_now();
    // From here on every change is streamed; the audit sees each one.
    audit(&db, &["a", "b"]);
    // 500 to 551 changes over both tables, written in parts of 300: `b` only in the first
    // part.
    let writer = two_table_writer(db.client().await, 40, 400, 120);
    kill_9_runs(&config, 5, 0x2545f4914f6cdd1d, 600, 1500).await;
    writer.await.unwrap();
    weir_until_now();

    assert_change_logs_match_audit(&db, &lake, &["a", "b"], 3000).await;
    assert_replicas_equal(&db, &lake).await;
    // What a killed run had staged of a transaction is gone.
    for t in ["a", "b", "a_changes", "b_changes"] {
        let staged = lake.join(t).join("_weir_staging");
        assert!(!staged.exists(), "{} is left behind", staged.display());
    }
}

/// The change logs of `tables` hold every change the audit saw, each once and in commit
/// order; each holds more than `at_least`.
async fn assert_change_logs_match_audit(
    db: &TestDb,
    lake: &(impl AsLake + ?Sized),
    tables: &[&str],
    at_least: usize,
) {
    let client = db.client().await;
    for t in tables {
        let want = pg_rows(
            &client,
            &format!(
                "SELECT op, coalesce(id::text, 'NULL') FROM audit WHERE tbl = '{t}' ORDER BY n"
            ),
        )
        .await;
        let got = lake_rows(
            lake,
            &format!(
                "SELECT _op, CAST(id AS VARCHAR) FROM {t}_changes WHERE NOT _snapshot \
                 ORDER BY _lsn, _seq"
            ),
        )
        .await;
        assert!(
            want.len() > at_least,
            "{t}: the workload ran ({} changes)",
            want.len()
        );
        assert_same_rows(
            &want,
            &got,
            &format!("{t}_changes against the audit, in order"),
        );
    }
}

/// Waits until the change logs of `a` and `b` hold as many streamed changes as the audit,
/// failing when the pipeline ends or `secs` pass.
async fn wait_for_audit<T: std::fmt::Debug>(
    db: &TestDb,
    lake: &(impl AsLake + ?Sized),
    task: &mut tokio::task::JoinHandle<T>,
    secs: u64,
) {
    let client = db.client().await;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let mut behind = Vec::new();
        for t in ["a", "b"] {
            let want = pg_rows(
                &client,
                &format!("SELECT count(*)::text FROM audit WHERE tbl = '{t}'"),
            )
            .await;
            let got = lake_rows(
                lake,
                &format!("SELECT count(*) FROM {t}_changes WHERE NOT _snapshot"),
            )
            .await;
            if want != got {
                behind.push((t, want[0][0].clone(), got[0][0].clone()));
            }
        }
        if behind.is_empty() {
            return;
        }
        if task.is_finished() {
            panic!("the pipeline ended: {:?}", task.await);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pipeline did not catch up (table, audit, change log): {behind:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// With the pipeline already run once over `a` and `b`: runs it (with retries) while
/// multi-table transactions in parts land and `proxy` cuts its connections three times and
/// delivers nothing for 6 s (the connections open then stay silent for good); then every
/// change log equals the audit and every replica its source.
async fn faults_through(
    proxy: &support::proxy::Proxy,
    db: &TestDb,
    cfg: &weir::config::Config,
    lake: &(impl AsLake + ?Sized),
) {
    audit(db, &["a", "b"]);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    // Written directly, not through the proxy: transactions of about 440 changes over
    // both tables, in parts.
    let writer = two_table_writer(db.client().await, 60, 300, 150);
    let pause = |ms| tokio::time::sleep(std::time::Duration::from_millis(ms));
    let streaming = |task: &tokio::task::JoinHandle<_>| {
        task.is_finished()
            || db.sql("SELECT active FROM pg_replication_slots WHERE slot_name = 'weir'") == "t"
    };
    // Faults from the start, when the lake was never reached, are the configuration's.
    support::wait_for("the pipeline to stream", 60, || streaming(&task)).await;
    for wait in [800, 1300, 600] {
        pause(wait).await;
        proxy.cut();
    }
    // Streaming again, nothing gets through for 6 s, and no end hears of it: weir finds
    // out on its own (the connections open then never deliver again).
    support::wait_for("the pipeline to stream again", 60, || streaming(&task)).await;
    pause(500).await;
    proxy.freeze();
    pause(6000).await;
    proxy.thaw();
    writer.await.unwrap();
    wait_for_audit(db, lake, &mut task, 180).await;
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("the pipeline ended without an error");
    run_until_now(db, cfg).await;
    assert_change_logs_match_audit(db, lake, &["a", "b"], 2000).await;
    assert_replicas_equal(db, lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_cuts_and_a_frozen_network_are_retried_and_every_change_lands_once() {
    // The server gives up on a walsender that hears nothing for 3 s (a frozen network).
    let db = TestDb::with_conf("netcut", "wal_sender_timeout = '3s'\n");
    db.sql(TWO_TABLES);
    let proxy = support::proxy::Proxy::start(db.cluster.port()).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["a", "b"], &lake);
    cfg.source.url = proxy.url(&db);
    cfg.source.receive_timeout_s = 1;
    cfg.source.connect_timeout_s = 1;
    cfg.lake.part_rows = 200;
    run_until_now(&db, &cfg).await;
    faults_through(&proxy, &db, &cfg, &lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_advanced_by_someone_else_stops_the_next_start_and_start_over_recovers() {
    // Commits wait for their WAL: the slot can only be advanced over flushed WAL.
    let db = TestDb::with_conf("slotahead", weir::local_postgres::SYNCHRONOUS_COMMIT);
    db.sql("CREATE TABLE a (id int PRIMARY KEY, v text); INSERT INTO a VALUES (1, 'one');");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["a"], &lake);
    run_until_now(&db, &cfg).await;

    // An idle pipeline on a busy server records the server's position before it
    // acknowledges it: the slot moves on, and the next start is not mistaken for one
    // whose slot someone else advanced.
    let (stop, rx) = tokio::sync::watch::channel(false);
    let pipeline = tokio::spawn({
        let cfg = cfg.clone();
        async move {
            let opts = weir::pipeline::RunOptions {
                idle_interval: Some(std::time::Duration::from_millis(200)),
                ..Default::default()
            };
            weir::pipeline::run(&cfg, opts, rx).await
        }
    });
    db.cluster.create_database("elsewhere").unwrap();
    db.cluster
        .psql(
            "elsewhere",
            "CREATE TABLE x AS SELECT generate_series(1, 10000) i",
        )
        .unwrap();
    let wal_now = now_lsn(&db);
    support::wait_for("the idle slot to advance", 30, || {
        db.confirmed_flush("weir") >= wal_now
    })
    .await;
    stop.send(true).unwrap();
    pipeline.await.unwrap().expect("pipeline stopped cleanly");
    db.sql("INSERT INTO a VALUES (2, 'two');");
    run_until_now(&db, &cfg).await;

    // Someone else reads the slot while weir is stopped: the row they consumed cannot
    // come again, and weir says so rather than go on without it.
    db.sql("INSERT INTO a VALUES (3, 'three');");
    let held = db.confirmed_flush("weir");
    db.sql("SELECT pg_replication_slot_advance('weir', pg_current_wal_lsn())");
    let acked = db.confirmed_flush("weir");
    assert!(acked > held, "the slot was advanced past the row");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        weir::pipeline::run(&cfg, weir::pipeline::RunOptions::default(), rx),
    )
    .await
    .expect("the start stopped")
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("advanced") && err.contains("--start-over"),
        "{err}"
    );
    assert_eq!(
        db.confirmed_flush("weir"),
        acked,
        "the slot was left as it was"
    );

    // Starting over rebuilds the replica from a new slot.
    db.sql("UPDATE a SET v = 'uno' WHERE id = 1;");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    weir::pipeline::run(
        &cfg,
        weir::pipeline::RunOptions {
            stop_at: Some(now_lsn(&db)),
            start_over: true,
            ..Default::default()
        },
        rx,
    )
    .await
    .expect("started over");
    db.sql("INSERT INTO a VALUES (4, 'four');");
    run_until_now(&db, &cfg).await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, v FROM a ORDER BY a.id",
        "SELECT id, v FROM a ORDER BY id",
        "a after starting over",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_crashes_under_load_are_retried_and_every_change_lands_once() {
    // Commits wait for their WAL (the test clusters' default does not): a crash keeps them.
    let db = TestDb::with_conf("servercrash", weir::local_postgres::SYNCHRONOUS_COMMIT);
    db.sql(TWO_TABLES);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["a", "b"], &lake);
    cfg.lake.part_rows = 500;
    run_until_now(&db, &cfg).await;
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    for round in 0..3u64 {
        db.sql(&format!(
            "BEGIN; INSERT INTO a SELECT g, 'r{round}' FROM generate_series({}, {}) g; \
             UPDATE b SET v = 'r{round}' WHERE id <= 100; COMMIT;",
            round * 600 + 1,
            round * 600 + 600
        ));
        tokio::time::sleep(std::time::Duration::from_millis(100 + 200 * round)).await;
        // An immediate shutdown is a crash: the server recovers from its WAL at start.
        db.cluster.stop().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        db.cluster.start_again().unwrap();
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let done = lake.join("b_changes").exists()
            && lake_rows(&lake, "SELECT count(*) FROM b_changes WHERE NOT _snapshot").await[0][0]
                == "300"
            && lake_rows(&lake, "SELECT count(*) FROM a").await[0][0] == "1800";
        if done {
            break;
        }
        if task.is_finished() {
            panic!("the pipeline ended: {:?}", task.await.unwrap());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pipeline did not catch up after the crashes: {:?} {:?}",
            lake_rows(&lake, "SELECT count(*) FROM b_changes WHERE NOT _snapshot").await,
            lake_rows(&lake, "SELECT count(*) FROM a").await
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("the pipeline ended without an error");
    run_until_now(&db, &cfg).await;
    assert_eq!(streamed(&lake, "a").await, rows(&[("c", 1800, 1800)]));
    assert_eq!(streamed(&lake, "b").await, rows(&[("u", 300, 100)]));
    assert_replicas_equal(&db, &lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_store_out_of_reach_is_retried_and_every_change_lands_once() {
    let s3 = support::S3Server::start();
    s3.create_bucket("weir-faults");
    let proxy = support::proxy::Proxy::start(s3.port()).await;
    let db = TestDb::new("s3faults");
    db.sql(TWO_TABLES);
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &["a", "b"], &dir.path().join("unused"));
    // Through the proxy, with the store client's own retries cut short, so that its
    // failures reach weir.
    let mut storage = s3.options_with_credentials();
    storage.insert(
        "aws_endpoint".into(),
        format!("http://127.0.0.1:{}", proxy.port),
    );
    for (k, v) in [
        ("max_retries", "1"),
        ("retry_timeout", "1s"),
        ("timeout", "2s"),
        ("connect_timeout", "1s"),
    ] {
        storage.insert(k.into(), v.into());
    }
    cfg.lake.url = "s3://weir-faults/lake".into();
    cfg.lake.storage = weir::config::StorageOptions(storage);
    cfg.lake.part_rows = 200;
    // Read back directly.
    let mut direct = cfg.lake.clone();
    direct.storage = weir::config::StorageOptions(s3.options_with_credentials());
    let lake = weir::sink::delta::Lake::from_config(&direct, false).unwrap();
    run_until_now(&db, &cfg).await;
    faults_through(&proxy, &db, &cfg, &lake).await;
}

/// A xorshift step: the fault test's pseudo-random numbers, repeatable from the seed.
fn next_random(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

/// One transaction of the fault test's workload, chosen by `r`: inserts, updates, key
/// changes, deletes (of one twin of a duplicated row too), truncates, DDL, and
/// transactions larger than a part, over a keyed table `a`, a keyed table `b` and a table
/// `c` without a key (replica identity full, with NULLs and twin rows).
fn fault_workload(i: u64, r: u64, has_w: bool) -> String {
    let first = 1 + i * 1000;
    let w = if has_w { ", w" } else { "" };
    let wv = if has_w { ", g % 7" } else { "" };
    match r % 20 {
        // Larger than a part (300 changes), over every table.
        0 | 1 => format!(
            "BEGIN; INSERT INTO a (id, v{w}) SELECT g, 'big{i}'{wv} FROM generate_series({first}, {}) g; \
             UPDATE b SET v = 'big{i}' WHERE id % 3 = {}; \
             INSERT INTO c SELECT g % 50, CASE WHEN g % 5 = 0 THEN NULL ELSE 'c{i}' END \
               FROM generate_series(1, 150) g; COMMIT;",
            first + 599,
            i % 3
        ),
        // A key changes.
        2 | 3 => "UPDATE a SET id = id + 10000000 WHERE id IN \
                  (SELECT id FROM a WHERE id < 10000000 ORDER BY id LIMIT 3);"
            .to_string(),
        // One of two twins goes, another row of c changes.
        4 | 5 => "BEGIN; DELETE FROM c WHERE ctid = (SELECT ctid FROM c WHERE v IS NOT NULL \
                  ORDER BY id, v LIMIT 1); UPDATE c SET v = 'changed' WHERE ctid = \
                  (SELECT ctid FROM c ORDER BY id DESC LIMIT 1); COMMIT;"
            .to_string(),
        // b starts over.
        6 => "BEGIN; TRUNCATE b; INSERT INTO b SELECT g, 'again' FROM generate_series(1, 100) g; \
              COMMIT;"
            .to_string(),
        // c is emptied now and then.
        7 if i.is_multiple_of(4) => "TRUNCATE c;".to_string(),
        // Columns come and go between row changes of one transaction, under a few names
        // used again (a dropped column stays in the Delta tables: a new name each time
        // would grow them by a column per transaction, and every commit with them).
        8 => format!(
            "BEGIN; UPDATE b SET v = 'before{i}' WHERE id = 1; ALTER TABLE b ADD COLUMN z{z} text; \
             UPDATE b SET v = 'during{i}', z{z} = 'z{i}' WHERE id = 2; ALTER TABLE b DROP COLUMN z{z}; \
             UPDATE b SET v = 'after{i}' WHERE id = 3; COMMIT;",
            z = i % 3
        ),
        // Small mixed transactions.
        _ => format!(
            "BEGIN; INSERT INTO a (id, v{w}) SELECT g, 'n{i}'{wv} FROM generate_series({first}, {}) g; \
             UPDATE b SET v = 'u{i}' WHERE id = {}; DELETE FROM a WHERE id = {}; \
             INSERT INTO c VALUES ({}, 'twin'), ({}, 'twin'), (NULL, NULL); COMMIT;",
            first + 4,
            1 + r % 100,
            first.saturating_sub(1000) + r % 5,
            r % 10,
            r % 10
        ),
    }
}

/// Random `kill -9`s of `weir run` and crashes of PostgreSQL under a mixed workload: at the
/// end every change log equals the audit, change for change and in order, and every
/// replica equals its source. `WEIR_SOAK_SECS` makes it longer, `WEIR_SOAK_SEED` repeats
/// a run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_and_server_crashes_under_a_mixed_workload_lose_and_repeat_nothing() {
    use std::process::{Command, Stdio};
    let secs: u64 = std::env::var("WEIR_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(40);
    let mut seed: u64 = std::env::var("WEIR_SOAK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("fault test: WEIR_SOAK_SEED={seed} WEIR_SOAK_SECS={secs}");
    let db = TestDb::with_conf("faults", weir::local_postgres::SYNCHRONOUS_COMMIT);
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         CREATE TABLE b (id int PRIMARY KEY, v text); \
         CREATE TABLE c (id int, v text); ALTER TABLE c REPLICA IDENTITY FULL; \
         INSERT INTO a SELECT g, 'start' FROM generate_series(1, 100) g; \
         INSERT INTO b SELECT g, 'start' FROM generate_series(1, 100) g; \
         INSERT INTO c SELECT g % 10, 'start' FROM generate_series(1, 30) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = dir.path().join("weir.toml");
    std::fs::write(
        &config,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"a\", \"b\", \"c\"]\n\
             tls = \"disable\"\nstatus_interval_ms = 100\nconnect_timeout_s = 2\n\n\
             [lake]\nurl = \"{}\"\nchange_log = true\npart_rows = 300\n",
            db.cluster.url(&db.db),
            db.cluster.password_file().display(),
            lake.display()
        ),
    )
    .unwrap();
    // Every run's log goes to one file, shown when a run fails (`WEIR_SOAK_LOG` keeps it).
    let log = std::env::var_os("WEIR_SOAK_LOG")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("weir.log"));
    let weir = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_weir"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        command
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::from(file));
        command
    };
    let weir_until_now = || {
        let until = db.sql("SELECT pg_current_wal_insert_lsn()");
        let started = std::time::Instant::now();
        let status = weir().args(["--until", &until]).status().unwrap();
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        assert!(
            status.success(),
            "weir run --until {until}; the log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
        eprintln!(
            "fault test: caught up to {until} in {:?}",
            started.elapsed()
        );
    };
    weir_until_now();
    audit(&db, &["a", "b", "c"]);
    db.sql(
        "CREATE FUNCTION audit_truncate() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           INSERT INTO audit (tbl, op) VALUES (TG_TABLE_NAME, 't'); RETURN NULL; END $$; \
         CREATE TRIGGER audit_t AFTER TRUNCATE ON b FOR EACH STATEMENT \
           EXECUTE FUNCTION audit_truncate(); \
         CREATE TRIGGER audit_t AFTER TRUNCATE ON c FOR EACH STATEMENT \
           EXECUTE FUNCTION audit_truncate();",
    );

    // The writer goes on through the crashes: a failed transaction may or may not have
    // committed, and the audit knows which.
    let url = db.cluster.url_with_password(&db.db);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(secs);
    let mut writer_seed = next_random(&mut seed);
    let writer = tokio::spawn(async move {
        let connect = || async {
            loop {
                if let Ok((client, conn)) =
                    tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                {
                    tokio::spawn(conn);
                    return client;
                }
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        };
        let mut client = connect().await;
        let (mut committed, mut failed, mut has_w) = (0u64, 0u64, false);
        let mut i = 1;
        while tokio::time::Instant::now() < deadline {
            let sql = if i == 30 && !has_w {
                // A column with a default: older rows show it in the replica too.
                "ALTER TABLE a ADD COLUMN IF NOT EXISTS w int DEFAULT 5".to_string()
            } else {
                fault_workload(i, next_random(&mut writer_seed), has_w)
            };
            match client.batch_execute(&sql).await {
                Ok(()) => {
                    committed += 1;
                    has_w |= sql.contains("ADD COLUMN IF NOT EXISTS w");
                    i += 1;
                }
                Err(_) => {
                    failed += 1;
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    if client.is_closed() {
                        client = connect().await;
                    }
                    if !sql.contains("ADD COLUMN IF NOT EXISTS w") {
                        i += 1;
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(30)).await;
        }
        (committed, failed)
    });

    let mut child = weir().spawn().unwrap();
    let (mut kills, mut crashes) = (0, 0);
    while tokio::time::Instant::now() < deadline {
        let wait = 500 + next_random(&mut seed) % 2500;
        tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
        if next_random(&mut seed) % 5 < 3 {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
            assert!(!child.wait().unwrap().success(), "weir was killed");
            child = weir().spawn().unwrap();
            kills += 1;
        } else {
            // An immediate shutdown is a crash: the server recovers from its WAL at start.
            db.cluster.stop().unwrap();
            let down = 200 + next_random(&mut seed) % 1500;
            tokio::time::sleep(std::time::Duration::from_millis(down)).await;
            db.cluster.start_again().unwrap();
            crashes += 1;
        }
    }
    let (committed, failed) = writer.await.unwrap();
    // SAFETY: as above.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    let _ = child.wait();
    eprintln!(
        "fault test: {kills} kills, {crashes} server crashes, {committed} transactions \
         committed, {failed} failed"
    );
    assert!(
        committed > 100,
        "the workload ran: {committed} transactions"
    );
    weir_until_now();

    let started = std::time::Instant::now();
    assert_change_logs_match_audit(&db, &lake, &["a", "b", "c"], 0).await;
    eprintln!(
        "fault test: change logs compared in {:?}",
        started.elapsed()
    );
    let client = db.client().await;
    for (t, pg, delta) in [
        (
            "a",
            "SELECT id::text, v, w::text FROM a ORDER BY a.id",
            "SELECT CAST(id AS VARCHAR) AS k, v, CAST(w AS VARCHAR) AS wv FROM a ORDER BY id",
        ),
        (
            "b",
            "SELECT id::text, v FROM b ORDER BY b.id",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM b ORDER BY id",
        ),
        (
            "c",
            "SELECT id::text, v FROM c ORDER BY c.id NULLS LAST, v NULLS LAST",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM c ORDER BY id NULLS LAST, v NULLS LAST",
        ),
    ] {
        assert_same_rows(
            &pg_rows(&client, pg).await,
            &lake_rows(&lake, delta).await,
            &format!("replica {t}"),
        );
    }
}

/// A table joins the configuration while both tables are written: it is copied at a
/// snapshot of its own and its changes after that follow, each once and in order, while
/// every change of the table already in the lake lands once and that table is not copied
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_added_under_load_is_copied_alone_and_no_change_is_lost_or_doubled() {
    let db = TestDb::new("addlive");
    db.sql(TWO_TABLES);
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let with = |tables: &[&str]| {
        let mut cfg = config(&db, tables, &lake);
        cfg.lake.part_rows = 200;
        cfg
    };
    db.sql("INSERT INTO a SELECT g, 'start' FROM generate_series(1, 50) g;");
    run_until_now(&db, &with(&["a"])).await;
    audit(&db, &["a", "b"]);
    // Transactions of about 440 changes over both tables, in parts; some before `b` joins.
    let writer = two_table_writer(db.client().await, 40, 300, 100);
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let cfg = with(&["a", "b"]);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    writer.await.unwrap();
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("the pipeline ended without an error");
    run_until_now(&db, &cfg).await;

    assert_change_logs_match_audit(&db, &lake, &["a"], 2000).await;
    assert_replicas_equal(&db, &lake).await;
    assert_eq!(
        lake_rows(&lake, "SELECT count(*) FROM a_changes WHERE _snapshot").await,
        vec![vec!["50"]],
        "a was copied once"
    );
    // b's streamed changes are exactly the audit's after its copy: a suffix, in order.
    let client = db.client().await;
    let want = pg_rows(
        &client,
        "SELECT op, id::text FROM audit WHERE tbl = 'b' ORDER BY n",
    )
    .await;
    let got = lake_rows(
        &lake,
        "SELECT _op, CAST(id AS VARCHAR) FROM b_changes WHERE NOT _snapshot ORDER BY _lsn, _seq",
    )
    .await;
    assert!(
        !got.is_empty() && got.len() < want.len(),
        "b's changes straddle its copy: {} of {}",
        got.len(),
        want.len()
    );
    assert_same_rows(
        &want[want.len() - got.len()..],
        &got,
        "b_changes: the audit's changes after the copy",
    );
    assert_eq!(
        lake_rows(&lake, "SELECT count(*) FROM b_changes WHERE _snapshot").await,
        vec![vec!["100"]],
        "b copied once"
    );
}

/// `weir resync` copies one table again while the pipeline runs and writes go on over
/// both tables: the replica is repaired (rows lost from it, a row under a key the source
/// does not have, values PostgreSQL rewrote without sending them), readers never see it
/// emptied or half-filled, the other table keeps every change, and each change log holds
/// every change once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weir_resync_repairs_a_table_under_load_and_readers_never_see_it_emptied() {
    let db = TestDb::new("resync");
    db.sql(TWO_TABLES);
    db.sql("INSERT INTO a SELECT g, 'x' FROM generate_series(100001, 106000) g");
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&db, &["a", "b"], &dir.path().join("lake"));
    cfg.lake.part_rows = 200;
    run_until_now(&db, &cfg).await;
    let lake = weir::sink::delta::Lake::from_config(&cfg.lake, false).unwrap();
    // Damage behind weir's back: rows lost from the replica, one moved to a key the
    // source does not have, and values rewritten in the source without a row change in
    // the stream (a USING of the same type, which weir cannot tell from VACUUM FULL).
    let table = deltalake::open_table(lake.table_url("a")).await.unwrap();
    let (table, _) = table.delete().with_predicate("id <= 100010").await.unwrap();
    table
        .update()
        .with_predicate("id = 100020")
        .with_update("id", "900020")
        .await
        .unwrap();
    db.sql("ALTER TABLE a ALTER COLUMN v TYPE text USING v || '!'");
    audit(&db, &["a", "b"]);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    let writer = two_table_writer(db.client().await, 30, 300, 100);
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let asked = weir::source::resync::request_resync(&cfg.source, &["public.A".into()])
        .await
        .unwrap();
    assert_eq!(asked.len(), 1);
    assert_eq!(asked[0].0, "public.a");
    // Readers of the replica, meanwhile: the rows the writer leaves alone are all there
    // every time (a copy into an emptied replica would show fewer).
    let untouched = "SELECT count(*) FROM a WHERE id BETWEEN 100021 AND 106000";
    let mut looks = 0;
    while !writer.is_finished() || looks < 20 {
        let n = lake_rows(&lake, untouched).await;
        assert_eq!(n, [["5980"]], "a reader saw the replica with rows missing");
        looks += 1;
        assert!(!task.is_finished(), "the pipeline ended: {:?}", task.await);
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    writer.await.unwrap();
    wait_for_audit(&db, &lake, &mut task, 180).await;
    // The copy is in: the repaired rows are back with the source's values.
    let client = db.client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let want = pg_rows(&client, "SELECT count(*)::text FROM a WHERE v = 'x!'").await;
        let got = lake_rows(&lake, "SELECT count(*) FROM a WHERE v = 'x!'").await;
        if want == got {
            break;
        }
        assert!(!task.is_finished(), "the pipeline ended: {:?}", task.await);
        assert!(
            std::time::Instant::now() < deadline,
            "the resync did not land: {want:?} rows in the source, {got:?} in the replica"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    stop.send(true).unwrap();
    task.await
        .unwrap()
        .expect("the pipeline ended without an error");
    run_until_now(&db, &cfg).await;
    assert_replicas_equal(&db, &lake).await;
    assert_eq!(
        lake_rows(&lake, "SELECT count(*) FROM a WHERE id = 900020").await,
        [["0"]]
    );
    // The change logs: every change once; `a`'s holds its second copy too, `b`'s none.
    assert_change_logs_match_audit(&db, &lake, &["a", "b"], 1000).await;
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT count(DISTINCT _lsn) FROM a_changes WHERE _snapshot"
        )
        .await,
        [["2"]]
    );
    assert_eq!(
        lake_rows(&lake, "SELECT count(*) FROM b_changes WHERE _snapshot").await,
        [["100"]]
    );
    // A request for a table the pipeline does not capture is refused, naming it.
    db.sql("CREATE TABLE other (id int PRIMARY KEY)");
    let err = weir::source::resync::request_resync(&cfg.source, &["other".into()])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.other") && err.contains("not one of the tables"),
        "{err}"
    );
}
