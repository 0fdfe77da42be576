//! `weir bench e2e`: PostgreSQL through the fraud rule into Delta (replica and alerts),
//! against pg_recvlogical draining the same WAL; the latency from a PostgreSQL commit to
//! the alert leaving the plugin and to the alert in a Delta commit under a steady load;
//! and the peak memory of `weir run` over one very large transaction.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use weir::Lsn;
use weir::config::{Config, LakeConfig, PluginConfig, SourceConfig, TlsMode};
use weir::local_postgres::LocalPostgres;
use weir::pipeline::RunOptions;

use super::bench::{Measured, measure};
use super::bench_lake::now_lsn;

const USERS: u32 = 1000;

fn fraud_rule() -> PathBuf {
    PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("fraud_rule.wasm")
}

fn config(pg: &LocalPostgres, lake: &Path) -> Config {
    let mut source = SourceConfig::new(
        pg.url("bench"),
        vec!["public.users".into(), "public.transactions".into()],
    );
    source.password_file = Some(pg.password_file());
    source.tls = TlsMode::Disable;
    source.slot = "bench_e2e".into();
    Config {
        source,
        lake: LakeConfig {
            url: lake.display().to_string(),
            ..LakeConfig::default()
        },
        plugins: vec![PluginConfig {
            path: fraud_rule(),
            name: None,
            // datagen gives `transactions` REPLICA IDENTITY FULL.
            config: toml::toml! { before_images = true },
            limits: Default::default(),
        }],
        dashboard: None,
    }
}

/// The same configuration as a file, for `weir run` as a child process.
fn write_config(
    pg: &LocalPostgres,
    lake: &Path,
    dir: &Path,
    part_rows: Option<usize>,
) -> Result<PathBuf> {
    let path = dir.join("weir.toml");
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"public.users\", \"public.transactions\"]\n\
             tls = \"disable\"\nslot = \"bench_e2e\"\n\n[lake]\nurl = \"{}\"\n{}\n[[plugins]]\npath = \"{}\"\n\
             [plugins.config]\nbefore_images = true\n",
            pg.url("bench"),
            pg.password_file().display(),
            lake.display(),
            part_rows
                .map(|n| format!("part_rows = {n}\n"))
                .unwrap_or_default(),
            fraud_rule().display()
        ),
    )?;
    Ok(path)
}

/// Inserts `rows` transactions of the seeded users in `transactions` SQL transactions;
/// about one in a hundred is an anomaly.
fn insert(pg: &LocalPostgres, rows: u64, transactions: u64) -> Result<()> {
    let per = rows / transactions;
    // Numbered across calls, so that users and anomalies vary between transactions.
    static NEXT: AtomicU64 = AtomicU64::new(0);
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
                 SELECT 1 + g % {USERS}, now(), CASE WHEN g % 97 = 0 THEN 5000 ELSE 40 + g % 60 END \
                 FROM generate_series({}, {}) g",
                NEXT.load(Ordering::Relaxed) + 1,
                NEXT.fetch_add(n, Ordering::Relaxed) + n,
            ),
        )?;
    }
    Ok(())
}

fn weir_run(exe: &Path, config: &Path, until: Lsn) -> Command {
    let mut c = Command::new(exe);
    c.args(["run", "--config"])
        .arg(config)
        .args(["--until", &until.to_string()])
        .env("WEIR_LOG", "warn,deltalake_core::operations::merge=error");
    c
}

/// What one throughput round measured.
struct Round {
    baseline: Measured,
    ours: Measured,
}

