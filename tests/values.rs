//! Values as PostgreSQL ships them, through backfill and stream into Delta: those a Delta
//! column cannot hold keep their exact value in `_raw`, and no value of any type becomes
//! NULL silently.

mod support;

use serde_json::{Value, json};
use support::TestDb;
use support::lake::*;

const TABLE: &str = "CREATE TYPE mood AS ENUM ('sad', 'happy');
    CREATE TYPE pair AS (a int, b text);
    CREATE DOMAIN posint AS int CHECK (VALUE > 0);
    CREATE DOMAIN codes AS text[];
    CREATE TABLE v (id int PRIMARY KEY, d date, tz timestamptz, ts timestamp,
      n numeric(10,2), nu numeric, f float8, ai int[], at text[],
      pt point, bx box, rg int4range, mr int4multirange, cp pair, dom posint, dar codes,
      moods mood[], bt bit(4), vb varbit, mn money, iv interval, x xml, ip inet, cd cidr,
      mac macaddr, tv tsvector, j jsonb);";

/// Row `id` with values Delta columns cannot hold in the typed columns.
fn edge_row(id: i32) -> String {
    format!(
        "INSERT INTO v (id, d, tz, ts, n, nu, f, ai, at) VALUES
           ({id}, '-infinity', 'infinity', '-infinity', 'NaN', 'Infinity', 'NaN',
            '{{{{1,2}},{{3,NULL}}}}', '{{{{a,NULL}},{{c,d}}}}'),
           ({}, '0044-03-15 BC', '10000-01-01 00:00:00+00', '0001-01-01 00:00:00 BC', 1.5,
            '-Infinity', '-Infinity', '{{1,NULL}}', '{{NULL}}');",
        id + 1
    )
}

