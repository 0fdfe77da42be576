//! `weir bench`: figures measured against a baseline in the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use weir::local_postgres::LocalPostgres;
use weir::sink::jsonl::checkpoint_path;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Capture throughput against pg_recvlogical draining the same workload.
    Capture {
        /// Rows to insert into `transactions`.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Transactions they are spread over.
        #[arg(long, default_value_t = 10)]
        transactions: u64,
    },
}

pub async fn run(which: BenchCommand) -> Result<std::process::ExitCode> {
    match which {
        BenchCommand::Capture { rows, transactions } => {
            tokio::task::spawn_blocking(move || capture(rows, transactions.max(1))).await??
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

struct Measured {
    seconds: f64,
    max_rss_kib: i64,
}

/// Runs a command to completion, measuring wall time and peak RSS (from wait4).
fn measure(mut cmd: Command) -> Result<Measured> {
    let start = Instant::now();
    let child = cmd.stdout(Stdio::null()).spawn().context("starting the measured process")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    if rc != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("measured process failed (status {status})");
    }
    std::mem::forget(child);
    Ok(Measured {
        seconds,
        max_rss_kib: usage.ru_maxrss,
    })
}

fn capture(rows: u64, transactions: u64) -> Result<()> {
    weir::source::install_crypto_provider();
    eprintln!("starting a private PostgreSQL...");
    let pg = LocalPostgres::start()?;
    pg.create_database("bench")?;
    pg.psql(
        "bench",
        "CREATE TABLE transactions (transaction_id bigserial PRIMARY KEY, user_id int NOT NULL, \
         transaction_date timestamptz NOT NULL, amount numeric(12,2) NOT NULL); \
         CREATE PUBLICATION weir FOR TABLE transactions; \
         SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput');",
    )?;
    let work = tempfile::tempdir()?;
    let out = work.path().join("changes.jsonl");
    let exe = std::env::current_exe()?;
    let weir_cmd = |until: Option<&str>| {
        let mut c = Command::new(&exe);
        c.args(["capture", "--url", &pg.url("bench"), "--tables", "public.transactions"])
            .args(["--slot", "bench_weir", "--out"])
            .arg(&out)
            .env("PGPASSWORD", weir::local_postgres::SUPERUSER_PASSWORD)
            .env("WEIR_LOG", "warn");
        if let Some(u) = until {
            c.args(["--until", u]);
        }
        c
    };
    // Create weir's slot (and finish its empty backfill) before the workload.
    let mut setup = weir_cmd(None).stdout(Stdio::null()).spawn()?;
    let cp = checkpoint_path(&out);
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    while !checkpoint_done(&cp) {
        if Instant::now() > deadline {
            let _ = setup.kill();
            bail!("weir capture did not finish its backfill within 60 s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(setup.id() as libc::pid_t, libc::SIGTERM) };
    setup.wait()?;

    eprintln!("inserting {rows} rows in {transactions} transactions...");
    let per = rows / transactions;
    for t in 0..transactions {
        let n = if t == transactions - 1 { rows - per * t } else { per };
        pg.psql(
            "bench",
            &format!(
                "INSERT INTO transactions (user_id, transaction_date, amount) \
                 SELECT 1 + i % 1000, now(), (i % 50000) / 100.0 FROM generate_series(1, {n}) i"
            ),
        )?;
    }
    let end = pg.psql("bench", "SELECT pg_current_wal_insert_lsn()")?;

    eprintln!("draining with pg_recvlogical...");
    let mut recv = pg.command("pg_recvlogical");
    recv.args(["-h", "127.0.0.1", "-p", &pg.port().to_string(), "-U", "postgres", "-d", "bench"])
        .args(["--slot", "bench_recvlogical", "--start", "-o", "proto_version=1"])
        .args(["-o", "publication_names=weir", "-E", &end, "-f", "/dev/null", "--no-loop"])
        .env("PGPASSWORD", weir::local_postgres::SUPERUSER_PASSWORD);
    let baseline = measure(recv)?;

    eprintln!("draining with weir capture...");
    let ours = measure(weir_cmd(Some(&end)))?;
    let captured = std::fs::read_to_string(&out)?.lines().count() as u64;
    if captured != rows {
        bail!("weir captured {captured} rows, expected {rows}");
    }

    let base_rate = rows as f64 / baseline.seconds;
    let our_rate = rows as f64 / ours.seconds;
    println!("capture benchmark: {rows} rows in {transactions} transactions, pgoutput protocol 1");
    println!(
        "  pg_recvlogical -> /dev/null : {:>8.2} s  {:>10.0} rows/s  peak RSS {:>7} KiB",
        baseline.seconds, base_rate, baseline.max_rss_kib
    );
    println!(
        "  weir capture   -> JSON lines: {:>8.2} s  {:>10.0} rows/s  peak RSS {:>7} KiB",
        ours.seconds, our_rate, ours.max_rss_kib
    );
    println!("  ratio weir / pg_recvlogical: {:.2}x (target >= 1.5x)", our_rate / base_rate);
    Ok(())
}

fn checkpoint_done(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| !v["position"].is_null())
}