/// Inserts `rows` in `transactions`, then drains them with pg_recvlogical (from a slot
/// made just before, so it decodes exactly this workload) and with `weir run`.
fn throughput_round(
    pg: &LocalPostgres,
    exe: &Path,
    config_file: &Path,
    rows: u64,
    transactions: u64,
    weir_first: bool,
) -> Result<Round> {
    pg.psql(
        "bench",
        "SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')",
    )?;
    eprintln!("inserting {rows} transactions in {transactions} SQL transactions...");
    insert(pg, rows, transactions)?;
    let until = now_lsn(pg)?;
    let recv = super::bench::pg_recvlogical(pg, &until.to_string());
    let (baseline, ours) = if weir_first {
        let ours = measure(weir_run(exe, config_file, until))?;
        (measure(recv)?, ours)
    } else {
        let baseline = measure(recv)?;
        (baseline, measure(weir_run(exe, config_file, until))?)
    };
    drop_slot(pg, "bench_recvlogical")?;
    Ok(Round { baseline, ours })
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Runs the three measurements.
pub fn run(
    rows: u64,
    transactions: u64,
    runs: u32,
    rate_per_s: u64,
    seconds: u64,
    big_rows: u64,
    part_rows: Option<usize>,
) -> Result<()> {
    weir::source::install_crypto_provider();
    eprintln!("starting a private PostgreSQL...");
    let pg = LocalPostgres::start_with(weir::local_postgres::SYNCHRONOUS_COMMIT)?;
    pg.create_database("bench")?;
    let work = tempfile::tempdir()?;
    let lake = work.path().join("lake");
    let config_file = write_config(&pg, &lake, work.path(), part_rows)?;
    let exe = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let (client, conn) =
            tokio_postgres::connect(&pg.url_with_password("bench"), tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let settings = weir::datagen::Settings {
            users: USERS,
            ..weir::datagen::Settings::default()
        };
        weir::datagen::prepare(&client, &settings).await?;
        anyhow::Ok(())
    })?;

    // 1. Throughput: `runs` rounds, each a fresh workload drained by both, in alternating
    // order (the second reader finds the WAL the first warmed); the median ratio decides.
    // Every round starts as the first does: an empty `transactions`, a new slot and lake.
    // (A slot that `weir run --until` left keeps its restart point up to a third of a
    // workload back, which the next round's walsender would decode again.)
    let mut ratios = Vec::new();
    let mut rss_kib = 0;
    for round in 1..=runs {
        if round > 1 {
            pg.psql("bench", "TRUNCATE transactions")?;
            drop_slot(&pg, "bench_e2e")?;
            std::fs::remove_dir_all(&lake)?;
        }
        // Slot, publication, backfill of the users, tables: before the workload.
        let first = measure(weir_run(&exe, &config_file, now_lsn(&pg)?))?;
        eprintln!("pipeline set up in {:.1} s", first.seconds);
        let r = throughput_round(&pg, &exe, &config_file, rows, transactions, round % 2 == 0)?;
        let (b, w) = (
            rows as f64 / r.baseline.seconds,
            rows as f64 / r.ours.seconds,
        );
        println!(
            "round {round}/{runs}{}: pg_recvlogical (baseline, same WAL) {rows} changes in {:.2} s = \
             {b:.0} changes/s; weir run (capture -> fraud rule -> Delta replica + fraud_alerts, one \
             process start to exit) {:.2} s = {w:.0} changes/s, {:.2}x, peak RSS {} MiB",
            if round % 2 == 0 { ", weir first" } else { "" },
            r.baseline.seconds,
            r.ours.seconds,
            w / b,
            r.ours.max_rss_kib / 1024,
        );
        // CPU is steadier than wall time on a shared machine: compare changes by it too.
        println!(
            "  CPU: weir run {:.2} s ({:.1} us per change), its walsender {:.2} s; pg_recvlogical \
             {:.2} s, its walsender {:.2} s",
            r.ours.cpu,
            1e6 * r.ours.cpu / rows as f64,
            r.ours.walsender_cpu,
            r.baseline.cpu,
            r.baseline.walsender_cpu,
        );
        ratios.push(w / b);
        rss_kib = rss_kib.max(r.ours.max_rss_kib);
    }
    // The last round's workload and lake.
    let alerts = pg.psql(
        "bench",
        "SELECT count(*) FROM transactions WHERE amount = 5000",
    )?;
    let flagged = rt.block_on(flagged_count(&lake))?;
    let (low, high) = (
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
    );
    ratios.sort_by(f64::total_cmp);
    println!(
        "weir run / pg_recvlogical: median {:.2}x over {runs} rounds (range {low:.2}x-{high:.2}x; \
         target >= 1.0x), peak RSS {} MiB; last round: {flagged} anomalies flagged of {} injected",
        ratios[ratios.len() / 2],
        rss_kib / 1024,
        alerts.trim()
    );

    // 2. One large transaction: peak memory.
    if big_rows > 0 {
        eprintln!("one transaction of {big_rows} rows...");
        insert(&pg, big_rows, 1)?;
        let until = now_lsn(&pg)?;
        let big: Measured = measure(weir_run(&exe, &config_file, until))?;
        println!(
            "one {big_rows}-row transaction: {:.1} s ({:.0} changes/s), peak RSS of weir run {} MiB \
             (target <= 256 MiB)",
            big.seconds,
            big_rows as f64 / big.seconds,
            big.max_rss_kib / 1024
        );
    }

    // 3. Latency under a steady load.
    rt.block_on(latency(&pg, &lake, rate_per_s, seconds))
}

