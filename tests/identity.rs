//! Table identity: tables named as PostgreSQL resolves them (any case, quoted, search path,
//! other schemas, odd characters), partitioned tables captured through their root, and
//! captured tables renamed, dropped or removed from the publication. Each test compares
//! every replica with its source row by row and every change log for completeness.

mod support;

use std::time::Duration;

use support::TestDb;
use support::lake::*;
use weir::config::Config;
use weir::pipeline::{PipelineError, RunOptions, run};

/// Every streamed change of a change log, in order, as (`_op`, key), and the number of
/// backfill rows; fails on a change held twice.
async fn change_log(
    lake: &std::path::Path,
    table: &str,
    key: &str,
) -> (Vec<(String, String)>, usize) {
    let twice = lake_rows(
        lake,
        &format!(
            "SELECT count(*) FROM (SELECT _lsn, _seq FROM `{table}_changes` \
             GROUP BY _lsn, _seq HAVING count(*) > 1)"
        ),
    )
    .await;
    assert_eq!(twice[0][0], "0", "{table}_changes holds a change twice");
    let streamed = lake_rows(
        lake,
        &format!(
            "SELECT _op, CAST({key} AS VARCHAR) FROM `{table}_changes` \
             WHERE NOT _snapshot ORDER BY _lsn, _seq"
        ),
    )
    .await
    .into_iter()
    .map(|r| (r[0].clone(), r[1].clone()))
    .collect();
    let read = lake_rows(
        lake,
        &format!("SELECT count(*) FROM `{table}_changes` WHERE _snapshot"),
    )
    .await;
    (streamed, read[0][0].parse().unwrap())
}

