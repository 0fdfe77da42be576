//! `weir serve`: the dashboard and `/metrics` over a lake, without a pipeline (`weir run`
//! serves them itself when the configuration has a `[dashboard]`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use clap::Args;
use tokio::signal::unix::{SignalKind, signal};

use weir::config::{Config, DashboardConfig, LakeConfig};
use weir::serve::{self, Dashboard};
use weir::telemetry::Telemetry;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Lake folder or URL.
    #[arg(long, conflicts_with = "config")]
    lake: Option<String>,
    /// Configuration file whose `[lake]` and `[dashboard]` to use.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address and port to listen on (default: `[dashboard] listen`, else 127.0.0.1:8080).
    #[arg(long)]
    listen: Option<String>,
    /// Environment variable holding an access token every data request must carry.
    #[arg(long)]
    token_env: Option<String>,
}

pub async fn run(args: ServeArgs) -> Result<ExitCode> {
    let (lake_cfg, mut dash) = match (&args.lake, &args.config) {
        (Some(url), _) => (
            LakeConfig {
                url: url.clone(),
                ..LakeConfig::default()
            },
            DashboardConfig::default(),
        ),
        (None, Some(path)) => {
            let c = Config::load(path)?;
            (c.lake, c.dashboard.unwrap_or_default())
        }
        (None, None) => (LakeConfig::default(), DashboardConfig::default()),
    };
    if let Some(listen) = args.listen {
        dash.listen = listen;
    }
    if let Some(var) = args.token_env {
        dash.token_env = Some(var);
        dash.token_file = None;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigint.recv() => {}
            _ = sigterm.recv() => {}
        }
        let _ = stop_tx.send(true);
        std::future::pending::<()>().await;
    });
    let server = start(&lake_cfg, &dash, Arc::new(Telemetry::new()), stop_rx).await?;
    server.await??;
    Ok(ExitCode::SUCCESS)
}

/// Binds the dashboard's address and serves it in a task until `stop` turns true.
pub async fn start(
    lake: &LakeConfig,
    dash: &DashboardConfig,
    telemetry: Arc<Telemetry>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let token = dash.token().map_err(anyhow::Error::msg)?;
    let listener = serve::bind(&dash.listen).await?;
    let addr = listener.local_addr()?;
    let dashboard = Dashboard {
        lake: lake.clone(),
        tables: dash.clone(),
        telemetry,
        token,
    };
    tracing::info!(%addr, "dashboard listening");
    eprintln!("dashboard: http://{addr}/  (metrics: http://{addr}/metrics)");
    Ok(tokio::spawn(serve::serve(listener, dashboard, stop)))
}