/// Row `id` with an ordinary value in every column.
fn ordinary_row(id: i32) -> String {
    format!(
        "INSERT INTO v VALUES ({id}, '2024-05-01', '2024-05-01 12:00:00+00',
           '2024-05-01 12:00:00', 12.50, 3.25, 2.5, '{{1,2}}', '{{a,b}}',
           '(1.5,2)', '((0,0),(1,1))', '[1,5)', '{{[1,3),[7,9)}}', '(1,\"x y\")', 7,
           '{{A1,B2}}', '{{sad,happy}}', B'1010', B'101', 12.34, '1 year 2 days',
           '<a>1</a>', '192.168.0.1/24', '10.0.0.0/8', '08:00:2b:01:02:03',
           'a fat cat', '{{\"n\": 1}}');"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_delta_cannot_hold_keep_their_exact_form_and_nothing_is_silently_null() {
    let db = TestDb::new("values");
    db.sql(TABLE);
    // Rows 1-3 through the backfill, 11-13 through the stream.
    db.sql(&(edge_row(1) + &ordinary_row(3)));
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["v"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(&(edge_row(11) + &ordinary_row(13)));
    db.sql("INSERT INTO v (id, d) VALUES (21, 'infinity');");
    run_until_now(&db, &cfg).await;
    // An update that makes a value representable clears its `_raw` entry.
    db.sql("UPDATE v SET d = '2020-02-02' WHERE id = 21;");
    run_until_now(&db, &cfg).await;

    let raw = |rows: Vec<Vec<String>>| -> Vec<(String, Value)> {
        rows.into_iter()
            .map(|r| {
                let v = if r[1] == "NULL" {
                    Value::Null
                } else {
                    serde_json::from_str(&r[1]).unwrap()
                };
                (r[0].clone(), v)
            })
            .collect()
    };
    let edge = |d: &str, tz: &str, ts: &str| {
        // (A two-dimensional text array keeps its sub-arrays as JSON text: not lost.)
        json!({"d": d, "tz": tz, "ts": ts, "n": "NaN", "ai": [[1, 2], [3, null]]})
    };
    // The change document's form of each value (see the README's "Change documents").
    let second = json!({"d": "0044-03-15 BC", "tz": "10000-01-01T00:00:00.000000Z",
                        "ts": "0001-01-01 00:00:00 BC"});
    for table in ["v", "v_changes"] {
        let got = raw(lake_rows(
            &lake,
            &format!(
                "SELECT CAST(id AS VARCHAR) AS k, _raw FROM {table} WHERE id IN (1, 2, 3, 11, 12, 13) \
                     ORDER BY id"
            ),
        )
        .await);
        let want = vec![
            ("1".to_string(), edge("-infinity", "infinity", "-infinity")),
            ("2".to_string(), second.clone()),
            ("3".to_string(), Value::Null),
            ("11".to_string(), edge("-infinity", "infinity", "-infinity")),
            ("12".to_string(), second.clone()),
            ("13".to_string(), Value::Null),
        ];
        assert_eq!(got, want, "{table}");
    }
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT CAST(d AS VARCHAR) AS dt, _raw FROM v WHERE id = 21"
        )
        .await,
        [vec!["2020-02-02".to_string(), "NULL".to_string()]]
    );

    // No value is NULL in the lake unless it is NULL in PostgreSQL or in `_raw`.
    let columns: Vec<String> = db
        .sql(
            "SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute \
             WHERE attrelid = 'v'::regclass AND attnum > 1 AND NOT attisdropped",
        )
        .split(',')
        .map(String::from)
        .collect();
    let nulls = |quote: char| {
        columns
            .iter()
            .map(|c| format!("CASE WHEN {quote}{c}{quote} IS NULL THEN 'N' ELSE '-' END"))
            .collect::<Vec<_>>()
            .join(" || ")
    };
    let client = db.client().await;
    let pg = pg_rows(
        &client,
        &format!("SELECT id::text, {} FROM v ORDER BY v.id", nulls('"')),
    )
    .await;
    let delta = lake_rows(
        &lake,
        &format!(
            "SELECT CAST(id AS VARCHAR) AS k, {} AS nulls, _raw FROM v ORDER BY id",
            nulls('`')
        ),
    )
    .await;
    assert_eq!(pg.len(), delta.len());
    for (p, d) in pg.iter().zip(&delta) {
        let raw: Value = if d[2] == "NULL" {
            json!({})
        } else {
            serde_json::from_str(&d[2]).unwrap()
        };
        for (i, c) in columns.iter().enumerate() {
            let (in_pg, in_lake) = (&p[1][i..i + 1], &d[1][i..i + 1]);
            assert!(
                in_pg == in_lake || (in_pg == "-" && raw.get(c).is_some()),
                "row {}: column {c} is {} in PostgreSQL and {} in the lake (raw {raw})",
                p[0],
                if in_pg == "N" { "NULL" } else { "set" },
                if in_lake == "N" { "NULL" } else { "set" },
            );
        }
    }

    // The text forms of types kept as PostgreSQL prints them.
    let texts = "pt, bx, rg, mr, cp, bt, vb, mn, x, ip, cd, mac, tv";
    let pg = pg_rows(
        &client,
        &format!(
            "SELECT {} FROM v WHERE id IN (3, 13) ORDER BY v.id",
            texts
                .split(", ")
                .map(|c| format!("{c}::text"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
    .await;
    let delta = lake_rows(
        &lake,
        &format!("SELECT {texts} FROM v WHERE id IN (3, 13) ORDER BY id"),
    )
    .await;
    assert_same_rows(&pg, &delta, "text-form types");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn widened_column_types_evolve_the_lake_and_a_narrowing_stops_with_the_fix() {
    let db = TestDb::new("widen");
    db.sql(
        "CREATE TABLE w (id int PRIMARY KEY, n int, amt numeric(10,2), name varchar(5), \
           r real, q numeric(6,2)); \
         INSERT INTO w VALUES (1, 7, 12345678.90, 'ann', 2.5, 1.50), (2, NULL, 0.01, 'bo', NULL, NULL);",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["w"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(
        "ALTER TABLE w ALTER COLUMN n TYPE bigint, ALTER COLUMN amt TYPE numeric(14,2), \
           ALTER COLUMN name TYPE text, ALTER COLUMN r TYPE double precision, \
           ALTER COLUMN q TYPE numeric; \
         INSERT INTO w VALUES (3, 5000000000, 123456789012.34, 'a longer name', 0.125, 1.255); \
         UPDATE w SET n = n + 1 WHERE id = 1;",
    );
    run_until_now(&db, &cfg).await;
    let pg = "SELECT id::text, n::text, amt::text, name, r::text, q::text FROM w ORDER BY w.id";
    let delta = "SELECT id, n, CAST(amt AS VARCHAR) AS a, name, r, q FROM w ORDER BY id";
    assert_query_equal(&db, &lake, pg, delta, "w after widening").await;
    let types = lake_rows(
        &lake,
        "SELECT arrow_typeof(n), arrow_typeof(amt), arrow_typeof(r), arrow_typeof(q) FROM w LIMIT 1",
    )
    .await;
    assert_eq!(types[0][0], "Int64");
    assert_eq!(types[0][1], "Decimal128(14, 2)");
    assert_eq!(types[0][2], "Float64");
    assert!(types[0][3].starts_with("Utf8"), "{:?}", types[0]);
    // Every change in the change log once, the old rows widened too. `ALTER COLUMN n TYPE
    // bigint` rewrote the table (as an `USING` expression would, with other values): it
    // was copied again, after the first copy and the changes streamed.
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT _op, CAST(n AS VARCHAR) AS n FROM w_changes ORDER BY _lsn, _snapshot, n"
        )
        .await,
        [
            ["r", "7"],
            ["r", "NULL"],
            ["c", "5000000000"],
            ["u", "8"],
            ["r", "5000000000"],
            ["r", "8"],
            ["r", "NULL"]
        ]
        .map(|r| r.map(String::from).to_vec())
    );

    // A narrowing cannot be applied: a stop, with the fix, and nothing acknowledged.
    db.sql("ALTER TABLE w ALTER COLUMN r TYPE real; INSERT INTO w VALUES (4, 1, 1, 'x', 1, 1);");
    let acked = db.confirmed_flush("weir");
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let err = weir::pipeline::run_with_retries(&cfg, weir::pipeline::RunOptions::default(), rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("`w`") && err.contains("`r`") && err.contains("widens a column in place"),
        "{err}"
    );
    assert_eq!(
        db.confirmed_flush("weir"),
        acked,
        "nothing was acknowledged"
    );
}

/// Table rewrites whose new values PostgreSQL does not stream (a column added with a
/// volatile default or as a `serial`, `ALTER COLUMN ... TYPE ... USING`) make weir copy
/// that table again, alone: its replica equals the source, its change log keeps every
/// streamed change once; rewrites that change no value (`VACUUM FULL`) and a constant
/// default copy nothing; the other table is never copied again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewritten_tables_are_copied_again_and_nothing_else_is() {
    let db = TestDb::new("rewrite");
    db.sql(
        "CREATE TABLE t (id int PRIMARY KEY, v int, note text); \
         CREATE TABLE o (id int PRIMARY KEY, v int); \
         INSERT INTO t VALUES (1, 10, 'a'), (2, 20, NULL), (3, 30, 'c'); INSERT INTO o VALUES (1, 1);",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["t", "o"], &lake);
    run_until_now(&db, &cfg).await;
    let pg = "SELECT id::text, v::text, note, u::text, s::text, k::text FROM t ORDER BY t.id";
    let delta = "SELECT CAST(id AS VARCHAR) AS i, CAST(v AS VARCHAR) AS v, note, u, \
                 CAST(s AS VARCHAR) AS s, CAST(k AS VARCHAR) AS k FROM t ORDER BY id";
    let snapshots = |table: &'static str| {
        let lake = lake.clone();
        async move {
            lake_rows(
                &lake,
                &format!("SELECT count(DISTINCT _lsn) FROM {table}_changes WHERE _snapshot"),
            )
            .await[0][0]
                .clone()
        }
    };

    // Every older row gets a value of its own, none in the stream.
    db.sql(
        "ALTER TABLE t ADD COLUMN u uuid DEFAULT gen_random_uuid(), ADD COLUMN s serial, \
           ADD COLUMN k int DEFAULT 7; \
         INSERT INTO t (id, v) VALUES (4, 40); UPDATE o SET v = 2;",
    );
    run_until_now(&db, &cfg).await;
    assert_query_equal(
        &db,
        &lake,
        pg,
        delta,
        "t after ADD COLUMN with volatile defaults",
    )
    .await;
    assert_eq!(snapshots("t").await, "2", "t copied again once");

    // Values rewritten by an expression, in the same transaction as a change.
    db.sql("ALTER TABLE t ALTER COLUMN v TYPE bigint USING v * 100; UPDATE t SET note = 'x' WHERE id = 1;");
    db.sql("UPDATE t SET note = 'y' WHERE id = 2; DELETE FROM t WHERE id = 3;");
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "t after ALTER COLUMN TYPE USING").await;
    assert_eq!(snapshots("t").await, "3", "t copied again once more");

    // No value changes: nothing is copied.
    db.sql("VACUUM FULL t");
    db.sql("INSERT INTO t (id, v) VALUES (5, 50); TRUNCATE o; INSERT INTO o VALUES (9, 9);");
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "t after VACUUM FULL").await;
    assert_eq!(snapshots("t").await, "3", "VACUUM FULL copies nothing");
    db.sql("ALTER TABLE t ADD COLUMN c int DEFAULT 5; INSERT INTO t (id, v) VALUES (6, 60);");
    run_until_now(&db, &cfg).await;
    assert_query_equal(&db, &lake, pg, delta, "t after ADD COLUMN DEFAULT 5").await;
    assert_eq!(
        snapshots("t").await,
        "3",
        "a constant default copies nothing"
    );
    assert_eq!(
        lake_rows(&lake, "SELECT CAST(c AS VARCHAR) AS c FROM t ORDER BY id").await,
        vec![vec!["5"]; 5],
        "a constant default fills the older rows"
    );
    assert_eq!(snapshots("o").await, "1", "o was never copied again");
    assert_query_equal(
        &db,
        &lake,
        "SELECT id::text, v::text FROM o ORDER BY o.id",
        "SELECT CAST(id AS VARCHAR) AS i, CAST(v AS VARCHAR) AS v FROM o ORDER BY id",
        "o",
    )
    .await;
    // Every streamed change of t once, in order.
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT _op, CAST(id AS VARCHAR) AS id FROM t_changes WHERE NOT _snapshot \
             ORDER BY _lsn, _seq"
        )
        .await,
        [
            ["c", "4"],
            ["u", "1"],
            ["u", "2"],
            ["d", "3"],
            ["c", "5"],
            ["c", "6"]
        ]
        .map(|r| r.map(String::from).to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_drops_and_defaults_keep_every_value_of_the_rows_around_them() {
    let db = TestDb::new("reshape");
    db.sql(
        "CREATE TABLE s (id int PRIMARY KEY, a text, b int); \
         INSERT INTO s VALUES (1, 'one', 10), (2, 'two', 20);",
    );
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["s"], &lake);
    run_until_now(&db, &cfg).await;
    // Schema changes between row changes of one transaction: each change keeps its values.
    db.sql(
        "BEGIN; \
         INSERT INTO s VALUES (3, 'three', 30); \
         ALTER TABLE s RENAME COLUMN a TO a2; \
         INSERT INTO s VALUES (4, 'four', 40); \
         ALTER TABLE s ADD COLUMN c int DEFAULT 7; \
         INSERT INTO s (id, a2, b) VALUES (5, 'five', 50); \
         UPDATE s SET b = b + 1 WHERE id = 1; \
         ALTER TABLE s DROP COLUMN b; \
         INSERT INTO s VALUES (6, 'six', 6); \
         COMMIT;",
    );
    // Added with defaults, in a transaction of its own.
    db.sql(
        "ALTER TABLE s ADD COLUMN d text NOT NULL DEFAULT 'dee', ADD COLUMN e numeric DEFAULT 2.5, \
           ADD COLUMN f int, ADD COLUMN g timestamptz DEFAULT 'infinity'; \
         INSERT INTO s (id, a2, c, f) VALUES (7, 'seven', 0, 1);",
    );
    // A default Delta cannot hold, added to rows whose `_raw` holds another already.
    db.sql(
        "ALTER TABLE s ADD COLUMN h date DEFAULT '0044-03-15 BC'; \
         INSERT INTO s (id, a2) VALUES (9, 'nine');",
    );
    run_until_now(&db, &cfg).await;
    // While weir is stopped: renamed again (the replica learns it at the next start).
    db.sql(
        "ALTER TABLE s RENAME COLUMN a2 TO name; ALTER TABLE s RENAME COLUMN d TO dd; \
         UPDATE s SET c = 8 WHERE id = 2; INSERT INTO s (id, name) VALUES (8, 'eight');",
    );
    run_until_now(&db, &cfg).await;
    let pg = "SELECT id::text, name, c::text, dd, e::text, f::text FROM s ORDER BY s.id";
    let delta = "SELECT id, name, c, dd, CAST(e AS VARCHAR) AS e, f FROM s ORDER BY id";
    assert_query_equal(&db, &lake, pg, delta, "s after renames, drops and defaults").await;
    // Every row has g = 'infinity' and h = '0044-03-15 BC' in PostgreSQL: NULL in their
    // Delta columns and the values in `_raw`, the older rows' too.
    let raw = lake_rows(
        &lake,
        "SELECT id, CAST(g IS NULL AND h IS NULL AS VARCHAR) AS gone, _raw FROM s ORDER BY id",
    )
    .await;
    assert_eq!(raw.len(), 9, "{raw:?}");
    for r in &raw {
        let got: Value = serde_json::from_str(&r[2]).unwrap_or(Value::Null);
        assert_eq!(
            (&*r[1], got),
            ("true", json!({"g": "infinity", "h": "0044-03-15 BC"})),
            "row {}",
            r[0]
        );
    }
    // Every change in the change log once, with its values under the names of its time.
    assert_eq!(
        lake_rows(
            &lake,
            "SELECT _op, id, coalesce(a, a2, name) AS n, CAST(b AS VARCHAR) AS b \
             FROM s_changes ORDER BY _lsn, _seq"
        )
        .await,
        [
            ["r", "1", "one", "10"],
            ["r", "2", "two", "20"],
            ["c", "3", "three", "30"],
            ["c", "4", "four", "40"],
            ["c", "5", "five", "50"],
            ["u", "1", "one", "11"],
            ["c", "6", "six", "NULL"],
            ["c", "7", "seven", "NULL"],
            ["c", "9", "nine", "NULL"],
            ["u", "2", "two", "NULL"],
            ["c", "8", "eight", "NULL"],
        ]
        .map(|r| r.map(String::from).to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn types_created_while_streaming_are_known_without_a_restart() {
    let db = TestDb::new("newtypes");
    db.sql("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);");
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["t"], &lake);
    let (stop, rx) = tokio::sync::watch::channel(false);
    let mut pipeline = tokio::spawn({
        let cfg = cfg.clone();
        async move { weir::pipeline::run(&cfg, weir::pipeline::RunOptions::default(), rx).await }
    });
    let rows = |sql: &'static str| {
        let lake = lake.clone();
        async move {
            for _ in 0..300 {
                if lake.join("t").join("_delta_log").exists() {
                    let q = lake_query(&lake, "weir").await;
                    if let Ok(b) = q.sql(sql).await {
                        let rows = batches_to_rows(&b);
                        if !rows.is_empty() {
                            return rows;
                        }
                    }
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            panic!("the lake never answered {sql}");
        }
    };
    rows("SELECT id FROM t").await;
    // (A column of a domain with constraints makes PostgreSQL rewrite the table; without
    // a default its older rows are NULL, as in the replica: nothing is copied again.)
    db.sql(
        "CREATE TYPE level AS ENUM ('low', 'high'); CREATE DOMAIN cents AS bigint CHECK (VALUE >= 0); \
         CREATE DOMAIN levels AS level[]; \
         ALTER TABLE t ADD COLUMN lv level, ADD COLUMN amount cents, ADD COLUMN lvs levels; \
         INSERT INTO t VALUES (2, 'high', 1250, '{low,high}');",
    );
    let got = tokio::select! {
        got = rows(
            "SELECT lv, arrow_typeof(amount), CAST(amount + 1 AS VARCHAR) AS a, arrow_typeof(lvs), \
               array_length(lvs, 1) AS n FROM t WHERE id = 2",
        ) => got,
        ended = &mut pipeline => panic!("the pipeline ended: {ended:?}"),
    };
    stop.send(true).unwrap();
    pipeline.await.unwrap().expect("pipeline stopped cleanly");
    assert_eq!(got[0][0], "high");
    assert_eq!(
        got[0][1], "Int64",
        "a domain over bigint is a bigint column: {got:?}"
    );
    assert_eq!(got[0][2], "1251");
    assert!(
        got[0][3].starts_with("List"),
        "an array of an enum is a list: {got:?}"
    );
    assert_eq!(got[0][4], "2");
}

/// json and jsonb values land as their JSON text: a JSON string keeps its quotes, so that
/// `"123"` (a string) and `123` (a number) stay apart, through the backfill, the stream and
/// the default of an added column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_values_keep_their_kind_and_a_json_string_is_not_a_number() {
    let db = TestDb::new("jsonkinds");
    let rows = |first: i32| {
        format!(
            r#"INSERT INTO j VALUES ({first}, '"123"', '"123"'), ({}, '123', '123'),
                 ({}, '{{"a": "b", "n": [1, "2"]}}', '{{"a":  "b"}}'),
                 ({}, '"say \"hi\""', '"x"'), ({}, NULL, '[]');"#,
            first + 1,
            first + 2,
            first + 3,
            first + 4
        )
    };
    db.sql(&format!(
        "CREATE TABLE j (id int PRIMARY KEY, b jsonb, t json); {}",
        rows(1)
    ));
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["j"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(&rows(11));
    db.sql(r#"ALTER TABLE j ADD COLUMN d jsonb DEFAULT '"on"'; INSERT INTO j (id) VALUES (21);"#);
    run_until_now(&db, &cfg).await;

    let client = db.client().await;
    let pg = pg_rows(
        &client,
        "SELECT id::text, b::text, t::text, d::text FROM j ORDER BY j.id",
    )
    .await;
    let delta = lake_rows(
        &lake,
        "SELECT CAST(id AS VARCHAR) AS k, b, t, d FROM j ORDER BY id",
    )
    .await;
    assert_eq!(pg.len(), 11, "{pg:?}");
    assert_eq!(pg.len(), delta.len(), "{delta:?}");
    let parse = |s: &str| -> Option<Value> {
        (s != "NULL")
            .then(|| serde_json::from_str(s).unwrap_or_else(|e| panic!("{s:?} is not JSON: {e}")))
    };
    for (p, d) in pg.iter().zip(&delta) {
        assert_eq!(p[0], d[0]);
        for c in 1..4 {
            assert_eq!(parse(&p[c]), parse(&d[c]), "row {}: column {c}", p[0]);
        }
    }
    assert_eq!(delta[0][1], r#""123""#);
    assert_eq!(delta[1][1], "123");
}

/// JSON text without the whitespace between tokens.
fn compact(text: &str) -> String {
    let (mut out, mut in_string, mut escaped) = (String::new(), false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

/// json/jsonb numbers keep their exact digits (more than an f64 holds, trailing zeros,
/// beyond an f64's range) and a JSON `null` is not an SQL NULL, in the backfill and the
/// stream, in a keyed replica and in a multiset one (REPLICA IDENTITY FULL, where the old
/// row's values find the row).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_numbers_keep_their_exact_digits() {
    let db = TestDb::new("jsondigits");
    let rows = |first: i32| {
        format!(
            r#"INSERT INTO j VALUES
                 ({first}, '{{"amount": 12345678901234567890.123456789, "n": 1}}', '{{"x": 1.10, "x": 2}}'),
                 ({}, '[1.50, 2.0, 0.1, 1e400]', '123456789012345678901234567890'),
                 ({}, '{{"a": [1, 2], "s": "1.50"}}', '-0'), ({}, 'null', NULL);
               INSERT INTO f VALUES ('{{"v": 0.30000000000000000001}}'), ('{{"v": 0.30000000000000000001}}'),
                 ('{{"v": 0.3}}');
               UPDATE j SET a = ARRAY['12345678901234567890.5', NULL, '{{"x": 1.50}}', '[2, 3.0]']::jsonb[]
                 WHERE id = {first};
               UPDATE j SET a = ARRAY['1', '"s"']::jsonb[] WHERE id = {};"#,
            first + 1,
            first + 2,
            first + 3,
            first + 2,
        )
    };
    db.sql(&format!(
        "CREATE TABLE j (id int PRIMARY KEY, b jsonb, t json, a jsonb[]);
         CREATE TABLE f (b jsonb); ALTER TABLE f REPLICA IDENTITY FULL; {}",
        rows(1)
    ));
    let dir = tempfile::tempdir().unwrap();
    let lake = dir.path().join("lake");
    let cfg = config(&db, &["j", "f"], &lake);
    run_until_now(&db, &cfg).await;
    db.sql(&rows(11));
    // The rows from before an added column have its default, digit for digit.
    db.sql(
        r#"ALTER TABLE j ADD COLUMN d jsonb DEFAULT '{"big": 123456789012345678901234567890}';"#,
    );
    // One of the twins changes, then the other goes; the near-twin stays.
    db.sql(
        r#"UPDATE f SET b = '{"v": 0.30000000000000000002}'
             WHERE ctid = (SELECT min(ctid) FROM f WHERE b = '{"v": 0.30000000000000000001}');
           DELETE FROM f WHERE ctid = (SELECT min(ctid) FROM f WHERE b = '{"v": 0.30000000000000000001}');
           UPDATE j SET b = '{"amount": 99999999999999999999.99}' WHERE id = 2;"#,
    );
    run_until_now(&db, &cfg).await;

    let client = db.client().await;
    let pg = pg_rows(
        &client,
        "SELECT id::text, b::text, t::text, a[1]::text, a[2]::text, a[3]::text, a[4]::text, \
           d::text FROM j ORDER BY j.id",
    )
    .await;
    let delta = lake_rows(
        &lake,
        "SELECT CAST(id AS VARCHAR) AS k, b, t, a[1] AS a1, a[2] AS a2, a[3] AS a3, a[4] AS a4, d \
         FROM j ORDER BY id",
    )
    .await;
    assert!(
        pg[0][1..]
            .iter()
            .any(|v| v.contains("12345678901234567890.5"))
            && pg[0][7].contains("123456789012345678901234567890"),
        "{pg:?}"
    );
    assert_eq!(pg.len(), 8, "{pg:?}");
    assert_eq!(
        (&*pg[3][1], &*pg[3][2]),
        ("null", "NULL"),
        "a JSON null, an SQL NULL"
    );
    let pg: Vec<Vec<String>> = pg
        .iter()
        .map(|r| r.iter().map(|v| compact(v)).collect())
        .collect();
    assert_same_rows(&pg, &delta, "j, exactly as PostgreSQL writes it");
    assert!(
        delta[1][1].contains("99999999999999999999.99") && delta[2][1].contains("1.50"),
        "{delta:?}"
    );
    let mut pg: Vec<String> = pg_rows(&client, "SELECT b::text FROM f")
        .await
        .iter()
        .map(|r| compact(&r[0]))
        .collect();
    pg.sort();
    let mut delta: Vec<String> = lake_rows(&lake, "SELECT b FROM f")
        .await
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect();
    delta.sort();
    assert_eq!(pg.len(), 5, "{pg:?}");
    assert_eq!(delta, pg, "f, a multiset equal to the source");
}
