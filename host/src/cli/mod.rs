//! Command line: parsing and dispatch. Commands live in their own modules.

mod bench;
mod bench_backfill;
mod bench_e2e;
mod bench_lake;
mod bench_plugin;
mod capture;
mod datagen;
mod plugin;
mod query;
mod resync;
mod run;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// weir: PostgreSQL changes, exactly once, into Delta Lake through WASM plugins.
#[derive(Debug, Parser)]
#[command(name = "weir", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Capture changes from PostgreSQL into a JSON lines file (or standard output).
    Capture(capture::CaptureArgs),
    /// Run the pipeline: PostgreSQL changes into Delta tables, until Ctrl-C.
    Run(run::RunArgs),
    /// Copy captured tables again (into their replicas as they stand: readers never see
    /// them emptied), while the pipeline runs or at its next start.
    Resync(resync::ResyncArgs),
    /// Run SQL over the lake's Delta tables.
    Query(query::QueryArgs),
    /// Serve the dashboard (fraud view, pipeline view) and /metrics over a lake.
    Serve(serve::ServeArgs),
    /// Maintain the lake's tables.
    Lake {
        #[command(subcommand)]
        command: query::LakeCommand,
    },
    /// Write the demo's bank data (users, transactions, injected anomalies) at a steady rate.
    Datagen(datagen::DatagenArgs),
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: plugin::PluginCommand,
    },
    /// Run the built-in benchmarks.
    Bench {
        #[command(subcommand)]
        which: bench::BenchCommand,
    },
    /// Start a private PostgreSQL with the bank tables, write demo data into it, and run
    /// the pipeline into a Delta lake until Ctrl-C.
    Demo {
        /// The lake folder (cleared when it holds a previous demo's tables).
        #[arg(long, default_value = "demo-lake")]
        lake: PathBuf,
    },
}

/// Parses the command line and runs the command.
pub fn run() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    init_logging();
    if let Command::Plugin { command } = cli.command {
        return plugin::run(command);
    }
    // The capture alone is fastest on one thread; the lake's commits (DataFusion merges,
    // Parquet encoding) want the cores while the capture keeps reading.
    let lake_work = matches!(
        cli.command,
        Command::Run(_)
            | Command::Serve(_)
            | Command::Query(_)
            | Command::Lake { .. }
            | Command::Bench { .. }
            | Command::Demo { .. }
    );
    let runtime = if lake_work {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Capture(args) => capture::run(args).await,
            Command::Run(args) => run::run(args).await,
            Command::Resync(args) => resync::run(args).await,
            Command::Query(args) => query::query(args).await,
            Command::Serve(args) => serve::run(args).await,
            Command::Lake { command } => query::lake(command).await,
            Command::Datagen(args) => datagen::run(args).await,
            Command::Bench { which } => bench::run(which).await,
            Command::Demo { lake } => capture::demo(lake).await,
            Command::Plugin { .. } => unreachable!("handled above"),
        }
    })
}

/// weir's own progress, everyone's warnings, except a merge metric deltalake warns about
/// on every commit.
const DEFAULT_LOG_FILTER: &str = "weir=info,warn,deltalake_core::operations::merge=error";

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("WEIR_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
