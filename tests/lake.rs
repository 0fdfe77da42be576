//! Delta Lake materialization: replicas, change logs, exactly-once across crashes, and
//! `weir query`, against a private PostgreSQL and real Delta tables read back with
//! DataFusion.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::TestDb;
use support::lake::*;
use weir::Lsn;
use weir::config::{Config, DeleteMode, LakeConfig, LakeTableConfig};
use weir::pipeline::{RunOptions, run};
use weir::sink::delta::Lake;

const BANK_PG: &str = "SELECT transaction_id::text, user_id::text, amount::text, \
    (extract(epoch FROM transaction_date) * 1000000)::bigint::text \
    FROM transactions ORDER BY transactions.transaction_id";
const BANK_LAKE: &str = "SELECT transaction_id, user_id, CAST(amount AS VARCHAR), \
    CAST(CAST(transaction_date AS BIGINT) AS VARCHAR) \
    FROM transactions ORDER BY transaction_id";
const USERS_PG: &str = "SELECT user_id::text, name, email FROM users ORDER BY users.user_id";
const USERS_LAKE: &str = "SELECT user_id, name, email FROM users ORDER BY user_id";

async fn assert_bank_replica_equals_source(db: &TestDb, lake: &(impl AsLake + ?Sized)) {
    let client = db.client().await;
    let pg = pg_rows(&client, BANK_PG).await;
    let delta = lake_rows(lake, BANK_LAKE).await;
    assert_same_rows(&pg, &delta, "transactions");
    let users = pg_rows(&client, USERS_PG).await;
    assert_same_rows(&users, &lake_rows(lake, USERS_LAKE).await, "users");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_into_its_delta_type() {
    let db = TestDb::new("types");
    db.sql(
        "CREATE TYPE mood AS ENUM ('sad', 'happy');
         CREATE TABLE t (id int PRIMARY KEY, i2 smallint, i8 bigint, n numeric(12,2),
           nu numeric, r real, d double precision, b boolean, tx text, vc varchar(10),
           tz timestamptz, ts timestamp, dt date, tm time, u uuid, j jsonb, by bytea,
           m mood, ai int[], at text[], iv interval);",
    );
    let row = "7, 12345678901, 1234.50, 3.14159265358979323846, 1.5, 2.25, true, 'héllo', 'vc',
        '2024-05-01 12:00:00.25+02', '2024-05-01 12:00:00.123456', '2024-05-01', '23:59:59.5',
        'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{\"a\": [1, 2]}', '\\xdeadbeef', 'happy',
        '{1,2,3}', '{a,b}', '1 day 02:00:00'";
    // Row 1 comes through the backfill, row 2 through the stream, row 3 is all NULLs.
    db.sql(&format!("INSERT INTO t VALUES (1, {row})"));
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["public.t"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(&format!(
        "INSERT INTO t VALUES (2, {row}); INSERT INTO t (id) VALUES (3)"
    ));
    run_until_now(&db, &cfg).await;

    let q = lake_query(&lake, "weir").await;
    let batches = q.sql("SELECT * FROM t ORDER BY id").await.unwrap();
    let schema = batches[0].schema();
    let ty = |c: &str| schema.field_with_name(c).unwrap().data_type().to_string();
    assert_eq!(ty("i2"), "Int16");
    assert_eq!(ty("id"), "Int32");
    assert_eq!(ty("i8"), "Int64");
    assert_eq!(ty("n"), "Decimal128(12, 2)");
    assert!(ty("nu").starts_with("Utf8"), "{}", ty("nu"));
    assert_eq!(ty("r"), "Float32");
    assert_eq!(ty("d"), "Float64");
    assert_eq!(ty("b"), "Boolean");
    assert!(
        ty("tz").starts_with("Timestamp(µs, \"UTC\")") || ty("tz").contains("UTC"),
        "{}",
        ty("tz")
    );
    assert!(!ty("ts").contains("UTC"), "{}", ty("ts"));
    assert_eq!(ty("dt"), "Date32");
    assert!(ty("by").starts_with("Binary"), "{}", ty("by"));
    assert!(
        ty("ai").contains("List") && ty("ai").contains("Int32"),
        "{}",
        ty("ai")
    );
    let rows = batches_to_rows(&batches);
    let names: Vec<String> = schema.fields().iter().map(|f| f.name().clone()).collect();
    let get =
        |row: usize, col: &str| rows[row][names.iter().position(|n| n == col).unwrap()].clone();
    for r in [0, 1] {
        assert_eq!(get(r, "i2"), "7");
        assert_eq!(get(r, "i8"), "12345678901");
        assert_eq!(get(r, "n"), "1234.50");
        assert_eq!(get(r, "nu"), "3.14159265358979323846");
        assert_eq!(get(r, "r"), "1.5");
        assert_eq!(get(r, "d"), "2.25");
        assert_eq!(get(r, "b"), "true");
        assert_eq!(get(r, "tx"), "héllo");
        assert_eq!(get(r, "tz"), "2024-05-01T10:00:00.250Z");
        assert_eq!(get(r, "ts"), "2024-05-01T12:00:00.123456");
        assert_eq!(get(r, "dt"), "2024-05-01");
        assert!(get(r, "tm").starts_with("23:59:59.5"), "{}", get(r, "tm"));
        assert_eq!(get(r, "u"), "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
        assert_eq!(get(r, "j"), r#"{"a":[1,2]}"#);
        assert_eq!(get(r, "by"), "deadbeef");
        assert_eq!(get(r, "m"), "happy");
        assert_eq!(get(r, "ai"), "[1, 2, 3]");
        assert_eq!(get(r, "at"), "[a, b]");
        assert_eq!(get(r, "iv"), "P1DT2H");
    }
    for col in ["i2", "n", "tz", "by", "ai", "j"] {
        assert_eq!(get(2, col), "NULL", "{col} of the NULL row");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_follow_every_op_with_hard_and_soft_deletes() {
    every_op(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_s3_follow_every_op_with_hard_and_soft_deletes() {
    let s3 = support::S3Server::start();
    every_op(Some(&s3)).await;
}

/// Every op, hard and soft deletes, TOAST, truncate and log checkpoints, into a local lake
/// or one on the test S3 server.
async fn every_op(s3: Option<&support::S3Server>) {
    let db = TestDb::new("ops");
    // `big` is large and incompressible enough to be stored out of line (TOAST), so an
    // update that leaves it alone sends it as "unchanged".
    let big = "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 400))";
    db.sql(&format!(
        "CREATE TABLE hard (id int PRIMARY KEY, v text, big text);
         CREATE TABLE soft (id int PRIMARY KEY, v text, big text);
         INSERT INTO hard SELECT i, 'v' || i, {big} FROM generate_series(1, 5) i;
         INSERT INTO soft SELECT i, 'v' || i, {big} FROM generate_series(1, 5) i;"
    ));
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(
        &db,
        &["public.hard", "public.soft"],
        &dir.path().join("lake"),
    );
    if let Some(s3) = s3 {
        let (mut on_s3, _) = s3_lake(s3, "weir-ops");
        on_s3.storage = weir::config::StorageOptions(s3.options_with_credentials());
        cfg.lake = on_s3;
    }
    let lake = Lake::from_config(&cfg.lake, true).unwrap();
    cfg.lake.checkpoint_interval = 2;
    cfg.lake.tables.insert(
        "public.soft".into(),
        LakeTableConfig {
            delete: Some(DeleteMode::Soft),
            ..LakeTableConfig::default()
        },
    );
    run_until_now(&db, &cfg).await;
    for t in ["hard", "soft"] {
        db.sql(&format!(
            "INSERT INTO {t} VALUES (6, 'v6', 'small');
             UPDATE {t} SET v = 'changed' WHERE id = 2;
             UPDATE {t} SET id = 30 WHERE id = 3;
             DELETE FROM {t} WHERE id = 4;
             BEGIN; INSERT INTO {t} VALUES (7, 'gone', NULL); DELETE FROM {t} WHERE id = 7; COMMIT;
             BEGIN; UPDATE {t} SET v = 'once' WHERE id = 5; UPDATE {t} SET v = 'twice' WHERE id = 5; COMMIT;"
        ));
    }
    run_until_now(&db, &cfg).await;

    let client = db.client().await;
    let pg_sql = |t: &str| format!("SELECT id::text, v, md5(big) FROM {t} ORDER BY {t}.id");
    let expected = pg_rows(&client, &pg_sql("hard")).await;
    assert_eq!(expected.len(), 5, "{expected:?}");
    let hard = lake_rows(&lake, "SELECT id, v, md5(big) FROM hard ORDER BY id").await;
    assert_eq!(
        hard, expected,
        "hard replica equals the source (TOAST kept)"
    );
    let soft_live = lake_rows(
        &lake,
        "SELECT id, v, md5(big) FROM soft WHERE NOT _deleted ORDER BY id",
    )
    .await;
    assert_eq!(soft_live, pg_rows(&client, &pg_sql("soft")).await);
    let soft_deleted = lake_rows(&lake, "SELECT id FROM soft WHERE _deleted ORDER BY id").await;
    assert_eq!(
        soft_deleted,
        vec![vec!["3".to_string()], vec!["4".to_string()]]
    );

    // The change log has every change once, in order, with its metadata.
    let n = assert_change_log_has_no_duplicates(&lake, "hard").await;
    assert_eq!(n, 5 + 8, "5 backfilled rows and 8 changes");
    let ops = lake_rows(
        &lake,
        "SELECT _op, id FROM hard_changes WHERE NOT _snapshot ORDER BY _lsn, _seq",
    )
    .await;
    let ops: Vec<String> = ops.iter().map(|r| format!("{}{}", r[0], r[1])).collect();
    assert_eq!(ops, ["c6", "u2", "u30", "d4", "c7", "d7", "u5", "u5"]);
    let unchanged = lake_rows(
        &lake,
        "SELECT _unchanged FROM hard_changes WHERE _op = 'u' AND id = 2",
    )
    .await;
    assert_eq!(unchanged, vec![vec!["[big]".to_string()]]);

    // The Delta log is checkpointed at the configured interval.
    let checkpoints = {
        use futures_util::TryStreamExt;
        let store =
            deltalake::logstore::store_for(&lake.table_url("hard"), lake.storage.clone()).unwrap();
        let files: Vec<_> = store
            .list(Some(&deltalake::Path::from("_delta_log")))
            .try_collect()
            .await
            .unwrap();
        files
            .iter()
            .filter(|f| f.location.as_ref().contains(".checkpoint."))
            .count()
    };
    assert!(
        checkpoints > 0,
        "no Delta log checkpoint in hard/_delta_log"
    );

    // Truncate: the hard replica empties, the soft one marks every row deleted.
    db.sql("TRUNCATE hard; TRUNCATE soft; INSERT INTO hard VALUES (100, 'after', NULL);");
    run_until_now(&db, &cfg).await;
    assert_eq!(
        lake_rows(&lake, "SELECT id, v FROM hard").await,
        vec![vec!["100".to_string(), "after".to_string()]]
    );
    assert_eq!(
        lake_rows(&lake, "SELECT count(*) FROM soft WHERE NOT _deleted").await,
        vec![vec!["0".to_string()]]
    );
    assert_eq!(
        lake_rows(&lake, "SELECT _op FROM hard_changes WHERE _op = 't'").await,
        vec![vec!["t".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_reach_the_lake_without_a_restart() {
    let db = TestDb::new("evolve");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["public.t"], &lake);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let pipeline = {
        let cfg = cfg.clone();
        tokio::spawn(async move { run(&cfg, RunOptions::default(), rx).await })
    };
    let seen = |sql: &'static str, want: Vec<Vec<String>>| {
        let lake = lake.clone();
        async move {
            for _ in 0..300 {
                if lake.join("t").join("_delta_log").exists() {
                    let q = lake_query(&lake, "weir").await;
                    if let Ok(b) = q.sql(sql).await
                        && batches_to_rows(&b) == want
                    {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            panic!("the lake never showed {want:?} for {sql}");
        }
    };
    seen("SELECT id, v FROM t", vec![vec!["1".into(), "a".into()]]).await;
    db.sql("ALTER TABLE t ADD COLUMN note text; INSERT INTO t VALUES (2, 'b', 'new column');");
    seen(
        "SELECT id, note FROM t WHERE id = 2",
        vec![vec!["2".into(), "new column".into()]],
    )
    .await;
    db.sql("ALTER TABLE t DROP COLUMN v; INSERT INTO t VALUES (3, 'after drop');");
    seen(
        "SELECT id, v, note FROM t ORDER BY id",
        vec![
            vec!["1".into(), "a".into(), "NULL".into()],
            vec!["2".into(), "b".into(), "new column".into()],
            vec!["3".into(), "NULL".into(), "after drop".into()],
        ],
    )
    .await;
    stop.send(true).unwrap();
    let stats = pipeline.await.unwrap().expect("pipeline stopped cleanly");
    assert!(stats.position.is_some());
}

fn weir() -> Command {
    Command::new(env!("CARGO_BIN_EXE_weir"))
}

/// `weir run --config <config> --until <now>`, which must succeed.
fn weir_run_until_now(db: &TestDb, config: &Path) {
    let out = weir()
        .args(["run", "--config"])
        .arg(config)
        .args(["--until", &now_lsn(db).to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_config(db: &TestDb, lake: &Path, dir: &Path) -> PathBuf {
    let path = dir.join("weir.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"public.users\", \"public.transactions\"]\ntls = \"disable\"\nstatus_interval_ms = 100\n\n[lake]\nurl = \"{}\"\nchange_log = true\n",
            db.cluster.url(&db.db),
            db.cluster.password_file().display(),
            lake.display()
        ),
    )
    .unwrap();
    path
}

async fn datagen(db: &TestDb, rate: f64, operations: u64, seed: u64) {
    let client = db.client().await;
    let settings = weir::datagen::Settings {
        users: 20,
        rate,
        operations: Some(operations),
        seed,
        ..weir::datagen::Settings::default()
    };
    weir::datagen::prepare(&client, &settings).await.unwrap();
    weir::datagen::run(&client, &settings, std::future::pending())
        .await
        .unwrap();
}

/// `datagen` running on its own connection while the test goes on.
fn datagen_in_background(
    db: &TestDb,
    rate: f64,
    operations: u64,
    seed: u64,
) -> tokio::task::JoinHandle<()> {
    let url = db.cluster.url_with_password(&db.db);
    tokio::spawn(async move {
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let settings = weir::datagen::Settings {
            users: 20,
            rate,
            operations: Some(operations),
            seed,
            ..weir::datagen::Settings::default()
        };
        weir::datagen::run(&client, &settings, std::future::pending())
            .await
            .unwrap();
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_between_the_delta_commit_and_the_acknowledgment_repeats_nothing() {
    let db = TestDb::new("crash");
    datagen(&db, 10_000.0, 300, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    // The first run commits the backfill (each table's copy, then its end: three
    // commits), then the first streamed batch, and dies before acknowledging it.
    let writer = {
        let db_url = db.cluster.url_with_password(&db.db);
        tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&db_url, tokio_postgres::NoTls)
                .await
                .unwrap();
            tokio::spawn(conn);
            // Once the slot exists, the update is streamed (not part of the backfill).
            loop {
                let n: i64 = client
                    .query_one(
                        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'weir'",
                        &[],
                    )
                    .await
                    .unwrap()
                    .get(0);
                if n == 1 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            client
                .batch_execute(
                    "UPDATE transactions SET amount = amount + 1 WHERE transaction_id % 3 = 0",
                )
                .await
                .unwrap();
        })
    };
    let mut crashing = weir();
    crashing
        .args(["run", "--config"])
        .arg(&config)
        .env("WEIR_CRASH_AFTER_COMMITS", "4")
        .stderr(Stdio::piped());
    let out = tokio::task::spawn_blocking(move || crashing.output().unwrap())
        .await
        .unwrap();
    writer.await.unwrap();
    assert!(!out.status.success(), "the run was meant to crash");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("crashing on purpose"), "{log}");
    let before = db.confirmed_flush("weir");
    // The lake holds the update; PostgreSQL was not told.
    let updated = lake_rows(
        &lake,
        "SELECT _lsn FROM transactions_changes WHERE _op = 'u'",
    )
    .await;
    assert!(!updated.is_empty(), "the crashed run committed the update");
    weir_run_until_now(&db, &config);
    assert!(db.confirmed_flush("weir") > before);
    assert_bank_replica_equals_source(&db, &lake).await;
    assert_change_log_has_no_duplicates(&lake, "transactions").await;

    // Maintenance leaves the tables as they were.
    for args in [
        vec!["lake", "optimize", "--config"],
        vec!["lake", "vacuum", "--retention-hours", "0", "--config"],
    ] {
        let out = weir().args(&args).arg(&config).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("transactions_changes:"), "{args:?}: {said}");
    }
    assert_bank_replica_equals_source(&db, &lake).await;
    let updates = lake_rows(
        &lake,
        "SELECT count(*) FROM transactions_changes WHERE _op = 'u'",
    )
    .await;
    let expected = pg_rows(
        &db.client().await,
        "SELECT count(*) FROM transactions WHERE transaction_id % 3 = 0",
    )
    .await;
    assert!(
        updates[0][0].parse::<u64>().unwrap() >= expected[0][0].parse::<u64>().unwrap(),
        "every update of the replayed transaction is in the change log once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_loses_and_repeats_nothing() {
    let db = TestDb::new("kill");
    datagen(&db, 10_000.0, 200, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    let writer = datagen_in_background(&db, 300.0, 3000, 3);
    kill_9_runs(&config, 5, 0x9e3779b97f4a7c15, 700, 2000).await;
    writer.await.unwrap();
    weir_run_until_now(&db, &config);
    assert_bank_replica_equals_source(&db, &lake).await;
    let n = assert_change_log_has_no_duplicates(&lake, "transactions").await;
    assert!(n > 1000, "the change log holds the stream ({n} rows)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anomaly_query_gives_what_postgres_gives() {
    let db = TestDb::new("anomaly");
    datagen(&db, 10_000.0, 1500, 4).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["public.users", "public.transactions"], &lake);
    cfg.lake.change_log = false;
    cfg.lake.catalog = "finance-demo".into();
    run_until_now(&db, &cfg).await;
    assert_bank_replica_equals_source(&db, &lake).await;

    let query = |users: &str, transactions: &str| {
        format!(
            "WITH user_avg AS (
               SELECT transaction_id, user_id, amount,
                      AVG(amount) OVER (PARTITION BY user_id) AS avg_amount
               FROM {transactions})
             SELECT t.transaction_id, u.name,
                    CASE WHEN t.amount > 3 * t.avg_amount THEN TRUE ELSE FALSE END AS is_anomaly
             FROM user_avg t JOIN {users} u ON u.user_id = t.user_id
             ORDER BY t.transaction_id"
        )
    };
    let pg = pg_rows(&db.client().await, &query("users", "transactions")).await;
    let q = lake_query(&lake, "finance-demo").await;
    let delta = batches_to_rows(
        &q.sql(&query(
            "`finance-demo`.`default`.`users`",
            "`finance-demo`.`default`.`transactions`",
        ))
        .await
        .unwrap(),
    );
    let pg: Vec<Vec<String>> = pg
        .into_iter()
        .map(|mut r| {
            r[2] = if r[2] == "t" { "true" } else { "false" }.into();
            r
        })
        .collect();
    assert_same_rows(&pg, &delta, "anomaly query");
    let anomalies = delta.iter().filter(|r| r[2] == "true").count();
    assert!(anomalies > 0, "the data has anomalies to find");
    // Plain names resolve too.
    let plain = batches_to_rows(&q.sql("SELECT count(*) FROM transactions").await.unwrap());
    assert_eq!(plain[0][0], pg.len().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lakes_and_bad_queries_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    // A lake path that cannot be a folder.
    let file = dir.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let err = Lake::open(&file.join("lake").display().to_string(), true).unwrap_err();
    assert!(
        err.to_string().contains("cannot create the folder"),
        "{err}"
    );

    // Queries: a syntax error with its position, an unknown table with the known ones.
    let lake = dir.path().join("lake");
    let db = TestDb::new("badq");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');");
    let cfg = config(&db, &["public.t"], &lake);
    run_until_now(&db, &cfg).await;
    let q = lake_query(&lake, "weir").await;
    let err = q.sql("SELEC id FROM t").await.unwrap_err().to_string();
    assert!(err.contains("SELEC") && err.contains("Line: 1"), "{err}");
    let err = q.sql("SELECT * FROM nope").await.unwrap_err().to_string();
    assert!(
        err.contains("nope") && err.contains("Tables in the lake: t"),
        "{err}"
    );
    let out = weir()
        .args(["query", "--lake"])
        .arg(&lake)
        .args(["--format", "csv", "SELECT id, v FROM t"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "id,v\n1,a\n");

    // A table someone else made under the same name, with another type.
    let other = tempfile::tempdir().unwrap();
    let other_lake = other.path().join("lake");
    std::fs::create_dir_all(&other_lake).unwrap();
    let mut foreign = weir::sink::delta::table::LakeTable::open(
        "t",
        Lake::open(&other_lake.display().to_string(), true)
            .unwrap()
            .table_url("t"),
        Default::default(),
        "someone-else",
        100,
    )
    .await
    .unwrap();
    foreign
        .ensure_fields(&[deltalake::arrow::datatypes::Field::new(
            "id",
            deltalake::arrow::datatypes::DataType::Utf8,
            true,
        )])
        .await
        .unwrap();
    let cfg = config(&db, &["public.t"], &other_lake);
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = run(
        &cfg,
        RunOptions {
            stop_at: Some(now_lsn(&db)),
            ..RunOptions::default()
        },
        rx,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("`t`") && err.contains("`id`") && err.contains("Utf8"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_outputs_and_dead_letters_land_in_their_tables() {
    use serde_json::json;
    use weir::sink::delta::collection::{
        DEAD_LETTERS, DeadLetter, OutputRow, write_collection, write_dead_letters,
    };
    use weir::sink::delta::table::LakeTable;
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    let lake = Lake::open(&lake_dir.display().to_string(), true).unwrap();
    let open = |name: &'static str| {
        let lake = lake.clone();
        async move {
            LakeTable::open(name, lake.table_url(name), Default::default(), "p", 100)
                .await
                .unwrap()
        }
    };
    let mut alerts = open("fraud_alerts").await;
    let row = |key: &str, doc: serde_json::Value, lsn: u64| OutputRow {
        key: key.into(),
        document: weir::json::JsonObject::from_map(doc.as_object().expect("an object")),
        lsn: Lsn(lsn),
        ts_ms: 1_700_000_000_000,
    };
    write_collection(
        &mut alerts,
        &[
            row(
                "t1",
                json!({"transaction_id": 1, "user_id": 7, "amount": 950.5, "average": 100.25}),
                90,
            ),
            row(
                "t2",
                json!({"transaction_id": 2, "user_id": 8, "amount": 400.0, "average": 99.5}),
                95,
            ),
        ],
        Some(Lsn(100)),
    )
    .await
    .unwrap();
    // A later output with the same key replaces the row; a new field adds a column.
    write_collection(
        &mut alerts,
        &[row(
            "t1",
            json!({"transaction_id": 1, "user_id": 7, "amount": 990.0, "average": 100.25, "rule": {"factor": 3}}),
            150,
        )],
        Some(Lsn(200)),
    )
    .await
    .unwrap();
    let rows = lake_rows(
        &lake_dir,
        "SELECT _key, transaction_id, amount, rule, _lsn FROM fraud_alerts ORDER BY _key",
    )
    .await;
    assert_eq!(
        rows,
        vec![
            vec!["t1", "1", "990.0", r#"{"factor":3}"#, "150"],
            vec!["t2", "2", "400.0", "NULL", "95"],
        ]
    );
    let reopened = open("fraud_alerts").await;
    assert_eq!(
        reopened.version,
        Some(Lsn(200)),
        "the position rides in the commit"
    );
    // A value of another type is refused with the column named, not silently dropped.
    let err = write_collection(
        &mut alerts,
        &[row("t3", json!({"transaction_id": 3.5}), 210)],
        Some(Lsn(220)),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("transaction_id") && err.contains("fraud_alerts"),
        "{err}"
    );

    // Plugin state: changes upserted by plugin and key, deletes forgotten, read back whole.
    use weir::sink::delta::collection::{PLUGIN_STATE, load_state, write_state};
    let mut state = open(PLUGIN_STATE).await;
    let changes = |pairs: &[(&str, Option<&[u8]>)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.map(|v| v.to_vec())))
            .collect::<std::collections::HashMap<_, _>>()
    };
    write_state(
        &mut state,
        &[
            (
                "fraud_rule".into(),
                changes(&[("u:7", Some(b"\x01\x02")), ("t:1", Some(b"x"))]),
            ),
            ("other".into(), changes(&[("k", Some(b"v"))])),
        ],
        Lsn(400),
    )
    .await
    .unwrap();
    write_state(
        &mut state,
        &[(
            "fraud_rule".into(),
            changes(&[("t:1", None), ("u:7", Some(b"\x03"))]),
        )],
        Lsn(500),
    )
    .await
    .unwrap();
    let loaded = load_state(&mut open(PLUGIN_STATE).await).await.unwrap();
    assert_eq!(loaded["fraud_rule"].len(), 1);
    assert_eq!(loaded["fraud_rule"]["u:7"], vec![3u8]);
    assert_eq!(loaded["other"]["k"], b"v".to_vec());
    assert_eq!(open(PLUGIN_STATE).await.version, Some(Lsn(500)));

    let mut dead = open(DEAD_LETTERS).await;
    write_dead_letters(
        &mut dead,
        &[DeadLetter {
            plugin: "misbehave".into(),
            kind: "trap".into(),
            error: "wasm trap: unreachable".into(),
            lsn: Lsn(300),
            ts_ms: 1_700_000_000_000,
            source_table: "public.transactions".into(),
            document: r#"{"transaction_id":9,"poison":true}"#.into(),
            snapshot: false,
        }],
        Some(Lsn(310)),
    )
    .await
    .unwrap();
    let rows = lake_rows(
        &lake_dir,
        "SELECT plugin, kind, error, source_table, document, _lsn FROM weir_dead_letters",
    )
    .await;
    assert_eq!(
        rows,
        vec![vec![
            "misbehave",
            "trap",
            "wasm trap: unreachable",
            "public.transactions",
            r#"{"transaction_id":9,"poison":true}"#,
            "300"
        ]]
    );
}

/// Table `name` of `lake` as `pipeline` writes it, checkpointing every `interval` commits.
async fn lake_table(
    lake: &Lake,
    name: &str,
    pipeline: &str,
    interval: u64,
) -> weir::sink::delta::table::LakeTable {
    weir::sink::delta::table::LakeTable::open(
        name,
        lake.table_url(name),
        lake.storage.clone(),
        pipeline,
        interval,
    )
    .await
    .unwrap()
}

/// One row of `v` in a batch of `fields` (a single Int64 column `v`).
fn int_batch(
    fields: &[deltalake::arrow::datatypes::Field],
    v: i64,
) -> deltalake::arrow::record_batch::RecordBatch {
    let schema = std::sync::Arc::new(deltalake::arrow::datatypes::Schema::new(fields.to_vec()));
    let row = serde_json::json!({ "v": v }).as_object().unwrap().clone();
    weir::sink::delta::schema::record_batch(schema, &[row]).unwrap()
}

/// Appends are committed by weir itself (no log replay after each): the log it writes is
/// a Delta log others read (checkpoints at the table's interval, file statistics, the
/// pipeline's position), and the handle reads its own appends back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quick_appends_write_a_complete_log_with_checkpoints_and_statistics() {
    use deltalake::arrow::datatypes::{DataType, Field};
    use weir::sink::delta::collection::load_state;
    use weir::sink::delta::schema::record_batch;
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(&dir.path().join("lake").display().to_string(), true).unwrap();
    let open = || lake_table(&lake, "t", "p", 5);
    let fields = [
        Field::new("plugin", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        Field::new("v", DataType::Int64, true),
    ];
    let mut t = open().await;
    t.ensure_fields(&fields).await.unwrap();
    for i in 0..12i64 {
        // The batch lacks the nullable column `plugin`: written as nulls.
        let schema = std::sync::Arc::new(deltalake::arrow::datatypes::Schema::new(
            fields[1..].to_vec(),
        ));
        let rows: Vec<serde_json::Map<String, serde_json::Value>> = (0..3)
            .map(|j| {
                serde_json::json!({"key": format!("k{i}-{j}"), "v": i * 10 + j})
                    .as_object()
                    .unwrap()
                    .clone()
            })
            .collect();
        t.append(
            record_batch(schema, &rows).unwrap(),
            Some(Lsn(100 + i as u64)),
        )
        .await
        .unwrap();
    }
    // Version 0 created the table; 1..=12 are the appends.
    assert_eq!(t.delta_version(), Some(12));
    // The same handle reads its appends back (its state refreshed first).
    assert_eq!(t.rows(Some("v >= 100")).await.unwrap().len(), 6);
    assert_eq!(t.delta_version(), Some(12));

    // Checkpoints are written in the background; a run ends by waiting for them.
    t.settle().await.unwrap();
    let log = dir.path().join("lake/t/_delta_log");
    for v in [4, 9] {
        let cp = log.join(format!("{v:020}.checkpoint.parquet"));
        assert!(cp.is_file(), "no checkpoint {}", cp.display());
    }
    let last: serde_json::Value =
        serde_json::from_slice(&std::fs::read(log.join("_last_checkpoint")).unwrap()).unwrap();
    assert_eq!(last["version"], 9);
    let commit = std::fs::read_to_string(log.join(format!("{:020}.json", 12))).unwrap();
    let actions: Vec<serde_json::Value> = commit
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(actions[0]["commitInfo"]["operation"], "WRITE");
    assert_eq!(actions.iter().filter(|a| a.get("add").is_some()).count(), 1);
    let add = actions.iter().find_map(|a| a.get("add")).unwrap();
    let stats: serde_json::Value = serde_json::from_str(add["stats"].as_str().unwrap()).unwrap();
    assert_eq!(stats["numRecords"], 3);
    assert_eq!(stats["minValues"]["v"], 110);
    assert_eq!(stats["maxValues"]["v"], 112);
    assert_eq!(stats["nullCount"]["plugin"], 3);
    let txn = actions.iter().find_map(|a| a.get("txn")).unwrap();
    assert_eq!(txn["appId"], "weir:p:t");
    assert_eq!(txn["version"], 111);

    // Another reader (from the checkpoint and the commits after it) sees everything.
    let mut again = open().await;
    assert_eq!(again.version, Some(Lsn(111)));
    assert_eq!(again.delta_version(), Some(12));
    assert_eq!(
        lake_rows(&lake, "SELECT count(*), count(plugin), sum(v) FROM t").await,
        vec![vec!["36".to_string(), "0".to_string(), "2016".to_string()]]
    );
    assert!(
        load_state(&mut again).await.unwrap().is_empty(),
        "no plugin named"
    );
}

/// A table with a feature weir does not write itself (here a CHECK constraint, added by
/// another tool) takes deltalake's own path: the constraint holds, positions are recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_with_other_writer_features_are_written_through_deltalake() {
    use deltalake::arrow::datatypes::{DataType, Field};
    let dir = tempfile::tempdir().unwrap();
    let lake = Lake::open(&dir.path().join("lake").display().to_string(), true).unwrap();
    let open = || lake_table(&lake, "c", "p", 100);
    let fields = [Field::new("v", DataType::Int64, true)];
    open().await.ensure_fields(&fields).await.unwrap();
    deltalake::DeltaTableBuilder::from_url(lake.table_url("c"))
        .unwrap()
        .load()
        .await
        .unwrap()
        .add_constraint()
        .with_constraint("positive", "v > 0")
        .await
        .unwrap();
    let batch = |v: i64| int_batch(&fields, v);
    let mut t = open().await;
    t.append(batch(5), Some(Lsn(10))).await.unwrap();
    let err = t
        .append(batch(-1), Some(Lsn(20)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`c`") && err.contains("failed validation"),
        "{err}"
    );
    t.commit_position(Lsn(30)).await.unwrap();
    assert_eq!(open().await.version, Some(Lsn(30)));
    assert_eq!(
        lake_rows(&lake, "SELECT v FROM c").await,
        vec![vec!["5".to_string()]]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_are_retried_or_refused_never_lost() {
    let dir = tempfile::tempdir().unwrap();
    let lake_dir = dir.path().join("lake");
    concurrent_writers(Lake::open(&lake_dir.display().to_string(), true).unwrap()).await;
}

/// Two pipelines and a stale handle of one of them commit to one table: the other
/// pipeline's commit is retried on top, the stale one refused, nothing lost.
async fn concurrent_writers(lake: Lake) {
    use deltalake::arrow::datatypes::{DataType, Field};
    let open = |pipeline: &'static str| lake_table(&lake, "log", pipeline, 100);
    let fields = [Field::new("v", DataType::Int64, true)];
    let mut a = open("a").await;
    a.ensure_fields(&fields).await.unwrap();
    let mut stale_a = open("a").await;
    let mut b = open("b").await;
    let batch = |v: i64| int_batch(&fields, v);
    a.append(batch(1), Some(Lsn(10))).await.unwrap();
    // Another pipeline's append on an older snapshot: retried on top, nothing lost.
    b.append(batch(2), Some(Lsn(5))).await.unwrap();
    // The same pipeline from a second, stale handle: refused with a clear error.
    let err = stale_a
        .append(batch(3), Some(Lsn(20)))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`log`") && err.contains("another writer"),
        "{err}"
    );
    assert_eq!(
        lake_rows(&lake, "SELECT v FROM log ORDER BY v").await,
        vec![vec!["1".to_string()], vec!["2".to_string()]]
    );
    assert_eq!(open("a").await.version, Some(Lsn(10)));
    assert_eq!(open("b").await.version, Some(Lsn(5)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_sigint_commit_what_is_in_flight_and_exit_0() {
    let db = TestDb::new("signals");
    datagen(&db, 10_000.0, 50, 5).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    for (round, sig) in [libc::SIGTERM, libc::SIGINT].into_iter().enumerate() {
        let child = weir()
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until the lake holds what the database holds, then write more and stop
        // right away: what was committed in PostgreSQL before the signal is kept.
        let client = db.client().await;
        let mut ready = false;
        for _ in 0..200 {
            // The tables exist from round 0 on: wait for the run itself (its slot in
            // use), or the signal may come before weir handles signals.
            if lake.join("transactions").join("_delta_log").is_dir()
                && db.sql(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'weir' AND active",
                ) == "1"
            {
                ready = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ready, "round {round}: the pipeline created its tables");
        client
            .batch_execute(&format!(
                "INSERT INTO transactions (user_id, transaction_date, amount) \
                 SELECT 1, now(), 10 + {round} FROM generate_series(1, 100)"
            ))
            .await
            .unwrap();
        let written = now_lsn(&db);
        // SIGTERM once the change is in; SIGINT while it may still be on its way.
        while round == 0 && db.confirmed_flush("weir") < written {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        unsafe { libc::kill(child.id() as i32, sig) };
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "round {round}: exit 0 on signal {sig}: {log}"
        );
        assert!(log.contains("stopped:"), "{log}");
        if round == 0 {
            assert!(db.confirmed_flush("weir") >= written, "acknowledged");
            assert_bank_replica_equals_source(&db, &lake).await;
        }
    }
    weir_run_until_now(&db, &config);
    assert_bank_replica_equals_source(&db, &lake).await;
    assert_change_log_has_no_duplicates(&lake, "transactions").await;
}

/// A table added to the configuration is backfilled alone, at a snapshot of its own:
/// the tables already in the lake are not copied again (no window in which their
/// replicas are empty), their changes from before the new table's snapshot land once,
/// and the new table's changes from before it are in its copy, not in its change log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adding_a_table_backfills_that_table_only_and_every_change_lands_once() {
    let db = TestDb::new("addtable");
    db.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text, poison bool DEFAULT false);
         CREATE TABLE u (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'a', false), (2, 'b', true); INSERT INTO u VALUES (7, 'x');",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    // A plugin that fails on the poisoned rows: their dead letters show what it ran on.
    let with_plugin = |tables: &[&str]| {
        let mut cfg = config(&db, tables, &lake);
        cfg.plugins = vec![weir::config::PluginConfig {
            path: PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("misbehave.wasm"),
            name: None,
            config: toml::toml! { mode = "trap" },
            limits: Default::default(),
        }];
        cfg
    };
    let cfg = with_plugin(&["public.t"]);
    run_until_now(&db, &cfg).await;
    db.sql("INSERT INTO t VALUES (3, 'c', true); DELETE FROM t WHERE id = 1;");
    run_until_now(&db, &cfg).await;
    // Changes to both while weir is away; then `u` joins the configuration.
    db.sql(
        "INSERT INTO t VALUES (4, 'd', false); INSERT INTO u VALUES (8, 'y'); \
         UPDATE u SET v = 'x2' WHERE id = 7; UPDATE t SET v = 'b2' WHERE id = 2;",
    );
    let cfg = with_plugin(&["public.t", "public.u"]);
    let stats = run_until_now(&db, &cfg).await;
    assert!(stats.changes > 0, "{stats:?}");
    db.sql("UPDATE u SET v = 'y2' WHERE id = 8; DELETE FROM u WHERE id = 7; INSERT INTO t VALUES (5, 'e', false);");
    run_until_now(&db, &cfg).await;

    let client = db.client().await;
    for (pg, delta) in [
        (
            "SELECT id::text, v FROM t ORDER BY t.id",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM t ORDER BY id",
        ),
        (
            "SELECT id::text, v FROM u ORDER BY u.id",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM u ORDER BY id",
        ),
    ] {
        assert_same_rows(
            &pg_rows(&client, pg).await,
            &lake_rows(&lake, delta).await,
            pg,
        );
    }
    let log = |sql: &'static str| lake_rows(&lake, sql);
    assert_eq!(
        log("SELECT _op, id FROM t_changes WHERE NOT _snapshot ORDER BY _lsn, _seq").await,
        vec![
            vec!["c", "3"],
            vec!["d", "1"],
            vec!["c", "4"],
            vec!["u", "2"],
            vec!["c", "5"]
        ],
        "every change of t once, in order"
    );
    assert_eq!(
        log("SELECT id FROM t_changes WHERE _snapshot ORDER BY id").await,
        vec![vec!["1"], vec!["2"]],
        "t was copied once, at the start"
    );
    assert_eq!(
        log("SELECT id, v FROM u_changes WHERE _snapshot ORDER BY id").await,
        vec![vec!["7", "x2"], vec!["8", "y"]],
        "u copied as it was when it joined"
    );
    assert_eq!(
        log("SELECT _op, id FROM u_changes WHERE NOT _snapshot ORDER BY _lsn, _seq").await,
        vec![vec!["u", "8"], vec!["d", "7"]],
        "u's changes after its copy, once"
    );
    // Dead letters: the plugin ran on t's backfill once and on each streamed change of a
    // poisoned row once (the update of 2 too), never on a copy again.
    let letters: Vec<(String, i64)> = lake_rows(
        &lake,
        "SELECT _snapshot, document FROM weir_dead_letters ORDER BY _snapshot, document",
    )
    .await
    .into_iter()
    .map(|r| {
        let doc: serde_json::Value = serde_json::from_str(&r[1]).unwrap();
        (r[0].clone(), doc["id"].as_i64().unwrap())
    })
    .collect();
    assert_eq!(
        letters,
        [
            ("false".to_string(), 2),
            ("false".to_string(), 3),
            ("true".to_string(), 2)
        ]
    );
}

/// A table left out of the configuration for a while misses its changes of that time
/// (they are not captured); configured again, it is copied afresh rather than continued
/// from the position it stood at: its replica equals its source again, its change log
/// keeps what it had (the first copy too) and gains the new copy, and the other tables go
/// on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_left_out_and_configured_again_is_copied_afresh_not_continued() {
    let db = TestDb::new("readded");
    db.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         CREATE TABLE u (id int PRIMARY KEY, v text);
         INSERT INTO t VALUES (1, 'a'); INSERT INTO u VALUES (7, 'x'), (8, 'y');",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let both = config(&db, &["public.t", "public.u"], &lake);
    let t_only = config(&db, &["public.t"], &lake);
    run_until_now(&db, &both).await;
    db.sql("UPDATE u SET v = 'x1' WHERE id = 7;");
    run_until_now(&db, &both).await;
    // `u` leaves the configuration; its changes meanwhile are not captured.
    db.sql("INSERT INTO u VALUES (9, 'z'); INSERT INTO t VALUES (2, 'b');");
    run_until_now(&db, &t_only).await;
    db.sql(
        "DELETE FROM u WHERE id = 8; UPDATE u SET v = 'x2' WHERE id = 7; \
         UPDATE t SET v = 'b2' WHERE id = 2;",
    );
    run_until_now(&db, &t_only).await;
    let log = |sql: &'static str| lake_rows(&lake, sql);
    let u_before = log("SELECT id, v FROM u ORDER BY id").await;
    assert_eq!(
        u_before,
        vec![vec!["7", "x1"], vec!["8", "y"]],
        "u as it was left"
    );

    // Back in the configuration: copied afresh.
    db.sql("INSERT INTO t VALUES (3, 'c');");
    run_until_now(&db, &both).await;
    db.sql("UPDATE u SET v = 'z2' WHERE id = 9; INSERT INTO t VALUES (4, 'd');");
    run_until_now(&db, &both).await;
    // A further start copies nothing again.
    run_until_now(&db, &both).await;

    let client = db.client().await;
    for (pg, delta) in [
        (
            "SELECT id::text, v FROM t ORDER BY t.id",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM t ORDER BY id",
        ),
        (
            "SELECT id::text, v FROM u ORDER BY u.id",
            "SELECT CAST(id AS VARCHAR) AS k, v FROM u ORDER BY id",
        ),
    ] {
        assert_same_rows(
            &pg_rows(&client, pg).await,
            &lake_rows(&lake, delta).await,
            pg,
        );
    }
    assert_eq!(
        log("SELECT _op, id, v FROM t_changes WHERE NOT _snapshot ORDER BY _lsn, _seq").await,
        vec![
            vec!["c", "2", "b"],
            vec!["u", "2", "b2"],
            vec!["c", "3", "c"],
            vec!["c", "4", "d"]
        ],
        "every change of t once, in order: t was never left out"
    );
    assert_eq!(
        log("SELECT id, v FROM u_changes WHERE _snapshot ORDER BY _lsn, id").await,
        vec![
            vec!["7", "x"],
            vec!["8", "y"],
            vec!["7", "x2"],
            vec!["9", "z"]
        ],
        "u's change log holds its first copy, then the one made when it came back (once)"
    );
    assert_eq!(
        log("SELECT _op, id, v FROM u_changes WHERE NOT _snapshot ORDER BY _lsn, _seq").await,
        vec![vec!["u", "7", "x1"], vec!["u", "9", "z2"]],
        "u's changes while it was configured, once"
    );
}

/// Many small commits leave many small files: the pipeline compacts them as it goes (no
/// `weir lake optimize` needed), and compaction neither loses nor doubles a change: the
/// replica equals the source, the change log holds every change once, a restart goes on
/// from where the lake stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_files_are_compacted_in_the_background_and_no_change_is_lost_or_doubled() {
    let db = TestDb::new("compact");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v int); INSERT INTO t VALUES (0, 0);");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["t"], &lake);
    // One commit per transaction; compaction from 8 small files.
    cfg.lake.max_batch_rows = 1;
    cfg.lake.compact_files = 8;
    run_until_now(&db, &cfg).await;
    let write = |from: i32| {
        for i in from..from + 30 {
            db.sql(&format!(
                "INSERT INTO t VALUES ({i}, {i}); UPDATE t SET v = v + 1 WHERE id = {};",
                i / 2
            ));
        }
    };
    write(1);
    let stats = run_until_now(&db, &cfg).await;
    assert!(stats.batches >= 30, "one commit per transaction: {stats:?}");
    write(31);
    db.sql("DELETE FROM t WHERE id % 7 = 0;");
    run_until_now(&db, &cfg).await;

    let files = |name: &'static str| {
        let lake = lake.clone();
        let url = url::Url::from_directory_path(lake.join(name)).unwrap();
        async move {
            let table = deltalake::open_table(url).await.unwrap();
            let live = table.snapshot().unwrap().log_data().num_files();
            let compactions = std::fs::read_dir(lake.join(name).join("_delta_log"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .filter(|p| {
                    std::fs::read_to_string(p)
                        .unwrap()
                        .contains(r#""operation":"OPTIMIZE""#)
                })
                .count();
            (live, compactions)
        }
    };
    for name in ["t", "t_changes"] {
        let (live, compactions) = files(name).await;
        assert!(compactions >= 3, "{name}: {compactions} compactions");
        assert!(live < 8 + 4, "{name}: {live} files left");
    }
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, v::text FROM t ORDER BY t.id",
        "SELECT CAST(id AS VARCHAR) AS i, CAST(v AS VARCHAR) AS v FROM t ORDER BY id",
        "t after compactions",
    )
    .await;
    let log = lake_rows(
        &lake,
        "SELECT _op, count(*) FROM t_changes GROUP BY _op ORDER BY _op",
    )
    .await;
    assert_eq!(
        log,
        [["c", "60"], ["d", "9"], ["r", "1"], ["u", "60"]].map(|r| r.map(String::from).to_vec()),
        "every change once"
    );
    assert_change_log_has_no_duplicates(&lake, "t").await;
}

fn fraud_rule() -> PathBuf {
    PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("fraud_rule.wasm")
}

/// The fraud rule as a configured plugin, emitting every scored transaction (the most
/// rows to compare).
fn fraud_rule_plugin() -> weir::config::PluginConfig {
    weir::config::PluginConfig {
        path: fraud_rule(),
        name: None,
        config: toml::toml! { emit = "all" },
        limits: Default::default(),
    }
}

/// Adds the fraud rule to a configuration file.
fn add_fraud_rule(config: &Path) {
    add_fraud_rule_with(config, "");
}

/// Adds the fraud rule with `settings` (lines of its `[plugins.config]`).
fn add_fraud_rule_with(config: &Path, settings: &str) {
    let mut text = std::fs::read_to_string(config).unwrap();
    text.push_str(&format!(
        "\n[[plugins]]\npath = \"{}\"\n[plugins.config]\n{settings}\n",
        fraud_rule().display()
    ));
    std::fs::write(config, text).unwrap();
}

/// The reference for a test that interrupts a pipeline: the bank tables through the fraud
/// rule (every transaction scored) into `<dir>/ref-lake`, on its own slot, run (and later
/// caught up) uninterrupted.
async fn fraud_rule_reference(db: &TestDb, dir: &Path) -> (PathBuf, Config) {
    let ref_lake = dir.join("ref-lake");
    let mut reference = config(db, &["public.users", "public.transactions"], &ref_lake);
    reference.source.slot = "reference".into();
    reference.plugins = vec![fraud_rule_plugin()];
    run_until_now(db, &reference).await;
    (ref_lake, reference)
}

/// The fraud rule's table, for comparing two lakes.
async fn alerts(lake: &Path) -> Vec<Vec<String>> {
    lake_rows(
        lake,
        "SELECT _key, is_anomaly, user_avg, amount, _lsn FROM fraud_alerts ORDER BY _key",
    )
    .await
}

/// A backfill cut short during its second table (`transactions`, through the fraud
/// rule) resumes with the first table kept and the plugins' state as of it: the next
/// start copies `transactions` alone, and every transaction is scored once, as an
/// uninterrupted run scores it (the outputs of the part copied before the shutdown are
/// not left behind).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backfill_cut_short_resumes_with_the_plugins_state_and_scores_every_row_once() {
    let db = TestDb::new("resumescore");
    datagen(&db, 10_000.0, 0, 8).await;
    db.sql(
        "INSERT INTO transactions (user_id, transaction_date, amount) \
         SELECT 1 + g % 20, timestamptz '2026-01-01' + g * interval '1 minute', \
           CASE WHEN g % 997 = 0 THEN 5000 ELSE 10 + g % 50 END \
         FROM generate_series(1, 300000) g",
    );
    let dir = tempfile::tempdir().unwrap();
    let (ref_lake, _) = fraud_rule_reference(&db, dir.path()).await;
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["public.users", "public.transactions"], &lake);
    cfg.plugins = vec![fraud_rule_plugin()];
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = {
        let cfg = cfg.clone();
        tokio::spawn(async move { run(&cfg, RunOptions::default(), rx).await })
    };
    support::wait_for("the first part of `transactions`", 120, || {
        lake.join("transactions/_delta_log").exists()
    })
    .await;
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(60), task)
        .await
        .expect("the shutdown came")
        .unwrap()
        .expect("the interrupted run ends without an error");
    let held = lake_rows(&lake, "SELECT count(*) FROM transactions").await[0][0]
        .parse::<u64>()
        .unwrap();
    assert!(held < 300_000, "the copy was interrupted: {held} rows");
    let users_copy =
        "SELECT CAST(_lsn AS VARCHAR) FROM users_changes WHERE _snapshot GROUP BY _lsn";
    let users_at = lake_rows(&lake, users_copy).await;
    assert_eq!(users_at.len(), 1, "{users_at:?}");
    run_until_now(&db, &cfg).await;
    assert_eq!(
        lake_rows(&lake, users_copy).await,
        users_at,
        "`users` was not copied again"
    );
    assert_bank_replica_equals_source(&db, &lake).await;
    // The snapshots differ (and with them `_lsn`): the scores must not.
    let scores = "SELECT _key, CAST(is_anomaly AS VARCHAR), CAST(user_avg AS VARCHAR), \
                  CAST(amount AS VARCHAR) FROM fraud_alerts ORDER BY _key";
    let expected = lake_rows(&ref_lake, scores).await;
    assert_eq!(
        expected.len(),
        300_000,
        "the reference scored every transaction"
    );
    assert!(
        expected.iter().any(|r| r[1] == "true"),
        "some anomalies flagged"
    );
    assert_same_rows(
        &expected,
        &lake_rows(&lake, scores).await,
        "fraud_alerts after a resumed backfill vs uninterrupted",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_alerts_are_written_once_across_kills() {
    let db = TestDb::new("alerts");
    datagen(&db, 10_000.0, 0, 6).await;
    let dir = tempfile::tempdir().unwrap();
    let (ref_lake, reference) = fraud_rule_reference(&db, dir.path()).await;
    // The one that gets killed takes the old amounts of updates and deletes from their
    // before-images (datagen's `transactions` has REPLICA IDENTITY FULL) where the
    // reference keeps them per transaction in its state, and emits only anomalies (the
    // default) where the reference scores every transaction: the alerts must not differ.
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    add_fraud_rule_with(&config, "before_images = true");
    weir_run_until_now(&db, &config);

    let writer = datagen_in_background(&db, 400.0, 1500, 7);
    for ms in [900u64, 400, 1300, 700] {
        let child = weir()
            .args(["run", "--config"])
            .arg(&config)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(ms)).await;
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        tokio::task::spawn_blocking(move || {
            let mut child = child;
            child.wait().unwrap()
        })
        .await
        .unwrap();
    }
    writer.await.unwrap();
    weir_run_until_now(&db, &config);
    run_until_now(&db, &reference).await;

    assert_bank_replica_equals_source(&db, &lake).await;
    let expected = alerts(&ref_lake).await;
    assert!(
        expected.len() > 1000,
        "the rule scored the stream ({})",
        expected.len()
    );
    assert!(
        expected.iter().any(|r| r[1] == "true"),
        "some anomalies flagged"
    );
    let anomalies = |rows: Vec<Vec<String>>| -> Vec<Vec<String>> {
        rows.into_iter().filter(|r| r[1] == "true").collect()
    };
    let got = alerts(&lake).await;
    assert_same_rows(
        &anomalies(expected),
        &anomalies(got.clone()),
        "fraud_alerts after kills vs uninterrupted",
    );
    // The rest are withdrawn alerts, never normal transactions.
    assert!(
        got.iter().all(|r| r[1] == "true" || r[1] == "NULL"),
        "{:?}",
        got.iter().find(|r| r[1] != "true")
    );
    // Updates and deletes were scored; only the reference keeps per-transaction state.
    let ops = lake_rows(
        &lake,
        "SELECT count(*) FROM transactions_changes WHERE _op IN ('u', 'd')",
    )
    .await;
    assert!(ops[0][0].parse::<u64>().unwrap() > 50, "{ops:?}");
    let per_tx = "SELECT count(*) FROM weir_plugin_state WHERE key LIKE 'tx:%'";
    assert_ne!(lake_rows(&ref_lake, per_tx).await[0][0], "0");
    assert_eq!(lake_rows(&lake, per_tx).await[0][0], "0");
}

/// One source transaction of 3,000 inserts (amounts 10..99 across the 20 datagen users;
/// six without an amount, which the fraud rule rejects), with updates and deletes of some
/// of its rows and of older ones.
const BIG_TRANSACTION: &str = "BEGIN; \
     INSERT INTO transactions (user_id, transaction_date, amount) \
       SELECT 1 + i % 20, now(), CASE WHEN i % 500 = 0 THEN NULL ELSE 10 + i % 90 END \
       FROM generate_series(1, 3000) i; \
     UPDATE transactions SET amount = amount + 1 WHERE transaction_id % 7 = 0; \
     DELETE FROM transactions WHERE transaction_id % 11 = 0; \
     COMMIT";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_larger_than_a_batch_is_written_in_parts_and_lands_once() {
    let db = TestDb::new("bigtxn");
    datagen(&db, 10_000.0, 0, 11).await;
    db.sql("ALTER TABLE transactions ALTER amount DROP NOT NULL");
    let dir = tempfile::tempdir().unwrap();
    // (The reference takes each transaction whole.)
    let (ref_lake, reference) = fraud_rule_reference(&db, dir.path()).await;

    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "change_log = true\n",
        "change_log = true\npart_rows = 500\n",
    );
    std::fs::write(&config, text).unwrap();
    add_fraud_rule_with(&config, "emit = \"all\"");
    weir_run_until_now(&db, &config);

    // Both pipelines stream some history, then the large transaction.
    datagen_in_background(&db, 10_000.0, 300, 12).await.unwrap();
    let client = db.client().await;
    client.batch_execute(BIG_TRANSACTION).await.unwrap();
    // A small transaction after it, scored against the users' averages that include it.
    client
        .batch_execute(
            "INSERT INTO transactions (user_id, transaction_date, amount) \
             SELECT u, now(), 1000 FROM generate_series(1, 20) u",
        )
        .await
        .unwrap();
    let changes_in_big: i64 = {
        // 3,000 inserts plus the updates and deletes it made (counted from the reference).
        run_until_now(&db, &reference).await;
        let per_txn = lake_rows(
            &ref_lake,
            "SELECT count(*) FROM transactions_changes WHERE NOT _snapshot \
             GROUP BY _lsn ORDER BY count(*) DESC LIMIT 1",
        )
        .await;
        per_txn[0][0].parse().unwrap()
    };
    assert!(changes_in_big > 3000, "{changes_in_big}");

    // Killed after three parts of the large transaction reached the lake.
    let out = weir()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--until", &now_lsn(&db).to_string()])
        .env("WEIR_CRASH_AFTER_PARTS", "3")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the run was meant to crash");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("crashing on purpose after 3 parts"), "{log}");
    // Its parts are staged, not in the tables: no change log commit holds any of it.
    let largest: i64 = lake_rows(
        &lake,
        "SELECT count(*) FROM transactions_changes WHERE NOT _snapshot \
         GROUP BY _lsn ORDER BY count(*) DESC LIMIT 1",
    )
    .await[0][0]
        .parse()
        .unwrap();
    assert!(
        largest < 3000,
        "the lake shows part of the transaction before its commit ({largest} changes)"
    );
    assert!(!staged_logs(&lake).is_empty(), "the parts were staged");

    weir_run_until_now(&db, &config);
    assert!(staged_logs(&lake).is_empty(), "{:?}", staged_logs(&lake));
    assert_bank_replica_equals_source(&db, &lake).await;
    assert_change_log_has_no_duplicates(&lake, "transactions").await;
    let logged = lake_rows(
        &lake,
        "SELECT count(*) FROM transactions_changes WHERE NOT _snapshot \
         GROUP BY _lsn ORDER BY count(*) DESC LIMIT 1",
    )
    .await;
    assert_eq!(
        logged[0][0].parse::<i64>().unwrap(),
        changes_in_big,
        "every change of the large transaction is in the change log once"
    );
    // The plugin's outputs and its state (which scores the last transaction) are those
    // of the uninterrupted run.
    let expected = alerts(&ref_lake).await;
    assert!(expected.len() > 3000, "{}", expected.len());
    assert_same_rows(
        &expected,
        &alerts(&lake).await,
        "fraud_alerts after a crash mid-transaction",
    );
    let dead = "SELECT _lsn, kind, error, document FROM weir_dead_letters ORDER BY document";
    let expected = lake_rows(&ref_lake, dead).await;
    assert!(expected.len() >= 6, "{expected:?}");
    assert_same_rows(
        &expected,
        &lake_rows(&lake, dead).await,
        "dead letters after a crash mid-transaction",
    );
}

/// Every table folder of the lake that still holds a staged log.
fn staged_logs(lake: &Path) -> Vec<String> {
    std::fs::read_dir(lake)
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.path().join("_weir_staging").exists())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_never_sees_part_of_a_large_transaction() {
    let db = TestDb::new("whole");
    db.sql(
        "CREATE TABLE a (id int PRIMARY KEY, v int NOT NULL); \
         CREATE TABLE b (id int PRIMARY KEY, w text); \
         INSERT INTO a SELECT g, 1 FROM generate_series(1, 2000) g; \
         INSERT INTO b SELECT g, 'b' FROM generate_series(1, 1000) g;",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["a", "b"], &lake);
    cfg.lake.part_rows = 500;
    run_until_now(&db, &cfg).await;
    // One transaction of some 14,000 changes over both tables, in 28 parts: inserts,
    // updates of rows from before it and of its own rows, deletes; then a small one.
    db.sql(
        "BEGIN; \
         INSERT INTO a SELECT g, 2 FROM generate_series(2001, 9000) g; \
         UPDATE a SET v = v + 10 WHERE id % 2 = 0; \
         DELETE FROM b WHERE id % 3 = 0; \
         INSERT INTO b SELECT g, 'new' FROM generate_series(1001, 4000) g; \
         UPDATE b SET w = 'changed' WHERE id % 5 = 0; \
         COMMIT; \
         INSERT INTO b VALUES (5000, 'after');",
    );
    let state = "SELECT (SELECT count(*) FROM a)::text, (SELECT coalesce(sum(v), 0) FROM a)::text, \
                 (SELECT count(*) FROM b)::text";
    let lake_state = "SELECT CAST((SELECT count(*) FROM a) AS VARCHAR) AS n, \
                      CAST((SELECT coalesce(sum(v), 0) FROM a) AS VARCHAR) AS s, \
                      CAST((SELECT count(*) FROM b) AS VARCHAR) AS m";
    let before = vec!["2000".to_string(), "2000".to_string(), "1000".to_string()];
    let client = db.client().await;
    let after_big = {
        // What PostgreSQL holds without the small transaction after it.
        let mut now = pg_rows(&client, state).await.remove(0);
        now[2] = (now[2].parse::<i64>().unwrap() - 1).to_string();
        now
    };
    let last = pg_rows(&client, state).await.remove(0);
    let run = {
        let (db_cfg, until) = (cfg.clone(), now_lsn(&db));
        tokio::spawn(async move {
            let (_stop, rx) = tokio::sync::watch::channel(false);
            weir::pipeline::run_with_retries(
                &db_cfg,
                RunOptions {
                    stop_at: Some(until),
                    ..RunOptions::default()
                },
                rx,
            )
            .await
        })
    };
    // A reader polls both replicas while the transaction lands.
    let (mut seen, mut staged_seen) = (Vec::new(), false);
    while !run.is_finished() {
        staged_seen |= !staged_logs(&lake).is_empty();
        seen.push(lake_rows(&lake, lake_state).await.remove(0));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    run.await.unwrap().unwrap();
    seen.push(lake_rows(&lake, lake_state).await.remove(0));
    // Each table shows the transaction whole or not at all (Delta commits are per table:
    // `a` may show it a moment before `b`).
    for s in &seen {
        assert!(
            s[..2] == before[..2] || s[..2] == after_big[..2],
            "a reader saw part of the transaction in a: {s:?} (before {before:?}, after {after_big:?})"
        );
        assert!(
            [&before[2], &after_big[2], &last[2]].contains(&&s[2]),
            "a reader saw part of the transaction in b: {s:?} (before {before:?}, after {after_big:?})"
        );
    }
    assert!(staged_seen, "the reader polled while the parts were staged");
    assert_eq!(seen.last(), Some(&last));
    assert!(staged_logs(&lake).is_empty(), "{:?}", staged_logs(&lake));
    // Replicas equal their sources; each change log holds the transaction once, in one
    // commit of its own.
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, v::text FROM a ORDER BY a.id",
        "SELECT CAST(id AS VARCHAR) AS k, CAST(v AS VARCHAR) AS x FROM a ORDER BY id",
        "a",
    )
    .await;
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, w FROM b ORDER BY b.id",
        "SELECT CAST(id AS VARCHAR) AS k, w FROM b ORDER BY id",
        "b",
    )
    .await;
    let logged = lake_rows(
        &lake,
        "SELECT CAST(count(*) AS VARCHAR) FROM a_changes WHERE NOT _snapshot",
    )
    .await;
    assert_eq!(logged[0][0], (7000 + 4500).to_string());
    let logged = lake_rows(
        &lake,
        "SELECT CAST(count(*) AS VARCHAR) FROM b_changes WHERE NOT _snapshot",
    )
    .await;
    // 333 deletes, 3,000 inserts, 800 updates (every fifth of the 4,000 ids, less the
    // deleted ones among the first 1,000: 66), the small insert.
    let updates: i64 = db
        .sql("SELECT count(*) FROM b WHERE w = 'changed'")
        .parse()
        .unwrap();
    assert_eq!(logged[0][0], (333 + 3000 + updates + 1).to_string());
    assert_change_log_has_no_duplicates(&lake, "a").await;
    assert_change_log_has_no_duplicates(&lake, "b").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_is_survived() {
    let db = std::sync::Arc::new(TestDb::new("restart"));
    datagen(&db, 10_000.0, 100, 8).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    let log = dir.path().join("weir.log");
    let child = weir()
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A writer that keeps going through the restart (reconnecting when it must).
    let writer = {
        let url = db.cluster.url_with_password(&db.db);
        tokio::spawn(async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            let mut written = 0u32;
            while std::time::Instant::now() < deadline {
                let Ok((client, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                tokio::spawn(conn);
                while std::time::Instant::now() < deadline {
                    let ok = client
                        .batch_execute(
                            "INSERT INTO transactions (user_id, transaction_date, amount) \
                             VALUES (1 + (random() * 19)::int, now(), 42.00)",
                        )
                        .await
                        .is_ok();
                    if !ok {
                        break;
                    }
                    written += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            written
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    {
        let db = db.clone();
        tokio::task::spawn_blocking(move || db.cluster.restart().unwrap())
            .await
            .unwrap();
    }
    let written = writer.await.unwrap();
    assert!(
        written > 100,
        "the writer wrote through the restart ({written})"
    );
    let until = now_lsn(&db);
    let mut caught_up = false;
    for _ in 0..600 {
        if db.confirmed_flush("weir") >= until {
            caught_up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().unwrap()
    })
    .await
    .unwrap();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(caught_up, "weir resumed after the restart: {text}");
    assert!(status.success(), "{text}");
    assert!(text.contains("reconnecting"), "{text}");
    assert_bank_replica_equals_source(&db, &lake).await;
    assert_change_log_has_no_duplicates(&lake, "transactions").await;
}

/// A lake on the test S3 server: its config (credentials left to the environment) and
/// the same lake with credentials, for reading it back here.
fn s3_lake(s3: &support::S3Server, bucket: &str) -> (LakeConfig, Lake) {
    s3.create_bucket(bucket);
    let cfg = LakeConfig {
        url: format!("s3://{bucket}/bank"),
        change_log: true,
        storage: weir::config::StorageOptions(s3.options()),
        ..LakeConfig::default()
    };
    let mut with_credentials = cfg.clone();
    with_credentials.storage = weir::config::StorageOptions(s3.options_with_credentials());
    (cfg, Lake::from_config(&with_credentials, false).unwrap())
}

/// `[lake]` of a config file for an S3 lake.
fn s3_lake_toml(cfg: &LakeConfig) -> String {
    let mut t = format!(
        "[lake]\nurl = \"{}\"\nchange_log = true\n\n[lake.storage]\n",
        cfg.url
    );
    for (k, v) in &cfg.storage.0 {
        t.push_str(&format!("{k} = \"{v}\"\n"));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lake_on_s3_is_exactly_once_across_kills() {
    let s3 = support::S3Server::start();
    let (lake_cfg, lake) = s3_lake(&s3, "weir-kills");
    let db = TestDb::new("s3kill");
    datagen(&db, 10_000.0, 200, 21).await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("weir.toml");
    let local = write_config(&db, &dir.path().join("unused"), dir.path());
    let text = std::fs::read_to_string(&local).unwrap();
    let source = &text[..text.find("[lake]").unwrap()];
    std::fs::write(
        &config,
        format!(
            "{source}{}\n[[plugins]]\npath = \"{}\"\n[plugins.config]\nemit = \"all\"\n",
            s3_lake_toml(&lake_cfg),
            fraud_rule().display()
        ),
    )
    .unwrap();
    let run = |until: Option<Lsn>| {
        let mut c = weir();
        c.args(["run", "--config"]).arg(&config).envs(s3.env());
        if let Some(u) = until {
            c.args(["--until", &u.to_string()]);
        }
        c
    };
    let writer = datagen_in_background(&db, 300.0, 1500, 22);
    let mut rng = 0x2545f4914f6cdd1du64;
    for round in 0..4 {
        let mut child = run(None).stderr(Stdio::null()).spawn().unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        tokio::time::sleep(Duration::from_millis(900 + rng % 1800)).await;
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        assert!(!child.wait().unwrap().success(), "round {round}: killed");
    }
    writer.await.unwrap();
    let out = run(Some(now_lsn(&db))).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_bank_replica_equals_source(&db, &lake).await;
    let n = assert_change_log_has_no_duplicates(&lake, "transactions").await;
    assert!(n > 1000, "the change log holds the stream ({n} rows)");
    // Every transaction scored once by the fraud rule, on S3 too.
    let scored = lake_rows(
        &lake,
        "SELECT count(*), count(DISTINCT _key) FROM fraud_alerts WHERE is_anomaly IS NOT NULL",
    )
    .await;
    assert_eq!(scored[0][0], scored[0][1]);
    let live = lake_rows(&lake, "SELECT count(*) FROM transactions").await;
    assert_eq!(
        scored[0][0], live[0][0],
        "one alert row per live transaction"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_s3_use_conditional_puts_and_lose_nothing() {
    let s3 = support::S3Server::start();
    let (_, lake) = s3_lake(&s3, "weir-concurrent");
    concurrent_writers(lake).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_store_credentials_never_reach_logs_errors_or_tables() {
    let s3 = support::S3Server::start();
    let (lake_cfg, lake) = s3_lake(&s3, "weir-secrets");
    let db = TestDb::new("s3secret");
    datagen(&db, 10_000.0, 100, 31).await;
    let dir = tempfile::tempdir().unwrap();
    let local = write_config(&db, &dir.path().join("unused"), dir.path());
    let text = std::fs::read_to_string(&local).unwrap();
    let source = &text[..text.find("[lake]").unwrap()];
    // Credentials in the environment (the usual way) for one run...
    let config = dir.path().join("weir.toml");
    std::fs::write(&config, format!("{source}{}", s3_lake_toml(&lake_cfg))).unwrap();
    let mut logs = String::new();
    let out = weir()
        .args(["run", "--config"])
        .arg(&config)
        .args(["--until", &now_lsn(&db).to_string()])
        .envs(s3.env())
        .env("WEIR_LOG", "debug")
        .output()
        .unwrap();
    logs.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{logs}");
    // ...and in the file's [lake.storage] for a query, and for one that fails.
    let mut with_keys = lake_cfg.clone();
    with_keys.storage = weir::config::StorageOptions(s3.options_with_credentials());
    let keyed = dir.path().join("keyed.toml");
    std::fs::write(&keyed, format!("{source}{}", s3_lake_toml(&with_keys))).unwrap();
    let out = weir()
        .args(["query", "--config"])
        .arg(&keyed)
        .args(["SELECT count(*) FROM transactions"])
        .env("WEIR_LOG", "debug")
        .output()
        .unwrap();
    logs.push_str(&String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{logs}");
    let mut unreachable = with_keys.clone();
    unreachable
        .storage
        .0
        .insert("aws_endpoint".into(), "http://127.0.0.1:9".into());
    // Give up fast instead of object_store's usual retries.
    for (k, v) in [("max_retries", "1"), ("retry_timeout", "2s")] {
        unreachable.storage.0.insert(k.into(), v.into());
    }
    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, format!("{source}{}", s3_lake_toml(&unreachable))).unwrap();
    for args in [
        vec!["query", "SELECT count(*) FROM transactions"],
        vec!["lake", "optimize"],
    ] {
        let out = weir()
            .args(&args[..1])
            .args(if args[0] == "lake" {
                &args[1..]
            } else {
                &[][..]
            })
            .arg("--config")
            .arg(&broken)
            .args(if args[0] == "query" {
                &args[1..]
            } else {
                &[][..]
            })
            .env("WEIR_LOG", "debug")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            !out.status.success(),
            "{args:?} against a closed port fails: {err}"
        );
        logs.push_str(&err);
    }
    let run_err = weir()
        .args(["run", "--config"])
        .arg(&broken)
        .args(["--until", &now_lsn(&db).to_string()])
        .env("WEIR_LOG", "debug")
        .output()
        .unwrap();
    assert!(!run_err.status.success());
    logs.push_str(&String::from_utf8_lossy(&run_err.stderr));
    assert!(
        logs.contains("127.0.0.1:9"),
        "the errors name the endpoint:\n{logs}"
    );
    assert!(
        !logs.contains(support::S3_SECRET_KEY),
        "the secret key leaked into the output:\n{logs}"
    );
    // Nor in any table.
    let q = lake_query(&lake, "weir").await;
    for table in &q.tables {
        let rows = q.json(&format!("SELECT * FROM `{table}`")).await.unwrap();
        let text = serde_json::to_string(&rows).unwrap();
        assert!(
            !text.contains(support::S3_SECRET_KEY),
            "{table} holds the secret"
        );
        assert!(
            !text.contains(support::S3_ACCESS_KEY),
            "{table} holds the key id"
        );
    }
    assert!(q.tables.contains(&"transactions".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fraud_rule_flags_the_injected_anomalies_while_the_pipeline_runs() {
    let db = TestDb::new("recall");
    let client = db.client().await;
    // Inserts only, so that the rule's definition can be replayed over the source table.
    let settings = weir::datagen::Settings {
        users: 15,
        rate: 400.0,
        operations: Some(1200),
        anomaly_share: 0.08,
        update_share: 0.0,
        delete_share: 0.0,
        seed: 41,
    };
    weir::datagen::prepare(&client, &settings).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let config = write_config(&db, &lake, dir.path());
    add_fraud_rule(&config);
    let log = dir.path().join("run.log");
    let child = weir()
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // A steady rate while the pipeline runs.
    weir::datagen::run(&client, &settings, std::future::pending())
        .await
        .unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let mut child = child;
        child.wait().unwrap()
    })
    .await
    .unwrap();
    let logs = std::fs::read_to_string(&log).unwrap();
    assert!(status.success(), "{logs}");
    weir_run_until_now(&db, &config);
    assert_bank_replica_equals_source(&db, &lake).await;

    let truth: HashSet<i64> = db
        .sql("SELECT transaction_id FROM weir_ground_truth")
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let flagged: HashSet<i64> = lake_rows(
        &lake,
        "SELECT transaction_id FROM fraud_alerts WHERE is_anomaly",
    )
    .await
    .iter()
    .map(|r| r[0].parse().unwrap())
    .collect();
    // The rule's definition, replayed over the source: amount over 3x the average of the
    // user's earlier transactions (at least one).
    let mut expected = HashSet::new();
    let mut history: std::collections::HashMap<i64, (u32, f64)> = Default::default();
    for line in db
        .sql("SELECT transaction_id, user_id, amount FROM transactions ORDER BY transaction_id")
        .lines()
    {
        let mut f = line.split('|');
        let id: i64 = f.next().unwrap().parse().unwrap();
        let user: i64 = f.next().unwrap().parse().unwrap();
        let amount: f64 = f.next().unwrap().parse().unwrap();
        let (count, sum) = history.entry(user).or_default();
        if *count >= 1 && amount > 3.0 * (*sum / *count as f64) {
            expected.insert(id);
        }
        *count += 1;
        *sum += amount;
    }
    // Only alerts land in the table (the rule's default).
    let rows = lake_rows(&lake, "SELECT count(*) FROM fraud_alerts").await;
    assert_eq!(
        rows[0][0],
        flagged.len().to_string(),
        "fraud_alerts holds only anomalies"
    );
    let hits = flagged.intersection(&truth).count();
    let precision = hits as f64 / flagged.len().max(1) as f64;
    let recall = hits as f64 / truth.len().max(1) as f64;
    eprintln!(
        "fraud rule through the pipeline: {} anomalies injected, {} flagged; \
         precision {precision:.3}, recall {recall:.3}",
        truth.len(),
        flagged.len(),
    );
    assert!(truth.len() >= 40, "anomalies injected: {}", truth.len());
    let missed: Vec<&i64> = expected.difference(&flagged).collect();
    let extra: Vec<&i64> = flagged.difference(&expected).collect();
    assert!(
        missed.is_empty() && extra.is_empty(),
        "the alerts differ from the rule's definition: missed {missed:?}, extra {extra:?}"
    );
    assert!(precision >= 0.95, "precision {precision:.3}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_reads_the_tables_weir_writes() {
    let python = std::env::var_os("WEIR_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/weir-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: run ./tests/run.sh (it installs duckdb and duckdb-extension-delta \
         from PyPI into ~/.cache/weir-venv) or set WEIR_PYTHON",
        python.display()
    );
    let db = TestDb::new("duckdb");
    datagen(&db, 10_000.0, 400, 51).await;
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let mut cfg = config(&db, &["public.users", "public.transactions"], &lake);
    cfg.plugins = vec![fraud_rule_plugin()];
    run_until_now(&db, &cfg).await;
    // DuckDB's own Delta reader (the extension file shipped in the PyPI package).
    let script = r#"
import duckdb, glob, os, sys
import duckdb_extension_delta as d
ext = glob.glob(os.path.join(os.path.dirname(d.__file__), "**", "*.duckdb_extension"), recursive=True)[0]
con = duckdb.connect()
con.execute(f"LOAD '{ext}'")
lake = sys.argv[1]
for sql in [
    f"SELECT count(*), CAST(sum(amount) AS VARCHAR), max(transaction_id) FROM delta_scan('{lake}/transactions')",
    f"SELECT count(*) FROM delta_scan('{lake}/users')",
    f"SELECT count(*) FROM delta_scan('{lake}/fraud_alerts') WHERE is_anomaly",
    f"SELECT count(*) FROM delta_scan('{lake}/transactions_changes')",
]:
    print("|".join(str(v) for v in con.execute(sql).fetchone()))
"#;
    let out = Command::new(&python)
        .args(["-c", script])
        .arg(&lake)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let duck: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let mut ours = Vec::new();
    for sql in [
        "SELECT count(*), CAST(sum(amount) AS VARCHAR), max(transaction_id) FROM transactions",
        "SELECT count(*) FROM users",
        "SELECT count(*) FROM fraud_alerts WHERE is_anomaly",
        "SELECT count(*) FROM transactions_changes",
    ] {
        ours.push(lake_rows(&lake, sql).await[0].join("|"));
    }
    assert_eq!(duck, ours, "DuckDB and weir read the same tables alike");
    let client = db.client().await;
    let pg = pg_rows(
        &client,
        "SELECT count(*)::text, sum(amount)::text, max(transaction_id)::text FROM transactions",
    )
    .await;
    assert_eq!(
        duck[0],
        pg[0].join("|"),
        "DuckDB reads what PostgreSQL holds"
    );
}
