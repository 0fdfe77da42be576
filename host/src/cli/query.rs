//! `weir query`: SQL over the lake's Delta tables, and `weir lake` maintenance.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Subcommand, ValueEnum};
use deltalake::arrow::record_batch::RecordBatch;

use weir::config::{Config, LakeConfig};
use weir::query::LakeQuery;
use weir::sink::delta::Lake;

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// An aligned table.
    Table,
    /// CSV with a header.
    Csv,
    /// One JSON object per line.
    Json,
}

/// Where the lake is: `--lake` or the `[lake]` of a configuration file.
#[derive(Debug, Args)]
pub struct LakeArgs {
    /// Lake folder or URL.
    #[arg(long, conflicts_with = "config")]
    lake: Option<String>,
    /// Configuration file whose `[lake]` to use.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

impl LakeArgs {
    fn lake_config(&self) -> Result<LakeConfig> {
        Ok(match (&self.lake, &self.config) {
            (Some(url), _) => LakeConfig {
                url: url.clone(),
                ..LakeConfig::default()
            },
            (None, Some(path)) => Config::load(path)?.lake,
            (None, None) => LakeConfig::default(),
        })
    }
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    #[command(flatten)]
    lake: LakeArgs,
    /// Output format.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// The SQL (Databricks dialect).
    sql: String,
}

pub async fn query(args: QueryArgs) -> Result<ExitCode> {
    let cfg = args.lake.lake_config()?;
    let lake = Lake::from_config(&cfg, false)?;
    let q = LakeQuery::open(&lake, &cfg.catalog, &cfg.schema).await?;
    let batches = q.sql(&args.sql).await?;
    print(&batches, args.format)?;
    Ok(ExitCode::SUCCESS)
}

fn print(batches: &[RecordBatch], format: Format) -> Result<()> {
    use std::io::Write;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Table => {
            writeln!(
                out,
                "{}",
                deltalake::arrow::util::pretty::pretty_format_batches(batches)?
            )?;
        }
        Format::Csv => {
            let mut w = deltalake::arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in batches {
                w.write(b)?;
            }
        }
        Format::Json => {
            let mut w = deltalake::arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum LakeCommand {
    /// Compact the small files of every table of the pipeline.
    Optimize {
        /// Configuration file of the pipeline.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Delete files no table version within the retention period uses.
    Vacuum {
        /// Configuration file of the pipeline.
        #[arg(long, short)]
        config: PathBuf,
        /// Keep files used by versions of the last this many hours.
        #[arg(long, default_value_t = 168)]
        retention_hours: u64,
    },
}

pub async fn lake(command: LakeCommand) -> Result<ExitCode> {
    match command {
        LakeCommand::Optimize { config } => {
            let config = Config::load(&config)?;
            let mut sink = open_offline(&config).await?;
            for line in sink.optimize().await? {
                println!("{line}");
            }
        }
        LakeCommand::Vacuum {
            config,
            retention_hours,
        } => {
            let config = Config::load(&config)?;
            let mut sink = open_offline(&config).await?;
            for line in sink.vacuum(retention_hours).await? {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The pipeline's lake tables, found without the source database: its table names are
/// read as PostgreSQL reads identifiers (a name without a schema is taken as `public`).
async fn open_offline(config: &Config) -> Result<weir::sink::delta::DeltaSink> {
    let tables: Vec<_> = (1u32..)
        .zip(&config.source.tables)
        .map(|(i, t)| weir::relation::TableInfo::offline(t, i))
        .collect();
    Ok(weir::sink::delta::DeltaSink::open(config, &tables).await?)
}
