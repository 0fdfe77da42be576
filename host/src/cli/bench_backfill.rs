//! `weir bench backfill`: the initial copy of one large table into its Delta replica (no
//! plugin) against `COPY ... TO STDOUT` of the same table into `/dev/null`,
//! at several numbers of copying connections (`source.backfill_connections`).

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use weir::local_postgres::LocalPostgres;

use super::bench::{Measured, measure};
use super::bench_lake::now_lsn;

/// The configuration of `weir run` for one round, as a file.
fn write_config(
    pg: &LocalPostgres,
    lake: &Path,
    dir: &Path,
    connections: usize,
) -> Result<std::path::PathBuf> {
    let path = dir.join(format!("weir-{connections}.toml"));
    std::fs::write(
        &path,
        format!(
            "[source]\nurl = \"{}\"\npassword_file = \"{}\"\ntables = [\"public.transactions\"]\n\
             tls = \"disable\"\nslot = \"bench_backfill\"\nbackfill_connections = {connections}\n\n\
             [lake]\nurl = \"{}\"\n",
            pg.url("bench"),
            pg.password_file().display(),
            lake.display(),
        ),
    )?;
    Ok(path)
}

/// `COPY transactions TO STDOUT` through psql over TCP, like weir's connection, into
/// `/dev/null`.
fn copy_out(pg: &LocalPostgres) -> Command {
    let mut psql = pg.command("psql");
    psql.args(["-X", "-q", "-h", "127.0.0.1", "-p", &pg.port().to_string()])
        .args(["-U", "postgres", "-d", "bench", "-o", "/dev/null"])
        .args(["-c", "COPY transactions TO STDOUT"])
        .env("PGPASSWORD", weir::local_postgres::SUPERUSER_PASSWORD);
    psql
}

/// Rows in the lake's replica.
async fn lake_rows(lake: &Path) -> Result<i64> {
    let lake = weir::sink::delta::Lake::open(&lake.display().to_string(), false)?;
    let q = weir::query::LakeQuery::open(&lake, "weir", "default").await?;
    let rows = q.json("SELECT count(*) AS n FROM transactions").await?;
    Ok(rows
        .first()
        .and_then(|r| r.get("n"))
        .and_then(|v| v.as_i64())
        .unwrap_or(-1))
}

pub fn run(rows: u64, connections: &[usize], runs: u32) -> Result<()> {
    weir::source::install_crypto_provider();
    eprintln!("starting a private PostgreSQL...");
    let pg = LocalPostgres::start()?;
    pg.create_database("bench")?;
    pg.psql(
        "bench",
        "CREATE TABLE transactions (id bigint PRIMARY KEY, user_id int NOT NULL, \
           transaction_date timestamptz NOT NULL, amount numeric(12,2) NOT NULL, note text)",
    )?;
    eprintln!("inserting {rows} rows...");
    let step = 1_000_000;
    let mut first = 1;
    while first <= rows {
        let last = (first + step - 1).min(rows);
        pg.psql(
            "bench",
            &format!(
                "INSERT INTO transactions SELECT g, 1 + g % 1000, \
                   timestamptz '2026-01-01' + g * interval '1 second', (g % 9973) / 7.0, \
                   CASE WHEN g % 3 = 0 THEN 'card ' || (g % 100) END \
                 FROM generate_series({first}, {last}) g"
            ),
        )?;
        first = last + 1;
    }
    pg.psql("bench", "VACUUM ANALYZE transactions")?;
    let size = pg.psql(
        "bench",
        "SELECT pg_size_pretty(pg_table_size('transactions'))",
    )?;
    println!("table: {rows} rows, {size} (id bigint key, int, timestamptz, numeric, text)");
    let work = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let mut summary = Vec::new();
    for &n in connections {
        let mut ratios = Vec::new();
        let mut rss_kib = 0;
        for round in 1..=runs {
            let lake = work.path().join(format!("lake-{n}-{round}"));
            let config = write_config(&pg, &lake, work.path(), n)?;
            let weir = || -> Result<Measured> {
                let mut c = Command::new(&exe);
                c.args(["run", "--config"])
                    .arg(&config)
                    .args(["--until", &now_lsn(&pg)?.to_string()])
                    .env("WEIR_LOG", "warn");
                measure(c)
            };
            // Alternate who reads first, so that neither always meets the colder cache.
            let (baseline, ours) = if round % 2 == 0 {
                let ours = weir()?;
                (measure(copy_out(&pg))?, ours)
            } else {
                let baseline = measure(copy_out(&pg))?;
                (baseline, weir()?)
            };
            let landed = rt.block_on(lake_rows(&lake))?;
            if landed != rows as i64 {
                bail!("the replica holds {landed} rows, not {rows}");
            }
            pg.psql("bench", "SELECT pg_drop_replication_slot('bench_backfill')")?;
            std::fs::remove_dir_all(&lake)?;
            let (b, w) = (rows as f64 / baseline.seconds, rows as f64 / ours.seconds);
            println!(
                "{n} connection(s), round {round}/{runs}: COPY TO STDOUT (psql into /dev/null) \
                 {:.2} s = {b:.0} rows/s; weir run (slot, copy into the Delta replica, one \
                 process start to exit) {:.2} s = {w:.0} rows/s, {:.2}x, peak RSS {} MiB, \
                 CPU {:.1} s",
                baseline.seconds,
                ours.seconds,
                w / b,
                ours.max_rss_kib / 1024,
                ours.cpu,
            );
            ratios.push(w / b);
            rss_kib = rss_kib.max(ours.max_rss_kib);
        }
        ratios.sort_by(f64::total_cmp);
        summary.push((n, ratios[ratios.len() / 2], rss_kib));
    }
    for (n, ratio, rss_kib) in summary {
        println!(
            "backfill with {n} connection(s) / one COPY: median {ratio:.2}x over {runs} round(s) \
             (target >= 0.9x), peak RSS {} MiB (target < 256 MiB)",
            rss_kib / 1024
        );
    }
    Ok(())
}