async fn flagged_count(lake: &Path) -> Result<i64> {
    let lake = weir::sink::delta::Lake::open(&lake.display().to_string(), false)?;
    let q = weir::query::LakeQuery::open(&lake, "weir", "default").await?;
    // The rule emits anomalies only: no table until the first one.
    if q.table("fraud_alerts").is_none() {
        return Ok(0);
    }
    let rows = q
        .json("SELECT count(*) AS n FROM fraud_alerts WHERE is_anomaly")
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.get("n"))
        .and_then(|v| v.as_i64())
        .unwrap_or(0))
}

fn drop_slot(pg: &LocalPostgres, slot: &str) -> Result<()> {
    pg.psql(
        "bench",
        &format!("SELECT pg_drop_replication_slot('{slot}')"),
    )?;
    Ok(())
}

async fn latency(pg: &LocalPostgres, lake: &Path, rate_per_s: u64, seconds: u64) -> Result<()> {
    let cfg = config(pg, lake);
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
    // Writers start once the pipeline streams (lake opened, plugin state loaded).
    let ready = Instant::now() + Duration::from_secs(300);
    while pg
        .psql(
            "bench",
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'bench_e2e'",
        )?
        .trim()
        != "t"
    {
        if Instant::now() > ready || pipeline.is_finished() {
            bail!("the pipeline did not start streaming");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let written = super::bench_lake::steady_inserts(
        &pg.url_with_password("bench"),
        rate_per_s,
        seconds,
        |i| {
            let amount = if i % 97 == 0 {
                5000.0
            } else {
                40.0 + f64::from(i % 60)
            };
            (1 + i % USERS as i32, amount)
        },
    )
    .await?;
    let until = now_lsn(pg)?;
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let confirmed = pg.psql(
            "bench",
            "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = 'bench_e2e'",
        )?;
        if confirmed.trim().parse::<Lsn>().is_ok_and(|c| c >= until) || Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    let stats = pipeline.await??;
    let mut plugin = stats.plugin_latencies_ms.clone();
    let mut lake_lat = stats.latencies_ms.clone();
    if plugin.is_empty() || lake_lat.is_empty() {
        bail!("no latency recorded");
    }
    plugin.sort_unstable();
    lake_lat.sort_unstable();
    println!(
        "{written} single-row transactions in {seconds} s ({:.0} tx/s offered {rate_per_s}) through \
         the fraud rule: PostgreSQL commit -> alert out of the plugin p50 {} ms, p99 {} ms (target \
         p99 <= 50 ms); -> alert in a Delta commit p50 {} ms, p99 {} ms (target p99 <= 1000 ms); {} Delta commits; \
         time in replica commits {:.1} s, fraud_alerts {:.1} s, plugin state {:.1} s",
        written as f64 / seconds as f64,
        pct(&plugin, 0.5),
        pct(&plugin, 0.99),
        pct(&lake_lat, 0.5),
        pct(&lake_lat, 0.99),
        stats.sink.commits,
        stats.sink.replica_time.as_secs_f64(),
        stats.sink.collection_time.as_secs_f64(),
        stats.sink.state_time.as_secs_f64(),
    );
    Ok(())
}
