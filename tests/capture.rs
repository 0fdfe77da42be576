//! Capture against a real PostgreSQL: backfill, every op, before-images, TOAST, schema
//! changes, every type, acknowledgments, TLS and the errors users meet.

mod support;

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::{TestDb, backfill, changes, next_event, wait_for};
use weir::source::{Capture, CaptureEvent, CaptureOptions, Resume};

fn meta<'a>(doc: &'a Value, field: &str) -> &'a Value {
    &doc["_meta"][field]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_then_every_op() {
    let db = TestDb::new("ops");
    db.sql(
        "CREATE TABLE users (id int PRIMARY KEY, name text, email text);
         INSERT INTO users VALUES (1, 'ann', 'ann@example.com'), (2, 'bob', 'bob@example.com');",
    );
    let mut capture = Capture::start(&db.source(&["public.users"]), CaptureOptions::default())
        .await
        .unwrap();
    let rows = backfill(&mut capture).await;
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], json!(1));
    assert_eq!(rows[0]["email"], json!("ann@example.com"));
    assert_eq!(meta(&rows[0], "op"), "r");
    assert_eq!(meta(&rows[0], "source")["snapshot"], json!(true));
    assert_eq!(meta(&rows[1], "source")["seq"], json!(1));

    db.sql(
        "BEGIN;
         INSERT INTO users VALUES (3, 'cy', 'cy@example.com');
         UPDATE users SET name = 'anne' WHERE id = 1;
         DELETE FROM users WHERE id = 2;
         COMMIT;
         TRUNCATE users;",
    );
    let docs = changes(&mut capture, 4).await;
    let ops: Vec<&str> = docs
        .iter()
        .map(|d| meta(d, "op").as_str().unwrap())
        .collect();
    assert_eq!(ops, ["c", "u", "d", "t"]);
    assert_eq!(docs[0]["name"], json!("cy"));
    assert_eq!(docs[1]["name"], json!("anne"));
    assert!(
        meta(&docs[1], "before").is_null(),
        "default identity sends no old row for a non-key update"
    );
    // A delete with the default identity carries the key.
    assert_eq!(docs[2]["id"], json!(2));
    assert!(docs[2]["name"].is_null());
    assert_eq!(meta(&docs[3], "source")["table"], json!("users"));
    // One transaction: same lsn and txid, seq counts up.
    let src: Vec<&Value> = docs[..3].iter().map(|d| meta(d, "source")).collect();
    assert_eq!(src[0]["lsn"], src[2]["lsn"]);
    assert_eq!(src[0]["txid"], src[2]["txid"]);
    assert_eq!(
        (src[0]["seq"].clone(), src[2]["seq"].clone()),
        (json!(0), json!(2))
    );
    assert_ne!(src[0]["lsn"], meta(&docs[3], "source")["lsn"]);
    assert!(src[0]["ts_ms"].as_i64().unwrap() > 1_600_000_000_000);
    capture.shutdown().await.unwrap();
}

