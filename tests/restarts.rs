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

/// Replicas `a` and `b` equal their sources, row by row.
async fn assert_replicas_equal(db: &TestDb, lake: &std::path::Path) {
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
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         CREATE TABLE b (id int PRIMARY KEY, v text); \
         INSERT INTO b SELECT g, 'start' FROM generate_series(1, 100) g;",
    );
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
async fn a_shutdown_during_a_long_backfill_stops_within_seconds_and_the_next_start_copies_again() {
    let db = TestDb::new("longcopy");
    db.sql(
        "CREATE TABLE big (id int PRIMARY KEY, v text); \
         INSERT INTO big SELECT g, repeat('x', 40) FROM generate_series(1, 3000000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["big"], &lake);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run(&cfg, weir::pipeline::RunOptions::default(), rx).await
        })
    };
    // Once the first part of the copy is in the lake, ask for a shutdown.
    support::wait_for("the first backfill part", 120, || {
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
    // The next start copies again, into a replica equal to the source.
    run_until_now(&db, &cfg).await;
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT CAST(count(*) AS VARCHAR), CAST(count(DISTINCT id) AS VARCHAR), \
             CAST(min(id) AS VARCHAR), CAST(max(id) AS VARCHAR) FROM big"
        )
        .await,
        [["3000000", "3000000", "1", "3000000"]
            .map(String::from)
            .to_vec()]
    );
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
    let client = db.client().await;
    let writer = tokio::spawn(async move {
        for i in 0..40 {
            // 500 to 551 changes over both tables, written in parts of 300: `b` only in
            // the first part.
            let first = 1000 + i * 400;
            client
                .batch_execute(&format!(
                    "BEGIN; UPDATE b SET v = 'u{i}' WHERE id <= 100; \
                     INSERT INTO a SELECT g, 'n{i}' FROM generate_series({first}, {}) g; \
                     DELETE FROM a WHERE id BETWEEN {} AND {}; COMMIT;",
                    first + 399,
                    first - 400,
                    first - 350
                ))
                .await
                .unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(120)).await;
        }
    });
    kill_9_runs(&config, 5, 0x2545f4914f6cdd1d, 600, 1500).await;
    writer.await.unwrap();
    weir_until_now();

    let client = db.client().await;
    for t in ["a", "b"] {
        let want = pg_rows(
            &client,
            &format!("SELECT op, id::text FROM audit WHERE tbl = '{t}' ORDER BY audit.id, op, n"),
        )
        .await;
        let got = lake_rows(
            &lake,
            &format!(
                "SELECT _op, CAST(id AS VARCHAR) AS k FROM {t}_changes WHERE NOT _snapshot \
                 ORDER BY id, _op"
            ),
        )
        .await;
        assert!(
            want.len() > 3000,
            "{t}: the workload ran ({} changes)",
            want.len()
        );
        assert_same_rows(&want, &got, &format!("{t}_changes against the audit"));
    }
    assert_replicas_equal(&db, &lake).await;
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
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v text); \
         CREATE TABLE b (id int PRIMARY KEY, v text); \
         INSERT INTO b SELECT g, 'start' FROM generate_series(1, 100) g;",
    );
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
