//! `weir capture` and the first form of `weir demo`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::signal::unix::{SignalKind, signal};

use weir::Lsn;
use weir::config::{Config, SourceConfig};
use weir::local_postgres::LocalPostgres;
use weir::sink::JsonLinesSink;
use weir::source::{Capture, CaptureEvent, CaptureOptions};

/// Longest time a complete transaction waits in the output buffer before it is made
/// durable and acknowledged, when more events keep coming.
const MAX_FLUSH_DELAY: Duration = Duration::from_millis(200);

#[derive(Debug, Args)]
pub struct CaptureArgs {
    /// TOML configuration file (its `[source]` table).
    #[arg(long, short, required_unless_present = "url")]
    config: Option<PathBuf>,
    /// PostgreSQL URL, instead of a configuration file.
    #[arg(long, conflicts_with = "config", requires = "tables")]
    url: Option<String>,
    /// Tables to capture with --url, comma separated (`public.users,public.transactions`).
    #[arg(long, value_delimiter = ',')]
    tables: Vec<String>,
    /// Replication slot with --url.
    #[arg(long, default_value = weir::config::DEFAULT_SLOT)]
    slot: String,
    /// Publication with --url.
    #[arg(long, default_value = weir::config::DEFAULT_PUBLICATION)]
    publication: String,
    /// Output file (JSON lines); standard output when absent. A checkpoint is kept next
    /// to the file so that a restart continues exactly where it stopped.
    #[arg(long, short)]
    out: Option<PathBuf>,
    /// Stop when the stream reaches this LSN (e.g. `0/16B3748`): every transaction that
    /// committed before it is captured, none after it.
    #[arg(long)]
    until: Option<Lsn>,
}

pub async fn run(args: CaptureArgs) -> Result<ExitCode> {
    let source = match (&args.config, &args.url) {
        (Some(path), _) => Config::load(path)?.source,
        (None, Some(url)) => {
            let mut s = SourceConfig::new(url.clone(), args.tables.clone());
            s.slot = args.slot.clone();
            s.publication = args.publication.clone();
            s
        }
        (None, None) => unreachable!("clap requires --config or --url"),
    };
    capture_to(&source, args.out.as_deref(), args.until).await?;
    Ok(ExitCode::SUCCESS)
}