/// A backlog raises the receive low-water mark on the replication socket (which the server
/// helps find); once caught up the mark comes down, so a lone small transaction still
/// arrives (with the mark up it would wait for 64 KiB more), and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_raises_the_low_water_mark_and_a_lone_change_still_arrives() {
    let db = TestDb::new("lowwater");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, v text)");
    let source = db.source(&["public.t"]);
    let mut capture = Capture::start(&source, CaptureOptions::default())
        .await
        .unwrap();
    assert!(backfill(&mut capture).await.is_empty());
    let position = db.confirmed_flush("weir");
    capture.shutdown().await.unwrap();

    // A backlog: 20 transactions written while no one reads, a second old when read.
    for k in 0..20 {
        db.sql(&format!(
            "INSERT INTO t SELECT i, 'row ' || i FROM generate_series({}, {}) i",
            k * 5_000 + 1,
            (k + 1) * 5_000
        ));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opts = CaptureOptions {
        resume: Resume::After(position),
        ..CaptureOptions::default()
    };
    let mut capture = Capture::start(&source, opts).await.unwrap();
    let mut ids = Vec::new();
    let mut commits = 0;
    while commits < 20 {
        match next_event(&mut capture, 30).await {
            CaptureEvent::Change(doc) => {
                let doc: Value = serde_json::from_str(&doc.to_json()).unwrap();
                ids.push(doc["id"].as_i64().unwrap());
            }
            CaptureEvent::Commit { position, .. } => {
                capture.acknowledge(position);
                commits += 1;
            }
            _ => {}
        }
    }
    assert_eq!(
        ids,
        (1..=100_000).collect::<Vec<i64>>(),
        "every row once, in order"
    );
    assert!(
        capture.progress().low_water_raises() >= 1,
        "the backlog raised the mark"
    );
    for id in [100_001, 100_002] {
        db.sql(&format!("INSERT INTO t VALUES ({id}, 'alone')"));
        let started = std::time::Instant::now();
        let doc = loop {
            match next_event(&mut capture, 10).await {
                CaptureEvent::Change(doc) => {
                    break serde_json::from_str::<Value>(&doc.to_json()).unwrap();
                }
                CaptureEvent::Schema(_) | CaptureEvent::Idle { .. } => {}
                other => panic!("expected the lone change, got {other:?}"),
            }
        };
        assert_eq!(doc["id"], json!(id));
        eprintln!("lone change {id} arrived after {:?}", started.elapsed());
        match next_event(&mut capture, 10).await {
            CaptureEvent::Commit { position, .. } => capture.acknowledge(position),
            other => panic!("expected its commit, got {other:?}"),
        }
    }
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_is_consistent_with_concurrent_writes() {
    let db = TestDb::new("consistency");
    db.sql("CREATE TABLE t (id bigserial PRIMARY KEY, v int); INSERT INTO t (v) SELECT generate_series(1, 5000);");
    let client = db.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                client
                    .batch_execute("INSERT INTO t (v) VALUES (0)")
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut capture = Capture::start(&db.source(&["t"]), CaptureOptions::default())
        .await
        .unwrap();
    let mut seen: HashMap<i64, usize> = HashMap::new();
    for doc in backfill(&mut capture).await {
        *seen.entry(doc["id"].as_i64().unwrap()).or_default() += 1;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(
        written > 10,
        "the writer must overlap the capture start ({written} rows)"
    );
    let total: usize = db.sql("SELECT count(*) FROM t").parse().unwrap();
    let missing = total - seen.len();
    for doc in changes(&mut capture, missing).await {
        *seen.entry(doc["id"].as_i64().unwrap()).or_default() += 1;
    }
    let max: i64 = db.sql("SELECT max(id) FROM t").parse().unwrap();
    assert_eq!(seen.len(), total);
    assert!(
        (1..=max).all(|id| seen.get(&id) == Some(&1)),
        "every row exactly once"
    );
    // Nothing more arrives: no row was delivered twice later on.
    let extra = tokio::time::timeout(Duration::from_millis(700), capture.next()).await;
    assert!(
        !matches!(extra, Ok(Ok(Some(CaptureEvent::Change(_))))),
        "no further changes expected"
    );
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_table_is_copied_over_several_connections_at_the_slots_snapshot() {
    let db = TestDb::new("parallel_copy");
    // About 600 blocks: three ranges of at least 128. `s` is too small to be split.
    db.sql(
        "CREATE TABLE t (id bigint PRIMARY KEY, v int, pad text); \
         INSERT INTO t SELECT g, g % 7, repeat('p', 80) FROM generate_series(1, 40000) g; \
         CREATE TABLE s (id int PRIMARY KEY); INSERT INTO s VALUES (1), (2);",
    );
    db.sql("VACUUM ANALYZE t");
    let blocks: i64 = db
        .sql("SELECT pg_relation_size('t') / 8192")
        .parse()
        .unwrap();
    assert!(blocks >= 3 * 128, "{blocks} blocks");
    // Rows inserted, updated (moved to new blocks) and deleted while the copy starts: a
    // copier that did not read at the slot's snapshot would see them.
    let client = db.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                n += 1;
                client
                    .batch_execute(&format!(
                        "INSERT INTO t VALUES ({}, -1, 'new'); \
                         UPDATE t SET v = v + 100 WHERE id = {}; DELETE FROM t WHERE id = {};",
                        40000 + n,
                        2 * n,
                        2 * n + 1
                    ))
                    .await
                    .unwrap();
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut source = db.source(&["t", "s"]);
    source.backfill_connections = 3;
    let mut capture = Capture::start(&source, CaptureOptions::default())
        .await
        .unwrap();
    // The copy, table by table: how many connections each took, its rows by key.
    let mut connections = HashMap::new();
    let mut copied: HashMap<i64, Value> = HashMap::new();
    loop {
        match next_event(&mut capture, 60).await {
            CaptureEvent::BackfillTable {
                table,
                connections: n,
                ..
            } => {
                connections.insert(table, n);
            }
            CaptureEvent::Change(doc) if doc.source.table.as_ref() == "t" => {
                let doc: Value = serde_json::from_str(&doc.to_json()).unwrap();
                let id = doc["id"].as_i64().unwrap();
                assert!(copied.insert(id, doc).is_none(), "row {id} copied twice");
            }
            CaptureEvent::BackfillDone { position } => {
                capture.acknowledge(position);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(connections.get("public.t"), Some(&3), "{connections:?}");
    assert_eq!(connections.get("public.s"), Some(&1), "{connections:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = writer.await.unwrap();
    assert!(
        written > 5,
        "the writer must overlap the capture start ({written} rounds)"
    );
    // The copy and then the stream give PostgreSQL's table, every change once: apply the
    // stream's changes to the copy (an insert of a key already there, or a change of a key
    // not there, would be a change seen twice or missed).
    let mut table: HashMap<i64, i64> = copied
        .iter()
        .map(|(id, d)| (*id, d["v"].as_i64().unwrap()))
        .collect();
    // A last change in `s` after the writer's: the stream is read through it.
    db.sql("INSERT INTO s VALUES (99)");
    loop {
        let doc = changes(&mut capture, 1).await.remove(0);
        let id = doc["id"].as_i64().unwrap();
        if meta(&doc, "source")["table"] == "s" {
            assert_eq!(id, 99);
            break;
        }
        let v = || doc["v"].as_i64().unwrap();
        match meta(&doc, "op").as_str().unwrap() {
            "c" => assert!(table.insert(id, v()).is_none(), "insert of {id} twice"),
            "u" => assert!(table.insert(id, v()).is_some(), "update of {id} missing"),
            "d" => assert!(table.remove(&id).is_some(), "delete of {id} missing"),
            op => panic!("{op}"),
        }
    }
    let pg = support::lake::pg_rows(
        &db.client().await,
        "SELECT id::text, v::text FROM t ORDER BY t.id",
    )
    .await;
    let mut ours: Vec<(i64, i64)> = table.into_iter().collect();
    ours.sort();
    let ours: Vec<Vec<String>> = ours
        .iter()
        .map(|(id, v)| vec![id.to_string(), v.to_string()])
        .collect();
    support::lake::assert_same_rows(&pg, &ours, "t: copy + stream against PostgreSQL");
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_images_with_replica_identity_full_and_key_changes() {
    let db = TestDb::new("before");
    db.sql(
        "CREATE TABLE full_t (id int PRIMARY KEY, a text, b int);
         ALTER TABLE full_t REPLICA IDENTITY FULL;
         CREATE TABLE key_t (id int PRIMARY KEY, a text);
         INSERT INTO full_t VALUES (1, 'x', 10);
         INSERT INTO key_t VALUES (1, 'x');",
    );
    let mut capture = Capture::start(&db.source(&["full_t", "key_t"]), CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut capture).await;
    db.sql(
        "UPDATE full_t SET b = 11 WHERE id = 1;
         DELETE FROM full_t WHERE id = 1;
         UPDATE key_t SET id = 2 WHERE id = 1;",
    );
    let docs = changes(&mut capture, 3).await;
    assert_eq!(
        meta(&docs[0], "before"),
        &json!({"id": 1, "a": "x", "b": 10})
    );
    assert_eq!(docs[0]["b"], json!(11));
    // A delete under FULL carries the whole old row at top level.
    assert_eq!(meta(&docs[1], "op"), "d");
    assert_eq!(
        (docs[1]["a"].clone(), docs[1]["b"].clone()),
        (json!("x"), json!(11))
    );
    // A key change under the default identity sends the old key only.
    assert_eq!(meta(&docs[2], "before"), &json!({"id": 1}));
    assert_eq!(docs[2]["id"], json!(2));
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unchanged_toast_values_are_marked_not_null() {
    let db = TestDb::new("toast");
    db.sql(
        "CREATE TABLE docs (id int PRIMARY KEY, title text, body text);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;",
    );
    let mut capture = Capture::start(&db.source(&["docs"]), CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut capture).await;
    db.sql(
        "INSERT INTO docs SELECT 1, 'first', string_agg(md5(i::text), '') FROM generate_series(1, 2000) i;
         UPDATE docs SET title = 'renamed' WHERE id = 1;",
    );
    let docs = changes(&mut capture, 2).await;
    assert_eq!(docs[0]["body"].as_str().unwrap().len(), 64_000);
    assert_eq!(docs[1]["title"], json!("renamed"));
    assert!(
        docs[1].get("body").is_none(),
        "an unchanged TOAST value must not appear, not even as null"
    );
    assert_eq!(meta(&docs[1], "unchanged"), &json!(["body"]));
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_column_mid_stream() {
    let db = TestDb::new("schema");
    db.sql("CREATE TABLE t (id int PRIMARY KEY, a text);");
    // Connection fields instead of a URL.
    let mut source = db.source(&["t"]);
    source.url = String::new();
    source.host = Some("127.0.0.1".into());
    source.port = Some(db.cluster.port());
    source.user = Some("postgres".into());
    source.database = Some(db.db.clone());
    let mut capture = Capture::start(&source, CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut capture).await;
    db.sql(
        "INSERT INTO t VALUES (1, 'before');
         ALTER TABLE t ADD COLUMN note text, ADD COLUMN n numeric(5,1);
         INSERT INTO t VALUES (2, 'after', 'hello', 2.5);
         ALTER TABLE t DROP COLUMN a;
         INSERT INTO t VALUES (3, 'dropped a', 1);",
    );
    let docs = changes(&mut capture, 3).await;
    assert!(docs[0].get("note").is_none());
    assert_eq!(docs[1]["note"], json!("hello"));
    assert_eq!(docs[1]["n"], json!("2.5"));
    assert!(docs[2].get("a").is_none());
    assert_eq!(docs[2]["note"], json!("dropped a"));
    capture.shutdown().await.unwrap();
}

const TYPES_TABLE: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN money_amount AS numeric(12,2);
CREATE TABLE types (
  id int PRIMARY KEY,
  i2 smallint, i4 int, i8 bigint,
  num numeric(20,4), num_nan numeric, amount money_amount,
  r real, d double precision, d_inf double precision,
  b bool,
  t text, vc varchar(10), ch char(3),
  tstz timestamptz, ts timestamp, dt date, tm time,
  u uuid,
  j json, jb jsonb,
  by bytea,
  m mood,
  ai int[], at text[], a2 int[][], am mood[], anum numeric[],
  nul text
);";

const TYPES_ROW: &str = "
INSERT INTO types VALUES (
  1,
  -32768, 2147483647, 9223372036854775807,
  12345678901234.5678, 'NaN', 99.95,
  1.5, 0.1, '-Infinity',
  true,
  E'tab\\there \"quoted\" \\\\ back', 'varchar', 'ab',
  '2024-05-01 14:00:00.25+02', '2024-05-01 12:00:00.123456', '2024-05-01', '23:59:59.5',
  'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{\"k\": [1, \"x\"]}', '{\"b\": {\"c\": null}}',
  '\\x00ff10',
  'happy',
  '{1,NULL,3}', '{\"a b\",\"c,d\",NULL}', '{{1,2},{3,4}}', '{ok,sad}', '{1.50,2}',
  NULL
);";

fn expected_types_row() -> Value {
    json!({
        "id": 1,
        "i2": -32768, "i4": 2147483647, "i8": 9223372036854775807i64,
        "num": "12345678901234.5678", "num_nan": "NaN", "amount": "99.95",
        "r": 1.5, "d": 0.1, "d_inf": "-Infinity",
        "b": true,
        "t": "tab\there \"quoted\" \\ back", "vc": "varchar", "ch": "ab ",
        "tstz": "2024-05-01T12:00:00.250000Z", "ts": "2024-05-01T12:00:00.123456",
        "dt": "2024-05-01", "tm": "23:59:59.500000",
        "u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "j": {"k": [1, "x"]}, "jb": {"b": {"c": null}},
        "by": "AP8Q",
        "m": "happy",
        "ai": [1, null, 3], "at": ["a b", "c,d", null], "a2": [[1, 2], [3, 4]],
        "am": ["ok", "sad"], "anum": ["1.50", "2"],
        "nul": null,
    })
}

fn without_meta(mut v: Value) -> Value {
    v.as_object_mut().unwrap().remove("_meta");
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_has_its_json_form_in_backfill_and_stream() {
    let db = TestDb::new("types");
    db.sql(TYPES_TABLE);
    db.sql(TYPES_ROW);
    let mut capture = Capture::start(&db.source(&["types"]), CaptureOptions::default())
        .await
        .unwrap();
    let rows = backfill(&mut capture).await;
    assert_eq!(
        without_meta(rows[0].clone()),
        expected_types_row(),
        "backfill (COPY) form"
    );
    db.sql(&TYPES_ROW.replace("(\n  1,", "(\n  2,"));
    let docs = changes(&mut capture, 1).await;
    let mut expected = expected_types_row();
    expected["id"] = json!(2);
    assert_eq!(
        without_meta(docs[0].clone()),
        expected,
        "streamed (pgoutput) form"
    );
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_skips_what_the_consumer_made_durable_and_acks_while_idle() {
    let db = TestDb::new("resume");
    db.sql("CREATE TABLE t (id int PRIMARY KEY);");
    let source = db.source(&["t"]);
    let mut capture = Capture::start(&source, CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut capture).await;
    // Two transactions (psql -c would run both statements in one).
    db.sql("INSERT INTO t VALUES (1)");
    db.sql("INSERT INTO t VALUES (2)");
    // Deliver both, but declare only the first durable.
    let mut positions = Vec::new();
    while positions.len() < 2 {
        if let CaptureEvent::Commit { position, .. } = next_event(&mut capture, 30).await {
            positions.push(position);
        }
    }
    capture.acknowledge(positions[0]);
    capture.shutdown().await.unwrap();
    assert_eq!(
        db.confirmed_flush("weir"),
        positions[0],
        "the last acknowledgment reached the server"
    );

    // Restart: the unacknowledged transaction comes again; the durable one does not.
    let opts = CaptureOptions {
        resume: Resume::After(positions[0]),
        idle_interval: Duration::from_secs(1),
        ..CaptureOptions::default()
    };
    let mut capture = Capture::start(&source, opts.clone()).await.unwrap();
    let docs = changes(&mut capture, 1).await;
    assert_eq!(docs[0]["id"], json!(2));
    // Acknowledge it, then let WAL grow elsewhere: the slot follows while idle.
    let position = loop {
        if let CaptureEvent::Commit { position, .. } = next_event(&mut capture, 30).await {
            break position;
        }
    };
    capture.acknowledge(position);
    db.cluster.create_database("elsewhere").unwrap();
    db.cluster
        .psql(
            "elsewhere",
            "CREATE TABLE x AS SELECT generate_series(1, 10000) i",
        )
        .unwrap();
    let wal_now: weir::Lsn = db
        .sql("SELECT pg_current_wal_insert_lsn()")
        .parse()
        .unwrap();
    let keepalives = async {
        // Keep the stream moving so keepalives arrive; nothing else is delivered, and
        // the idle positions offered are acknowledged as a consumer that records them
        // would.
        while let Ok(Ok(Some(ev))) =
            tokio::time::timeout(Duration::from_secs(20), capture.next()).await
        {
            assert!(
                !matches!(ev, CaptureEvent::Change(_)),
                "unexpected change {ev:?}"
            );
            if let CaptureEvent::Idle { position } = ev {
                capture.acknowledge(position);
            }
        }
    };
    let watch = wait_for("the slot to advance past unrelated WAL", 20, || {
        db.confirmed_flush("weir") >= wal_now
    });
    tokio::select! {
        _ = keepalives => panic!("capture ended"),
        _ = watch => {}
    }
    capture.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_without_identity_keeps_inserts_and_source_updates_work() {
    let db = TestDb::new("noident");
    db.sql("CREATE TABLE log (msg text); CREATE TABLE t (id int PRIMARY KEY);");
    let mut capture = Capture::start(&db.source(&["log", "t"]), CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut capture).await;
    // PostgreSQL rejects updates of a table without identity in a publication that
    // publishes updates: weir's insert-only publication keeps the application working.
    db.sql("INSERT INTO log VALUES ('a'); UPDATE log SET msg = 'b'; DELETE FROM log; INSERT INTO t VALUES (1);");
    let docs = changes(&mut capture, 2).await;
    assert_eq!(docs[0]["msg"], json!("a"));
    assert_eq!(meta(&docs[0], "op"), "c");
    assert_eq!(docs[1]["id"], json!(1));
    capture.shutdown().await.unwrap();
    let pubs = db.sql("SELECT pubname || ':' || tablename FROM pg_publication_tables ORDER BY 1");
    assert_eq!(pubs, "weir:t\nweir_insert_only:log");
}

async fn start_err(source: &weir::config::SourceConfig) -> String {
    match Capture::start(source, CaptureOptions::default()).await {
        Ok(_) => panic!("capture started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_errors_for_bad_settings() {
    let db = TestDb::new("errors");
    db.sql(
        "CREATE TABLE t (id int PRIMARY KEY);
         CREATE ROLE plain LOGIN PASSWORD 'pw';",
    );
    let good = db.source(&["t"]);

    let mut s = good.clone();
    s.tables = vec!["public.nope".into()];
    let e = start_err(&s).await;
    assert!(
        e.contains("`public.nope`") && e.contains("does not exist"),
        "{e}"
    );

    let mut s = good.clone();
    let dir = tempfile::tempdir().unwrap();
    let wrong = dir.path().join("pw");
    std::fs::write(&wrong, "wrong-password").unwrap();
    s.password_file = Some(wrong);
    let e = start_err(&s).await;
    assert!(e.contains("refused the login of user `postgres`"), "{e}");
    assert!(
        !e.contains("wrong-password"),
        "the password must never be printed: {e}"
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut s = good.clone();
    s.url = format!("postgres://postgres@127.0.0.1:{port}/errors");
    let e = start_err(&s).await;
    assert!(
        e.contains(&format!("cannot connect to PostgreSQL at 127.0.0.1:{port}")),
        "{e}"
    );

    let mut s = good.clone();
    s.url = db.cluster.url(&db.db).replace("postgres@", "plain@");
    s.password_file = None;
    s.password_env = Some("WEIR_TEST_PLAIN_PW".into());
    // SAFETY: only this test reads this variable.
    unsafe { std::env::set_var("WEIR_TEST_PLAIN_PW", "pw") };
    let e = start_err(&s).await;
    assert!(e.contains("ALTER ROLE \"plain\" REPLICATION"), "{e}");

    let mut s = good.clone();
    s.password_env = Some("WEIR_TEST_UNSET_VARIABLE".into());
    let e = start_err(&s).await;
    assert!(
        e.contains("WEIR_TEST_UNSET_VARIABLE") && e.contains("not set"),
        "{e}"
    );

    // A slot held by a running capture.
    let mut first = Capture::start(&good, CaptureOptions::default())
        .await
        .unwrap();
    backfill(&mut first).await;
    let e = start_err(&good).await;
    assert!(e.contains("slot `weir` is in use"), "{e}");
    first.shutdown().await.unwrap();

    // The consumer says it has data, but the slot is gone.
    db.sql("SELECT pg_drop_replication_slot('weir')");
    let opts = CaptureOptions {
        resume: Resume::After(weir::Lsn(0x1000)),
        ..CaptureOptions::default()
    };
    let e = match Capture::start(&good, opts).await {
        Ok(_) => panic!("started without its slot"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("slot `weir` is missing") && e.contains("0/1000"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_replica_is_explained() {
    let db = TestDb::with_conf("walreplica", "wal_level = replica");
    db.sql("CREATE TABLE t (id int PRIMARY KEY);");
    let e = start_err(&db.source(&["t"])).await;
    assert!(
        e.contains("wal_level = replica") && e.contains("wal_level = logical"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_with_a_ca_signed_certificate() {
    let db = TestDb::new("tls");
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=weir test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    std::fs::write(
        dir.path().join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
    let read = |f: &str| std::fs::read(dir.path().join(f)).unwrap();
    db.cluster
        .install_file("server.crt", &read("server.crt"))
        .unwrap();
    db.cluster
        .install_file("server.key", &read("server.key"))
        .unwrap();
    db.sql("ALTER SYSTEM SET ssl = on");
    db.cluster.restart().unwrap();
    db.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);");

    let mut s = db.source(&["t"]);
    s.url = s.url.replace("127.0.0.1", "localhost");
    s.tls = weir::config::TlsMode::VerifyFull;
    s.ca_file = Some(dir.path().join("ca.crt"));
    let mut capture = Capture::start(&s, CaptureOptions::default()).await.unwrap();
    assert_eq!(backfill(&mut capture).await.len(), 1);
    db.sql("INSERT INTO t VALUES (2)");
    assert_eq!(changes(&mut capture, 1).await[0]["id"], json!(2));
    let ssl = db.sql("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_replication USING (pid)");
    assert_eq!(ssl, "t", "the replication session runs over TLS");
    capture.shutdown().await.unwrap();

    // Another CA: refused, with the reason.
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=other CA",
    ]);
    s.ca_file = Some(dir.path().join("other.crt"));
    let e = start_err(&s).await;
    assert!(e.to_lowercase().contains("certificate"), "{e}");
}
