//! `weir bench`: figures measured against a baseline in the same run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};
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
        /// Repetitions (each on a fresh cluster); the median ratio is reported.
        #[arg(long, default_value_t = 3)]
        runs: u32,
    },
    /// Changes into Delta tables against pg_recvlogical, and commit-to-Delta latency.
    Lake {
        /// Rows to insert into `transactions` for the throughput run.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Transactions they are spread over.
        #[arg(long, default_value_t = 1000)]
        transactions: u64,
        /// Single-row transactions per second for the latency run.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Length of the latency run, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Also write the throughput workload into this S3 lake (`s3://bucket/prefix`, the
        /// bucket must exist; credentials from the AWS environment variables) and compare
        /// it with the local folder.
        #[arg(long)]
        s3_lake: Option<String>,
        /// Endpoint of an S3-compatible server for `--s3-lake` (default: AWS).
        #[arg(long, requires = "s3_lake")]
        s3_endpoint: Option<String>,
        /// Skip the latency run.
        #[arg(long)]
        no_latency: bool,
    },
    /// PostgreSQL through the fraud rule into Delta against pg_recvlogical; latency to the
    /// alert; peak memory over one large transaction.
    E2e {
        /// Rows to insert into `transactions` for the throughput run.
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        /// Transactions they are spread over.
        #[arg(long, default_value_t = 1000)]
        transactions: u64,
        /// Throughput rounds, each a fresh workload drained by both in alternating order;
        /// the median ratio is the result.
        #[arg(long, default_value_t = 3)]
        runs: u32,
        /// Single-row transactions per second for the latency run.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Length of the latency run, seconds.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Rows of the one large transaction (0: skip).
        #[arg(long, default_value_t = 5_000_000)]
        big_rows: u64,
        /// `lake.part_rows` for `weir run` (default: the configuration's default).
        #[arg(long)]
        part_rows: Option<usize>,
    },
    /// The initial copy of one large table into Delta against `COPY ... TO STDOUT` of it,
    /// over 1, 2 and 4 connections.
    Backfill {
        /// Rows of the table.
        #[arg(long, default_value_t = 10_000_000)]
        rows: u64,
        /// Numbers of copying connections to measure (`source.backfill_connections`).
        #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
        connections: Vec<usize>,
        /// Rounds per number of connections, alternating who reads first; the median
        /// ratio is reported.
        #[arg(long, default_value_t = 1)]
        runs: u32,
    },
    /// The fraud rule as WebAssembly against the same rule compiled into weir.
    Plugin {
        /// Documents to score.
        #[arg(long, default_value_t = 1_000_000)]
        docs: usize,
        /// The fraud rule component (default: the one built with weir).
        #[arg(long)]
        wasm: Option<std::path::PathBuf>,
    },
}