/// Captures until Ctrl-C / SIGTERM or `until`, then flushes, acknowledges and stops.
pub async fn capture_to(
    source: &SourceConfig,
    out: Option<&Path>,
    until: Option<Lsn>,
) -> Result<()> {
    let (mut sink, resume) = JsonLinesSink::open(out, &source.slot)?;
    // Standard output keeps no position: such a capture runs on a temporary slot of its
    // own, so that it never takes over (and, starting afresh, drops) a pipeline's slot.
    let mut source = source.clone();
    if out.is_none() {
        source.slot = format!("{}_stdout_{}", source.slot, std::process::id());
    }
    let opts = CaptureOptions {
        resume,
        stop_at: until,
        temporary_slot: out.is_none(),
        ..CaptureOptions::default()
    };
    let source = &source;
    let mut capture = Capture::start(source, opts).await?;
    tracing::info!(slot = %source.slot, ?resume, "capturing");
    // Streams made once: a signal that arrives between two polls is kept, not lost.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut progress: Option<ProgressBar> = None;
    let mut last_flush = Instant::now();
    let mut failure = None;
    loop {
        let ev = tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            ev = capture.next() => ev,
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            Ok(None) => break,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        match ev {
            CaptureEvent::BackfillTable {
                table,
                estimated_rows,
                connections,
                ..
            } => {
                if let Some(bar) = progress.take() {
                    bar.finish();
                }
                let bar = ProgressBar::new(estimated_rows.max(1));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{msg:>28} [{bar:30}] {human_pos}/{human_len} rows {per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(match connections {
                    1 => format!("backfill {table}"),
                    n => format!("backfill {table} ({n} connections)"),
                });
                progress = Some(bar);
            }
            CaptureEvent::Change(doc) => {
                sink.write(&doc)?;
                if let Some(bar) = &progress {
                    bar.inc(1);
                }
            }
            CaptureEvent::BackfillDone { position }
            | CaptureEvent::TablesBackfilled { position, .. } => {
                if let Some(bar) = progress.take() {
                    bar.finish();
                }
                sink.end_transaction(position);
                flush(&mut sink, &capture)?;
                last_flush = Instant::now();
                tracing::info!(%position, "backfill complete; streaming");
            }
            // The output records one position, at the end of the backfill.
            CaptureEvent::Schema(_) | CaptureEvent::TableCopied { .. } => {}
            CaptureEvent::Resync { table, lsn, .. } => tracing::warn!(
                %lsn,
                "`weir resync {table}` was asked; `weir capture` copies no table again (the \
                 request is for `weir run`, which reads this slot)"
            ),
            CaptureEvent::Idle { position } => {
                sink.end_transaction(position);
                flush(&mut sink, &capture)?;
                last_flush = Instant::now();
            }
            CaptureEvent::Commit { position, .. } => {
                sink.end_transaction(position);
                if !capture.has_pending() || last_flush.elapsed() >= MAX_FLUSH_DELAY {
                    flush(&mut sink, &capture)?;
                    last_flush = Instant::now();
                }
            }
        }
    }
    if let Some(bar) = progress.take() {
        bar.abandon();
    }
    if let Some(position) = sink.close()? {
        capture.acknowledge(position);
        tracing::info!(%position, "stopped; acknowledged");
    }
    let stopped = capture.shutdown().await;
    match failure {
        Some(e) => Err(e.into()),
        None => stopped.map_err(Into::into),
    }
}

fn flush(sink: &mut JsonLinesSink, capture: &Capture) -> Result<()> {
    if let Some(position) = sink.flush()? {
        capture.acknowledge(position);
    }
    Ok(())
}

/// The dashboard's usual address when free, else any free port on this machine.
fn demo_listen_address() -> String {
    let usual = weir::config::DEFAULT_DASHBOARD_LISTEN;
    if std::net::TcpListener::bind(usual).is_ok() {
        return usual.into();
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.to_string())
        .unwrap_or_else(|_| usual.into())
}

/// Starts a private PostgreSQL with the bank schema, writes a few transactions a second
/// into it (`weir datagen`'s generator), and runs the pipeline with the fraud rule into a
/// lake until Ctrl-C.
pub async fn demo(lake: PathBuf) -> Result<ExitCode> {
    weir::source::install_crypto_provider();
    let pg = tokio::task::spawn_blocking(LocalPostgres::start).await??;
    pg.create_database("bank")?;
    let (client, conn) =
        tokio_postgres::connect(&pg.url_with_password("bank"), tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let settings = weir::datagen::Settings::default();
    weir::datagen::prepare(&client, &settings)
        .await
        .context("creating the demo tables")?;
    // Each demo starts from a fresh database, so it starts from a fresh lake too.
    if lake.join("transactions").join("_delta_log").is_dir() {
        std::fs::remove_dir_all(&lake)
            .with_context(|| format!("clearing the previous demo lake {}", lake.display()))?;
    }
    let mut source = SourceConfig::new(
        pg.url("bank"),
        vec!["public.users".into(), "public.transactions".into()],
    );
    source.password_file = Some(pg.password_file());
    let config = Config {
        source,
        lake: weir::config::LakeConfig {
            url: lake.display().to_string(),
            change_log: true,
            ..weir::config::LakeConfig::default()
        },
        // The fraud rule built with weir.
        plugins: vec![weir::config::PluginConfig {
            path: PathBuf::from(env!("WEIR_PLUGIN_DIR")).join("fraud_rule.wasm"),
            name: None,
            // datagen gives `transactions` REPLICA IDENTITY FULL.
            config: toml::toml! { before_images = true },
            limits: Default::default(),
        }],
        dashboard: Some(weir::config::DashboardConfig {
            listen: demo_listen_address(),
            ..Default::default()
        }),
    };
    eprintln!(
        "private PostgreSQL on port {} (database bank); the lake is {}\n\
         try, in another terminal: weir query --lake {} \"SELECT transaction_id, user_id, amount, user_avg FROM fraud_alerts WHERE is_anomaly\"",
        pg.port(),
        lake.display(),
        lake.display()
    );
    let writer = tokio::spawn(async move {
        if let Err(e) = weir::datagen::run(&client, &settings, std::future::pending()).await {
            tracing::warn!(error = %e, "demo data generator stopped");
        }
    });
    let result = super::run::run_config(&config, None, false).await;
    writer.abort();
    let stats = result?;
    eprintln!(
        "stopped after {} changes; {} holds the Delta tables (weir query --lake {} \"...\")",
        stats.changes,
        lake.display(),
        lake.display()
    );
    Ok(ExitCode::SUCCESS)
}
