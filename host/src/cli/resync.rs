//! `weir resync`: copy captured tables again, without stopping the pipeline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::Args;

use weir::config::Config;

#[derive(Debug, Args)]
pub struct ResyncArgs {
    /// TOML configuration file of the pipeline (`[source]`: its database and slot).
    #[arg(long, short)]
    config: PathBuf,
    /// Tables to copy again, named as in `source.tables`.
    #[arg(required = true)]
    tables: Vec<String>,
}

pub async fn run(args: ResyncArgs) -> Result<ExitCode> {
    let config = Config::load(&args.config)?;
    let asked = weir::source::resync::request_resync(&config.source, &args.tables).await?;
    for (table, lsn) in asked {
        eprintln!(
            "asked: {table} is copied again once the pipeline of slot `{}` reaches {lsn} \
             (a running pipeline within moments, a stopped one at its next start)",
            config.source.slot
        );
    }
    Ok(ExitCode::SUCCESS)
}