pub async fn run(which: BenchCommand) -> Result<std::process::ExitCode> {
    match which {
        BenchCommand::Lake {
            rows,
            transactions,
            rate,
            seconds,
            s3_lake,
            s3_endpoint,
            no_latency,
        } => {
            let s3 = s3_lake.map(|url| (url, s3_endpoint));
            super::bench_lake::throughput(rows, transactions.max(1), s3).await?;
            if !no_latency {
                super::bench_lake::latency(rate.max(1), seconds.max(1)).await?;
            }
        }
        BenchCommand::E2e {
            rows,
            transactions,
            runs,
            rate,
            seconds,
            big_rows,
            part_rows,
        } => {
            tokio::task::spawn_blocking(move || {
                super::bench_e2e::run(
                    rows,
                    transactions.max(1),
                    runs.max(1),
                    rate.max(1),
                    seconds.max(1),
                    big_rows,
                    part_rows,
                )
            })
            .await??;
        }
        BenchCommand::Backfill {
            rows,
            connections,
            runs,
        } => {
            tokio::task::spawn_blocking(move || {
                super::bench_backfill::run(rows.max(1), &connections, runs.max(1))
            })
            .await??;
        }
        BenchCommand::Plugin { docs, wasm } => {
            let wasm = wasm.unwrap_or_else(|| {
                std::path::PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("fraud_rule.wasm")
            });
            tokio::task::spawn_blocking(move || super::bench_plugin::run(docs, &wasm)).await??
        }
        BenchCommand::Capture {
            rows,
            transactions,
            runs,
        } => {
            tokio::task::spawn_blocking(move || -> Result<()> {
                let mut ratios = Vec::new();
                for run in 1..=runs.max(1) {
                    println!("run {run}:");
                    // Alternate who drains first, so that neither always meets the
                    // colder caches.
                    ratios.push(capture(rows, transactions.max(1), run % 2 == 0)?);
                }
                ratios.sort_by(f64::total_cmp);
                println!(
                    "median ratio weir / pg_recvlogical over {} runs: {:.2}x (target >= 1.5x)",
                    ratios.len(),
                    ratios[ratios.len() / 2]
                );
                Ok(())
            })
            .await??
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

pub(super) struct Measured {
    pub(super) seconds: f64,
    pub(super) max_rss_kib: i64,
    /// CPU seconds of the server process that decoded the WAL for this client.
    pub(super) walsender_cpu: f64,
    /// CPU seconds (user + system) of the measured process itself.
    pub(super) cpu: f64,
}

/// CPU seconds (user + system) of every live walsender process, by PID.
fn walsender_cpu() -> std::collections::HashMap<u32, f64> {
    let mut out = std::collections::HashMap::new();
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains("walsender") {
            continue;
        }
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // Fields after the command name (which may hold spaces) start after ") ".
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let (Some(u), Some(s)) = (fields.get(11), fields.get(12)) {
            let ticks = u.parse::<f64>().unwrap_or(0.0) + s.parse::<f64>().unwrap_or(0.0);
            out.insert(pid, ticks / tick);
        }
    }
    out
}

/// Runs a command to completion, measuring wall time, its peak RSS (from wait4) and the
/// CPU time of the walsender serving it (sampled from /proc while it runs).
/// The baseline of the benchmarks: `pg_recvlogical` draining slot `bench_recvlogical`
/// (pgoutput, publication `weir`) up to `until`, into `/dev/null`.
pub(super) fn pg_recvlogical(pg: &LocalPostgres, until: &str) -> Command {
    let mut recv = pg.command("pg_recvlogical");
    recv.args([
        "-h",
        "127.0.0.1",
        "-p",
        &pg.port().to_string(),
        "-U",
        "postgres",
    ])
    .args(["-d", "bench", "--slot", "bench_recvlogical", "--start"])
    .args(["-o", "proto_version=1", "-o", "publication_names=weir"])
    .args(["-E", until, "-f", "/dev/null", "--no-loop"])
    .env("PGPASSWORD", weir::local_postgres::SUPERUSER_PASSWORD);
    recv
}

pub(super) fn measure(mut cmd: Command) -> Result<Measured> {
    let before: std::collections::HashSet<u32> = walsender_cpu().into_keys().collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen: std::collections::HashMap<u32, f64> = std::collections::HashMap::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                for (pid, cpu) in walsender_cpu() {
                    if !before.contains(&pid) {
                        seen.insert(pid, cpu);
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            seen.values().sum::<f64>()
        })
    };
    let start = Instant::now();
    let child = cmd
        .stdout(Stdio::null())
        .spawn()
        .context("starting the measured process")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: zeroed rusage is a valid value; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = start.elapsed().as_secs_f64();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let walsender_cpu = sampler.join().unwrap_or(0.0);
    if rc != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("measured process failed (status {status})");
    }
    std::mem::forget(child);
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        seconds,
        max_rss_kib: usage.ru_maxrss,
        walsender_cpu,
        cpu: secs(usage.ru_utime) + secs(usage.ru_stime),
    })
}

