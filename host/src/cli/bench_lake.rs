//! `weir bench lake`: changes from PostgreSQL into Delta tables (replica merge and
//! change-log append), against pg_recvlogical draining the same WAL, and the latency from
//! a PostgreSQL commit to the row being in a Delta commit under a steady load.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use weir::Lsn;
use weir::config::{Config, LakeConfig, SourceConfig, TlsMode};
use weir::local_postgres::LocalPostgres;
use weir::pipeline::{RunOptions, RunStats};

const SCHEMA: &str = "CREATE TABLE transactions (transaction_id bigserial PRIMARY KEY, \
    user_id int NOT NULL, transaction_date timestamptz NOT NULL, amount numeric(12,2) NOT NULL); \
    CREATE PUBLICATION weir FOR TABLE transactions;";

fn config(pg: &LocalPostgres, slot: &str, lake: &Path, delay: &str) -> Config {
    let mut source = SourceConfig::new(pg.url("bench"), vec!["public.transactions".into()]);
    source.password_file = Some(pg.password_file());
    source.tls = TlsMode::Disable;
    source.slot = slot.into();
    Config {
        source,
        lake: LakeConfig {
            url: lake.display().to_string(),
            update_delay: delay.into(),
            change_log: true,
            ..LakeConfig::default()
        },
        plugins: Vec::new(),
        dashboard: None,
    }
}

async fn run_until(cfg: &Config, until: Option<Lsn>, record_latency: bool) -> Result<RunStats> {
    let (_stop, rx) = tokio::sync::watch::channel(false);
    Ok(weir::pipeline::run(
        cfg,
        RunOptions {
            stop_at: until,
            record_latency,
            ..RunOptions::default()
        },
        rx,
    )
    .await?)
}

pub(super) fn now_lsn(pg: &LocalPostgres) -> Result<Lsn> {
    pg.psql("bench", "SELECT pg_current_wal_insert_lsn()")?
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn rate(rows: u64, d: Duration) -> f64 {
    rows as f64 / d.as_secs_f64().max(1e-9)
}

/// Throughput of `rows` changes in `transactions` transactions, at update delay 0 and 1 s,
/// and (with `s3`: lake URL and endpoint) at delay 0 into an S3 lake.
pub async fn throughput(
    rows: u64,
    transactions: u64,
    s3: Option<(String, Option<String>)>,
) -> Result<()> {
    weir::source::install_crypto_provider();
    let pg = tokio::task::spawn_blocking(LocalPostgres::start).await??;
    pg.create_database("bench")?;
    pg.psql("bench", SCHEMA)?;
    pg.psql(
        "bench",
        "SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')",
    )?;
    let work = tempfile::tempdir()?;
    let mut configs = vec![
        (
            config(&pg, "bench_d0", &work.path().join("lake0"), "0s"),
            "update delay 0s",
        ),
        (
            config(&pg, "bench_d1", &work.path().join("lake1"), "1s"),
            "update delay 1s",
        ),
    ];
    if let Some((url, endpoint)) = s3 {
        let mut cfg = config(&pg, "bench_s3", &work.path().join("unused"), "0s");
        // A fresh prefix per run: the bench's slots and tables start empty.
        cfg.lake.url = format!("{}/bench-{}", url.trim_end_matches('/'), std::process::id());
        if let Some(e) = endpoint {
            let storage = &mut cfg.lake.storage.0;
            if e.starts_with("http://") {
                storage.insert("aws_allow_http".into(), "true".into());
            }
            storage.insert("aws_endpoint".into(), e);
            if std::env::var_os("AWS_REGION").is_none() {
                storage.insert("aws_region".into(), "us-east-1".into());
            }
        }
        configs.push((cfg, "update delay 0s, lake on S3"));
    }
    // Slots, (empty) backfills and tables before the workload.
    for (cfg, _) in &configs {
        let until = now_lsn(&pg)?;
        run_until(cfg, Some(until), false).await?;
    }
    eprintln!("inserting {rows} rows in {transactions} transactions...");
    let per = rows / transactions;
    for i in 0..transactions {
        let n = if i + 1 == transactions {
            rows - per * (transactions - 1)
        } else {
            per
        };
        pg.psql(
            "bench",
            &format!(
                "INSERT INTO transactions (user_id, transaction_date, amount) \
                 SELECT 1 + g % 1000, now() - g * interval '1 second', (g % 50000) / 100.0 \
                 FROM generate_series(1, {n}) g"
            ),
        )?;
    }
    let until = now_lsn(&pg)?;

    let started = Instant::now();
    let mut recv = super::bench::pg_recvlogical(&pg, &until.to_string());
    recv.stdout(Stdio::null());
    let status = tokio::task::spawn_blocking(move || recv.status()).await??;
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    let baseline = started.elapsed();
    println!(
        "pg_recvlogical (baseline, same WAL): {rows} changes in {:.2} s = {:.0} changes/s",
        baseline.as_secs_f64(),
        rate(rows, baseline)
    );
    let mut local_replica_rate = None;
    for (cfg, label) in &configs {
        let started = Instant::now();
        let stats = run_until(cfg, Some(until), false).await?;
        let wall = started.elapsed();
        let s = &stats.sink;
        let replica_rate = rate(s.replica_rows, s.replica_time);
        let vs_local = match local_replica_rate {
            Some(local) if cfg.lake.url.contains("://") => {
                format!(" (replica {:.2}x the local folder)", replica_rate / local)
            }
            _ => String::new(),
        };
        local_replica_rate.get_or_insert(replica_rate);
        println!(
            "weir, {label}: {} changes in {:.2} s = {:.0} changes/s ({:.2}x pg_recvlogical); \
             replica merge {:.0} rows/s{vs_local}, change log append {:.0} rows/s; {} Delta commits ({:.1}/s)",
            stats.changes,
            wall.as_secs_f64(),
            rate(stats.changes, wall),
            rate(stats.changes, wall) / rate(rows, baseline),
            replica_rate,
            rate(s.log_rows, s.log_time),
            s.commits,
            s.commits as f64 / wall.as_secs_f64()
        );
    }
    Ok(())
}

/// Inserts single-row transactions into `transactions` at `rate_per_s` for `seconds`
/// from a few connections; `row(i)` gives the i-th row's user and amount. Returns how
/// many were written.
pub(super) async fn steady_inserts(
    url: &str,
    rate_per_s: u64,
    seconds: u64,
    row: fn(i32) -> (i32, f64),
) -> Result<u64> {
    let writers = 4u64;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(seconds);
    for w in 0..writers {
        let url = url.to_string();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
            tokio::spawn(conn);
            let stmt = client
                .prepare(
                    "INSERT INTO transactions (user_id, transaction_date, amount) \
                     VALUES ($1, now(), $2::float8::numeric(12,2))",
                )
                .await?;
            let interval = Duration::from_secs_f64(writers as f64 / rate_per_s as f64);
            let mut next = tokio::time::Instant::now();
            let mut i = w as i32;
            while Instant::now() < deadline {
                let (user, amount) = row(i);
                client.execute(&stmt, &[&user, &amount]).await?;
                done.fetch_add(1, Ordering::Relaxed);
                i += writers as i32;
                next += interval;
                tokio::time::sleep_until(next).await;
            }
            Ok::<_, tokio_postgres::Error>(())
        }));
    }
    for t in tasks {
        t.await?.context("writer")?;
    }
    Ok(done.load(Ordering::Relaxed))
}