fn ops(list: &[(&str, i64)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(op, k)| (op.to_string(), k.to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_are_named_as_postgres_resolves_them_and_every_change_lands_once() {
    let db = TestDb::new("identity");
    db.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text); \
         CREATE TABLE \"Accounts\" (\"Id\" int PRIMARY KEY, balance numeric(10,2)); \
         CREATE TABLE accounts (id int PRIMARY KEY, note text); \
         CREATE SCHEMA sales; CREATE TABLE sales.orders (id int PRIMARY KEY, total int); \
         CREATE SCHEMA \"my.app\"; \
         CREATE TABLE \"my.app\".\"odd \"\"name\"\" x\" (id int PRIMARY KEY, v text); \
         CREATE SCHEMA app; CREATE TABLE app.items (id int PRIMARY KEY, label text); \
         ALTER DATABASE identity SET search_path = app, public; \
         INSERT INTO users VALUES (1, 'ann'), (2, 'bob'); \
         INSERT INTO \"Accounts\" VALUES (1, 10.50), (2, 20.00); \
         INSERT INTO accounts VALUES (1, 'lower-case twin'); \
         INSERT INTO sales.orders VALUES (1, 100); \
         INSERT INTO \"my.app\".\"odd \"\"name\"\" x\" VALUES (1, 'a'); \
         INSERT INTO app.items VALUES (1, 'first');",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let tables = [
        "public.USERS",
        "public.\"Accounts\"",
        "ACCOUNTS",
        "SALES.Orders",
        "\"my.app\".\"odd \"\"name\"\" x\"",
        // Found through the database's search path, in schema `app`.
        "items",
    ];
    let cfg: Config = config(&db, &tables, &lake);
    run_until_now(&db, &cfg).await;
    db.sql(
        "INSERT INTO users VALUES (3, 'cy'); UPDATE users SET name = 'ann2' WHERE id = 1; \
         DELETE FROM users WHERE id = 2; \
         UPDATE \"Accounts\" SET balance = 11.25 WHERE \"Id\" = 1; \
         INSERT INTO \"Accounts\" VALUES (3, 0.01); \
         UPDATE accounts SET note = 'still lower' WHERE id = 1; \
         INSERT INTO sales.orders VALUES (2, 200); UPDATE sales.orders SET id = 3 WHERE id = 1; \
         INSERT INTO \"my.app\".\"odd \"\"name\"\" x\" VALUES (2, 'b'); \
         DELETE FROM \"my.app\".\"odd \"\"name\"\" x\" WHERE id = 1; \
         INSERT INTO app.items VALUES (2, 'second');",
    );
    let stats = run_until_now(&db, &cfg).await;
    assert!(stats.changes >= 11, "{stats:?}");

    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, name FROM users ORDER BY id",
        "SELECT id, name FROM users ORDER BY id",
        "users",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT \"Id\"::text, balance::text FROM \"Accounts\" ORDER BY 1",
        "SELECT `Id`, CAST(balance AS VARCHAR) FROM `Accounts` ORDER BY 1",
        "\"Accounts\"",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, note FROM public.accounts ORDER BY 1",
        "SELECT id, note FROM accounts ORDER BY 1",
        "accounts",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, total::text FROM sales.orders ORDER BY 1",
        "SELECT id, total FROM sales_orders ORDER BY 1",
        "sales.orders",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, v FROM \"my.app\".\"odd \"\"name\"\" x\" ORDER BY 1",
        "SELECT id, v FROM my_app_odd__name__x ORDER BY 1",
        "the table with dots, quotes and spaces",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, label FROM app.items ORDER BY 1",
        "SELECT id, label FROM app_items ORDER BY 1",
        "app.items (search path)",
    )
    .await;

    // Every change exactly once, in order, in each change log.
    assert_eq!(
        change_log(&lake, "users", "id").await,
        (ops(&[("c", 3), ("u", 1), ("d", 2)]), 2)
    );
    assert_eq!(
        change_log(&lake, "Accounts", "`Id`").await,
        (ops(&[("u", 1), ("c", 3)]), 2)
    );
    assert_eq!(
        change_log(&lake, "accounts", "id").await,
        (ops(&[("u", 1)]), 1)
    );
    assert_eq!(
        change_log(&lake, "sales_orders", "id").await,
        (ops(&[("c", 2), ("u", 3)]), 1)
    );
    assert_eq!(
        change_log(&lake, "my_app_odd__name__x", "id").await,
        (ops(&[("c", 2), ("d", 1)]), 1)
    );
    assert_eq!(
        change_log(&lake, "app_items", "id").await,
        (ops(&[("c", 2)]), 1)
    );

    // The publication holds the tables PostgreSQL resolved, not the configured spellings.
    let published = db.sql(
        "SELECT string_agg(schemaname || '.' || tablename, ',' \
           ORDER BY schemaname COLLATE \"C\", tablename COLLATE \"C\") \
         FROM pg_publication_tables WHERE pubname = 'weir'",
    );
    assert_eq!(
        published,
        "app.items,my.app.odd \"name\" x,public.Accounts,public.accounts,public.users,sales.orders"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tables_for_one_delta_name_are_refused_with_the_fix() {
    let db = TestDb::new("collide");
    db.sql(
        "CREATE SCHEMA a; CREATE TABLE a.b (id int PRIMARY KEY); \
         CREATE TABLE a_b (id int PRIMARY KEY);",
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(&db, &["a.b", "public.a_b"], &dir.path().join("lake"));
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = run(&cfg, RunOptions::default(), rx).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("a.b") && text.contains("public.a_b") && text.contains("a_b"),
        "{text}"
    );
    assert!(text.contains("[lake.tables."), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_table_is_captured_through_its_root_also_new_partitions() {
    let db = TestDb::new("parts");
    db.sql(
        "CREATE TABLE events (id int, at date, what text, PRIMARY KEY (id, at)) \
           PARTITION BY RANGE (at); \
         CREATE TABLE events_2025 PARTITION OF events \
           FOR VALUES FROM ('2025-01-01') TO ('2026-01-01'); \
         INSERT INTO events VALUES (1, '2025-03-01', 'old'), (2, '2025-04-01', 'old'); \
         CREATE PUBLICATION weir FOR TABLE events;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["events"], &lake);
    run_until_now(&db, &cfg).await;
    assert_eq!(
        db.sql("SELECT pubviaroot FROM pg_publication WHERE pubname = 'weir'"),
        "t",
        "the existing publication publishes via the root"
    );
    // A partition created after the start, rows moved between partitions, deletes.
    db.sql(
        "CREATE TABLE events_2026 PARTITION OF events \
           FOR VALUES FROM ('2026-01-01') TO ('2027-01-01'); \
         INSERT INTO events VALUES (3, '2026-02-01', 'new'); \
         UPDATE events SET at = '2026-05-01', what = 'moved' WHERE id = 2; \
         UPDATE events SET what = 'kept' WHERE id = 1; \
         DELETE FROM events WHERE id = 3; \
         INSERT INTO events VALUES (4, '2026-06-01', 'last');",
    );
    run_until_now(&db, &cfg).await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, at::text, what FROM events ORDER BY id",
        "SELECT id, CAST(at AS VARCHAR), what FROM events ORDER BY id",
        "events",
    )
    .await;
    let (streamed, read) = change_log(&lake, "events", "id").await;
    assert_eq!(read, 2, "both backfilled rows, read through the root");
    // A row moved between partitions arrives as a delete and an insert.
    assert_eq!(
        streamed,
        ops(&[("c", 3), ("d", 2), ("c", 2), ("u", 1), ("d", 3), ("c", 4)])
    );
    // No Delta table per partition.
    assert!(!lake.join("events_2025").exists() && !lake.join("events_2026").exists());
}

/// Starts the pipeline in the background; returns its stop switch and handle.
fn run_in_background(
    cfg: &Config,
) -> (
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<Result<weir::pipeline::RunStats, PipelineError>>,
) {
    let (stop, rx) = tokio::sync::watch::channel(false);
    let cfg = cfg.clone();
    let task = tokio::spawn(async move { run(&cfg, RunOptions::default(), rx).await });
    (stop, task)
}

async fn wait_rows(lake: &std::path::Path, sql: &str, want: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if lake.join("orders").exists() {
            let rows = lake_rows(lake, sql).await;
            if rows.first().is_some_and(|r| r[0] == want) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "`{sql}` did not give {want} in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn ended_with_error(
    task: tokio::task::JoinHandle<Result<weir::pipeline::RunStats, PipelineError>>,
) -> String {
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the pipeline stopped")
        .unwrap()
        .expect_err("the pipeline stopped with an error")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renamed_tables_are_followed_dropped_or_unpublished_ones_stop_the_pipeline() {
    let db = TestDb::new("renames");
    db.sql(
        "CREATE TABLE orders (id int PRIMARY KEY, total int); \
         CREATE TABLE users (id int PRIMARY KEY, name text); \
         INSERT INTO orders VALUES (1, 10); INSERT INTO users VALUES (1, 'ann');",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["orders", "users"], &lake);

    // Renamed while streaming: its changes keep going to the same replica.
    let (_stop, task) = run_in_background(&cfg);
    wait_rows(&lake, "SELECT count(*) FROM orders", "1").await;
    db.sql(
        "ALTER TABLE orders RENAME TO orders_v2; INSERT INTO orders_v2 VALUES (2, 20); \
         UPDATE orders_v2 SET total = 11 WHERE id = 1;",
    );
    wait_rows(&lake, "SELECT sum(total) FROM orders", "31").await;

    // Removed from the publication by someone else: a stop that names it and the fix.
    db.sql("ALTER PUBLICATION weir DROP TABLE orders_v2; INSERT INTO orders_v2 VALUES (3, 30);");
    let err = ended_with_error(task).await;
    assert!(
        err.contains("public.orders_v2") && err.contains("removed from publication"),
        "{err}"
    );
    assert!(
        err.contains("ALTER PUBLICATION \"weir\" ADD TABLE"),
        "{err}"
    );

    // The old name no longer resolves: the error says to write the new one.
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = run(&cfg, RunOptions::default(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("`orders`") && err.contains("renamed"), "{err}");

    // The new name, but the table left the publication while weir was stopped: its
    // changes since are not in the stream, so weir refuses to go on without them.
    let mut cfg2 = config(&db, &["orders_v2", "users"], &lake);
    cfg2.lake.tables.insert(
        "orders_v2".into(),
        weir::config::LakeTableConfig {
            name: Some("orders".into()),
            ..Default::default()
        },
    );
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = run(&cfg2, RunOptions::default(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("public.orders_v2") && err.contains("no publication"),
        "{err}"
    );
    assert_eq!(
        db.sql("SELECT count(*) FROM pg_publication_tables WHERE tablename = 'orders_v2'"),
        "0",
        "weir did not quietly add it back"
    );

    // Dropped while streaming: a stop that names it.
    let cfg3 = config(&db, &["users"], &lake);
    let (_stop, task) = run_in_background(&cfg3);
    db.sql("INSERT INTO users VALUES (2, 'bob');");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lake_rows(&lake, "SELECT count(*) FROM users").await[0][0] != "2" {
        assert!(
            tokio::time::Instant::now() < deadline,
            "users did not reach 2 rows"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    db.sql("DROP TABLE users;");
    let err = ended_with_error(task).await;
    assert!(
        err.contains("public.users") && err.contains("was dropped"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_identity_using_index_and_full_with_a_key_keep_replicas_equal() {
    let db = TestDb::new("identities");
    db.sql(
        "CREATE TABLE acct (id int PRIMARY KEY, code text NOT NULL, v int); \
         CREATE UNIQUE INDEX acct_code ON acct (code); \
         ALTER TABLE acct REPLICA IDENTITY USING INDEX acct_code; \
         CREATE TABLE full_pk (id int PRIMARY KEY, v text); \
         ALTER TABLE full_pk REPLICA IDENTITY FULL; \
         INSERT INTO acct VALUES (1, 'a', 1), (2, 'b', 2), (3, 'c', 3); \
         INSERT INTO full_pk VALUES (1, 'x'), (2, NULL), (3, 'z');",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["acct", "full_pk"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(
        "UPDATE acct SET v = 10 WHERE id = 1; \
         UPDATE acct SET code = 'b2' WHERE id = 2; \
         UPDATE acct SET id = 30 WHERE id = 3; \
         DELETE FROM acct WHERE id = 1; \
         INSERT INTO acct VALUES (4, 'a', 4); \
         UPDATE full_pk SET v = 'x2' WHERE id = 1; \
         UPDATE full_pk SET id = 20 WHERE id = 2; \
         DELETE FROM full_pk WHERE id = 3;",
    );
    run_until_now(&db, &cfg).await;
    // A second batch on rows the first one moved.
    db.sql("DELETE FROM acct WHERE code = 'b2'; UPDATE full_pk SET v = 'back' WHERE id = 20;");
    run_until_now(&db, &cfg).await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, code, v::text FROM acct ORDER BY code",
        "SELECT id, code, v FROM acct ORDER BY code",
        "acct (USING INDEX)",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, coalesce(v, 'NULL') FROM full_pk ORDER BY id",
        "SELECT id, v FROM full_pk ORDER BY id",
        "full_pk (FULL with a key)",
    )
    .await;
    let (streamed, read) = change_log(&lake, "acct", "code").await;
    assert_eq!(read, 3);
    assert_eq!(
        streamed,
        [
            ("u", "a"),
            ("u", "b2"),
            ("u", "c"),
            ("d", "a"),
            ("c", "a"),
            ("d", "b2")
        ]
        .map(|(o, k)| (o.to_string(), k.to_string()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_without_a_key_under_replica_identity_full_is_kept_as_a_multiset() {
    multiset(weir::config::DeleteMode::Hard).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multiset_replica_with_soft_deletes_keeps_every_deleted_row_marked() {
    multiset(weir::config::DeleteMode::Soft).await;
}

/// A table without a key, NULLs and twins: the replica's rows (not deleted) are the
/// table's multiset, with hard or soft deletes.
async fn multiset(delete: weir::config::DeleteMode) {
    let soft = delete == weir::config::DeleteMode::Soft;
    let db = TestDb::new("multiset");
    db.sql(
        "CREATE TABLE log (a int, b text, c numeric(6,2)); \
         ALTER TABLE log REPLICA IDENTITY FULL; \
         INSERT INTO log VALUES (1, 'x', 1.5), (1, 'x', 1.5), (1, 'x', 1.5), \
           (NULL, 'y', NULL), (NULL, 'y', NULL), (2, NULL, 2);",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["log"], &lake);
    cfg.lake.delete = delete;
    run_until_now(&db, &cfg).await;
    let pg =
        "SELECT a::text, b, c::text FROM log ORDER BY a NULLS FIRST, b NULLS FIRST, c NULLS FIRST";
    let delta = format!(
        "SELECT a, b, CAST(c AS VARCHAR) AS c_text FROM log {} \
         ORDER BY a NULLS FIRST, b NULLS FIRST, c NULLS FIRST",
        if soft { "WHERE NOT _deleted" } else { "" }
    );
    let delta = delta.as_str();
    assert_query_equal(&db, &lake, pg, delta, "log after the backfill").await;
    // One twin deleted, one NULL-holding twin updated, a twin added, a row added and
    // removed in the same batch, a row with a NULL deleted.
    let one = |cond: &str| format!("(SELECT ctid FROM log WHERE {cond} LIMIT 1)");
    db.sql(&format!(
        "DELETE FROM log WHERE ctid = {}; \
         UPDATE log SET b = 'y2' WHERE ctid = {}; \
         INSERT INTO log VALUES (2, NULL, 2); \
         INSERT INTO log VALUES (9, 't', 0); DELETE FROM log WHERE a = 9; \
         DELETE FROM log WHERE ctid = {};",
        one("a = 1"),
        one("a IS NULL"),
        one("a = 2")
    ));
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "log after one-row changes").await;
    // Two changes with equal old rows in one statement; then more in a later batch.
    db.sql("UPDATE log SET c = 3 WHERE a = 1;");
    db.sql("DELETE FROM log WHERE b IS NULL; INSERT INTO log VALUES (1, 'x', 3);");
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "log after twin updates").await;
    assert_eq!(
        db.sql("SELECT count(*) FROM log WHERE a = 1 AND c = 3"),
        "3",
        "the test made three twins"
    );
    // A restart with nothing new keeps it so.
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "log after a restart").await;
    // Soft: each of the four rows deleted stays, marked, with its delete's position (two
    // transactions deleted them).
    if soft {
        let deleted = lake_rows(
            &lake,
            "SELECT CAST(count(*) AS VARCHAR), CAST(count(DISTINCT _lsn) AS VARCHAR) \
             FROM log WHERE _deleted",
        )
        .await;
        assert_eq!(deleted, vec![vec!["4".to_string(), "2".to_string()]]);
    }
}