/// One measurement on a fresh cluster; returns the throughput ratio.
fn capture(rows: u64, transactions: u64, weir_first: bool) -> Result<f64> {
    weir::source::install_crypto_provider();
    eprintln!("starting a private PostgreSQL...");
    let pg = LocalPostgres::start()?;
    pg.create_database("bench")?;
    pg.psql(
        "bench",
        "CREATE TABLE transactions (transaction_id bigserial PRIMARY KEY, user_id int NOT NULL, \
         transaction_date timestamptz NOT NULL, amount numeric(12,2) NOT NULL); \
         CREATE PUBLICATION weir FOR TABLE transactions;",
    )?;
    pg.psql(
        "bench",
        "SELECT pg_create_logical_replication_slot('bench_recvlogical', 'pgoutput')",
    )?;
    // The output goes to memory when it can (pg_recvlogical writes to /dev/null): the
    // figure is the capture's, not the disk's.
    let work = match tempfile::tempdir_in("/dev/shm") {
        Ok(dir) => dir,
        Err(_) => tempfile::tempdir()?,
    };
    let out = work.path().join("changes.jsonl");
    let exe = std::env::current_exe()?;
    let weir_cmd = |until: Option<&str>| {
        let mut c = Command::new(&exe);
        c.args([
            "capture",
            "--url",
            &pg.url("bench"),
            "--tables",
            "public.transactions",
        ])
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
        let n = if t == transactions - 1 {
            rows - per * t
        } else {
            per
        };
        pg.psql(
            "bench",
            &format!(
                "INSERT INTO transactions (user_id, transaction_date, amount) \
                 SELECT 1 + i % 1000, now(), (i % 50000) / 100.0 FROM generate_series(1, {n}) i"
            ),
        )?;
    }
    let end = pg.psql("bench", "SELECT pg_current_wal_insert_lsn()")?;

    let recv = pg_recvlogical(&pg, &end);
    let drain_weir = || {
        eprintln!("draining with weir capture...");
        measure(weir_cmd(Some(&end)))
    };
    let (baseline, ours) = if weir_first {
        let ours = drain_weir()?;
        eprintln!("draining with pg_recvlogical...");
        (measure(recv)?, ours)
    } else {
        eprintln!("draining with pg_recvlogical...");
        let baseline = measure(recv)?;
        (baseline, drain_weir()?)
    };
    // Counted as a stream: the benchmark process stays small, which matters because a
    // child's peak RSS (wait4) starts from the parent's at spawn time.
    let captured = {
        use std::io::BufRead;
        std::io::BufReader::new(std::fs::File::open(&out)?)
            .lines()
            .count() as u64
    };
    std::fs::remove_file(&out)?;
    if captured != rows {
        bail!("weir captured {captured} rows, expected {rows}");
    }

    let base_rate = rows as f64 / baseline.seconds;
    let our_rate = rows as f64 / ours.seconds;
    println!(
        "capture benchmark: {rows} rows in {transactions} transactions, pgoutput protocol 1, {} drained first",
        if weir_first { "weir" } else { "pg_recvlogical" }
    );
    for (name, m, rate) in [
        ("pg_recvlogical -> /dev/null ", &baseline, base_rate),
        ("weir capture   -> JSON lines", &ours, our_rate),
    ] {
        println!(
            "  {name}: {:>6.2} s {:>9.0} rows/s  peak RSS {:>6} KiB  own CPU {:>5.2} s  walsender CPU {:>5.2} s ({:.0}% of wall)",
            m.seconds,
            rate,
            m.max_rss_kib,
            m.cpu,
            m.walsender_cpu,
            100.0 * m.walsender_cpu / m.seconds
        );
    }
    println!(
        "  ratio weir / pg_recvlogical: {:.2}x",
        our_rate / base_rate
    );
    Ok(our_rate / base_rate)
}

fn checkpoint_done(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| !v["position"].is_null())
}