/// Commit-to-Delta latency with `rate` single-row transactions per second for `seconds`.
pub async fn latency(rate_per_s: u64, seconds: u64) -> Result<()> {
    weir::source::install_crypto_provider();
    let pg = tokio::task::spawn_blocking(|| {
        LocalPostgres::start_with(weir::local_postgres::SYNCHRONOUS_COMMIT)
    })
    .await??;
    pg.create_database("bench")?;
    pg.psql("bench", SCHEMA)?;
    let work = tempfile::tempdir()?;
    let cfg = config(&pg, "bench_latency", &work.path().join("lake"), "0s");
    run_until(&cfg, Some(now_lsn(&pg)?), false).await?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pipeline = {
        let cfg = cfg.clone();
        tokio::spawn(async move {
            weir::pipeline::run(
                &cfg,
                RunOptions {
                    record_latency: true,
                    ..RunOptions::default()
                },
                stop_rx,
            )
            .await
        })
    };
    // Writers: a few connections, each pacing single-row transactions.
    let written = steady_inserts(&pg.url_with_password("bench"), rate_per_s, seconds, |i| {
        (i, 12.34)
    })
    .await?;
    // Let the pipeline catch up, then stop it.
    let until = now_lsn(&pg)?;
    let caught_up = Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed = pg.psql(
            "bench",
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'bench_latency'",
        )?;
        if confirmed.trim().parse::<Lsn>().is_ok_and(|c| c >= until) || Instant::now() > caught_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let stats = pipeline.await??;
    let mut lat = stats.latencies_ms.clone();
    if lat.is_empty() {
        bail!("no latency recorded");
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let mut cap = stats.capture_latencies_ms.clone();
    cap.sort_unstable();
    if !cap.is_empty() {
        let c = |p: f64| cap[((cap.len() as f64 * p) as usize).min(cap.len() - 1)];
        println!(
            "PostgreSQL commit -> change handed over by the capture: p50 {} ms, p99 {} ms",
            c(0.5),
            c(0.99)
        );
    }
    println!(
        "{written} single-row transactions in {seconds} s ({:.0} tx/s offered {rate_per_s}); \
         PostgreSQL commit -> Delta commit: p50 {} ms, p99 {} ms, max {} ms (target p99 <= 1000 ms); \
         {} Delta commits",
        written as f64 / seconds as f64,
        pct(0.50),
        pct(0.99),
        lat[lat.len() - 1],
        stats.sink.commits
    );
    Ok(())
}
