//! SQL over the lake: every Delta table under the lake URL, in DataFusion.
//!
//! Tables are registered as `<catalog>.<schema>.<folder name>` with that catalog and
//! schema as the defaults, and the parser speaks the Databricks dialect, so both
//! `SELECT * FROM transactions` and
//! ``SELECT * FROM `finance-demo`.`default`.`transactions` `` work as analysts write them.

use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::common::TableReference;
use deltalake::datafusion::prelude::{SessionConfig, SessionContext};

use crate::sink::delta::Lake;

/// What went wrong with a query.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The lake cannot be read.
    #[error("lake `{url}`: {reason}")]
    Lake {
        /// The lake URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// A table of the lake cannot be opened.
    #[error("Delta table `{table}`: {source}")]
    Table {
        /// The table.
        table: String,
        /// The library's error.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// The SQL is wrong, or names a table the lake does not have.
    #[error("{message}")]
    Sql {
        /// DataFusion's message (with the position for syntax errors), plus hints.
        message: String,
    },
}

/// What a lake table is at the moment it was opened.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TableDetails {
    /// The table (folder) name.
    pub name: String,
    /// Its Delta version.
    pub version: i64,
    /// When that version was committed (Unix ms), when the log still says.
    pub last_commit_ms: Option<i64>,
    /// Its columns.
    pub columns: Vec<String>,
}

/// A query session over one lake.
pub struct LakeQuery {
    ctx: SessionContext,
    /// Names of the registered tables.
    pub tables: Vec<String>,
    /// Per registered table: version, last commit time and columns.
    pub details: Vec<TableDetails>,
    catalog: String,
    schema: String,
}

impl LakeQuery {
    /// Registers every Delta table found directly under the lake's root.
    pub async fn open(lake: &Lake, catalog: &str, schema: &str) -> Result<LakeQuery, QueryError> {
        let mut config = SessionConfig::new()
            .with_default_catalog_and_schema(catalog, schema)
            .with_create_default_catalog_and_schema(true)
            .with_information_schema(true);
        config = config.set_str("datafusion.sql_parser.dialect", "databricks");
        let ctx = SessionContext::new_with_config(config);
        let names = list_tables(lake).await?;
        let mut tables = Vec::new();
        let mut details = Vec::new();
        for name in names {
            let table = deltalake::open_table_with_storage_options(
                lake.table_url(&name),
                lake.storage.clone(),
            )
            .await
            .map_err(|e| QueryError::Table {
                table: name.clone(),
                source: Box::new(e),
            })?;
            table
                .update_datafusion_session(&ctx.state())
                .map_err(|e| QueryError::Table {
                    table: name.clone(),
                    source: Box::new(e),
                })?;
            let provider = table
                .table_provider()
                .await
                .map_err(|e| QueryError::Table {
                    table: name.clone(),
                    source: Box::new(e.into()),
                })?;
            let version = table.version().unwrap_or(0);
            details.push(TableDetails {
                name: name.clone(),
                version: version as i64,
                last_commit_ms: table
                    .snapshot()
                    .ok()
                    .and_then(|s| s.version_timestamp(version)),
                columns: provider
                    .schema()
                    .fields()
                    .iter()
                    .map(|f| f.name().clone())
                    .collect(),
            });
            ctx.register_table(
                TableReference::full(catalog.to_string(), schema.to_string(), name.clone()),
                provider,
            )
            .map_err(|e| QueryError::Sql {
                message: e.to_string(),
            })?;
            tables.push(name);
        }
        Ok(LakeQuery {
            ctx,
            tables,
            details,
            catalog: catalog.to_string(),
            schema: schema.to_string(),
        })
    }

    /// Runs `sql` and collects the result.
    pub async fn sql(&self, sql: &str) -> Result<Vec<RecordBatch>, QueryError> {
        let df = self.ctx.sql(sql).await.map_err(|e| self.explain(e))?;
        df.collect().await.map_err(|e| self.explain(e))
    }

    /// Runs `sql` and returns its rows as JSON objects (decimals and timestamps as
    /// strings: cast in the SQL for numbers).
    pub async fn json(
        &self,
        sql: &str,
    ) -> Result<Vec<serde_json::Map<String, serde_json::Value>>, QueryError> {
        let batches = self.sql(sql).await?;
        let mut writer = deltalake::arrow::json::ArrayWriter::new(Vec::new());
        let failed = |e: deltalake::arrow::error::ArrowError| QueryError::Sql {
            message: e.to_string(),
        };
        for b in &batches {
            writer.write(b).map_err(failed)?;
        }
        writer.finish().map_err(failed)?;
        let bytes = writer.into_inner();
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(&bytes).map_err(|e| QueryError::Sql {
            message: e.to_string(),
        })
    }

    /// The table's details, when the lake has it.
    pub fn table(&self, name: &str) -> Option<&TableDetails> {
        self.details.iter().find(|t| t.name == name)
    }

    fn explain(&self, e: deltalake::datafusion::error::DataFusionError) -> QueryError {
        let mut message = e.to_string();
        if message.contains("not found") && message.contains("table") {
            if self.tables.is_empty() {
                message.push_str("\nThe lake has no Delta tables yet.");
            } else {
                message.push_str(&format!(
                    "\nTables in the lake: {} (also as `{}`.`{}`.<name>)",
                    self.tables.join(", "),
                    self.catalog,
                    self.schema
                ));
            }
        }
        QueryError::Sql { message }
    }
}

/// Folders under the lake root holding a `_delta_log`.
pub(crate) async fn list_tables(lake: &Lake) -> Result<Vec<String>, QueryError> {
    let err = |reason: String| QueryError::Lake {
        url: lake.root.to_string(),
        reason,
    };
    if lake.root.scheme() != "file" {
        return list_remote_tables(lake).await;
    }
    let root = lake
        .root
        .to_file_path()
        .map_err(|_| err("not a local path".into()))?;
    let entries = std::fs::read_dir(&root).map_err(|e| err(e.to_string()))?;
    let mut names = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.join("_delta_log").is_dir()
            && let Some(name) = path.file_name().and_then(|n| n.to_str())
        {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// Table folders of a lake in an object store: prefixes with a `_delta_log/` below.
async fn list_remote_tables(lake: &Lake) -> Result<Vec<String>, QueryError> {
    let err = |reason: String| QueryError::Lake {
        url: lake.root.to_string(),
        reason,
    };
    // The store is rooted at the lake's prefix already.
    let store = deltalake::logstore::store_for(&lake.root, lake.storage.clone())
        .map_err(|e| err(e.to_string()))?;
    let listing = store
        .list_with_delimiter(None)
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut names = Vec::new();
    for dir in listing.common_prefixes {
        let Some(name) = dir.filename() else { continue };
        let log = dir.clone().join("_delta_log");
        let has_log = store
            .list_with_delimiter(Some(&log))
            .await
            .map(|l| !l.objects.is_empty())
            .unwrap_or(false);
        if has_log {
            names.push(name.to_string());
        }
    }
    names.sort();
    Ok(names)
}
