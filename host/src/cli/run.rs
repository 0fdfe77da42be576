//! `weir run`: the pipeline from a configuration file, until Ctrl-C / SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use weir::Lsn;
use weir::config::Config;
use weir::pipeline::{self, RunOptions};
use weir::telemetry::Telemetry;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// TOML configuration file (`[source]`, `[lake]`).
    #[arg(long, short)]
    config: PathBuf,
    /// Stop once every transaction that committed before this LSN is in the lake.
    #[arg(long)]
    until: Option<Lsn>,
    /// Start over: drop the replication slot and backfill every table again (replicas
    /// are rebuilt; change logs keep their history). For a slot that another consumer
    /// advanced, or any lake that no longer matches its slot.
    #[arg(long)]
    start_over: bool,
}

pub async fn run(args: RunArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let stats = run_config(&config, args.until, args.start_over).await?;
    eprintln!(
        "stopped: {} changes in {} commits{}",
        stats.changes,
        stats.batches,
        stats
            .position
            .map(|p| format!(", acknowledged up to {p}"))
            .unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// Runs the pipeline until a signal (or `until`), stopping in order on SIGINT/SIGTERM.
pub async fn run_config(
    config: &Config,
    until: Option<Lsn>,
    start_over: bool,
) -> Result<pipeline::RunStats> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let signals = tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        tracing::info!("stopping: committing what is in flight");
        let _ = stop_tx.send(true);
        // Keep the sender alive until the pipeline is done.
        std::future::pending::<()>().await;
    });
    // The dashboard, when configured: bound first, so a busy port stops us before the
    // pipeline starts; stopped after the pipeline.
    let (server_stop_tx, server_stop_rx) = tokio::sync::watch::channel(false);
    let telemetry = Arc::new(Telemetry::new());
    let server = match &config.dashboard {
        Some(dash) => {
            Some(super::serve::start(&config.lake, dash, telemetry.clone(), server_stop_rx).await?)
        }
        None => None,
    };
    let opts = RunOptions {
        stop_at: until,
        crash_after_commits: std::env::var("WEIR_CRASH_AFTER_COMMITS")
            .ok()
            .and_then(|v| v.parse().ok()),
        crash_after_parts: std::env::var("WEIR_CRASH_AFTER_PARTS")
            .ok()
            .and_then(|v| v.parse().ok()),
        record_latency: false,
        status_line: std::io::IsTerminal::is_terminal(&std::io::stderr()),
        telemetry: Some(telemetry),
        start_over,
        ..RunOptions::default()
    };
    let result = pipeline::run_with_retries(config, opts, stop_rx).await;
    signals.abort();
    let _ = server_stop_tx.send(true);
    if let Some(server) = server {
        let _ = server.await;
    }
    Ok(result?)
}
