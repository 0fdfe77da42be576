//! `weir datagen`: the demo's bank data at a steady rate, with injected anomalies.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use weir::config::{Config, SourceConfig};
use weir::datagen::{self, Settings};
use weir::source::ConnectionSettings;

#[derive(Debug, Args)]
pub struct DatagenArgs {
    /// TOML configuration file: its `[source]` says where to write.
    #[arg(long, short, required_unless_present = "url")]
    config: Option<PathBuf>,
    /// PostgreSQL URL, instead of a configuration file.
    #[arg(long, conflicts_with = "config")]
    url: Option<String>,
    /// Users to create when `users` is empty.
    #[arg(long, default_value_t = 50)]
    users: u32,
    /// Operations (inserts, updates, deletes of transactions) per second.
    #[arg(long, default_value_t = 5.0)]
    rate: f64,
    /// Share of inserts that are injected anomalies (recorded in `weir_ground_truth`).
    #[arg(long, default_value_t = 0.03)]
    anomaly_share: f64,
    /// Stop after this many operations (default: until Ctrl-C).
    #[arg(long)]
    operations: Option<u64>,
    /// Seed: the same seed writes the same data.
    #[arg(long, default_value_t = 42)]
    seed: u64,
}

pub async fn run(args: DatagenArgs) -> Result<ExitCode> {
    let source = match (&args.config, &args.url) {
        (Some(path), _) => Config::load(path)?.source,
        (None, Some(url)) => SourceConfig::new(url.clone(), vec!["public.transactions".into()]),
        (None, None) => unreachable!("clap requires --config or --url"),
    };
    weir::source::install_crypto_provider();
    let client = ConnectionSettings::from_config(&source)?
        .connect_sql()
        .await?;
    let settings = Settings {
        users: args.users,
        rate: args.rate.max(0.1),
        anomaly_share: args.anomaly_share.clamp(0.0, 1.0),
        operations: args.operations,
        seed: args.seed,
        ..Settings::default()
    };
    datagen::prepare(&client, &settings).await?;
    eprintln!(
        "writing {} operations/s ({}% anomalies); Ctrl-C stops",
        settings.rate,
        settings.anomaly_share * 100.0
    );
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let stop = async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
    };
    let written = datagen::run(&client, &settings, stop).await?;
    eprintln!(
        "wrote {} inserts ({} anomalies), {} updates, {} deletes",
        written.inserts, written.anomalies, written.updates, written.deletes
    );
    Ok(ExitCode::SUCCESS)
}
