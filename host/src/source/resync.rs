//! Copying a captured table again on demand (`weir resync`): a logical decoding message
//! in the WAL asks the pipeline that reads the slot to copy the table again.
//!
//! The request travels through the slot itself, so it reaches the pipeline in order with
//! the changes around it, whether the pipeline is running (within moments) or stopped
//! (at its next start), and it cannot be lost: the slot keeps the WAL until the pipeline
//! has acknowledged a position past it, which it does only once the copy is in the lake.

use crate::config::SourceConfig;
use crate::lsn::Lsn;

use super::connection::{ConnectionSettings, install_crypto_provider};
use super::error::SourceError;
use super::setup;

/// The prefix of weir's resync messages (`pg_logical_emit_message`).
pub const RESYNC_PREFIX: &str = "weir.resync";

/// What a resync message says: which pipeline (by its slot) copies which table again.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ResyncRequest {
    /// The slot of the pipeline asked; other pipelines on the database ignore it.
    pub slot: String,
    /// The table's OID.
    pub oid: u32,
    /// `schema.table`, for messages.
    pub table: String,
}

impl ResyncRequest {
    /// Reads a message's content; `None` when it is not a request of this form.
    pub fn parse(content: &[u8]) -> Option<ResyncRequest> {
        serde_json::from_slice(content).ok()
    }
}

/// Asks the pipeline of `cfg` (its slot) to copy each of `tables` again, writing one
/// message per table into the WAL. Each name is resolved as in `source.tables` and must
/// be one of the captured tables. Returns each table with the position of its request.
pub async fn request_resync(
    cfg: &SourceConfig,
    tables: &[String],
) -> Result<Vec<(String, Lsn)>, SourceError> {
    install_crypto_provider();
    let settings = ConnectionSettings::from_config(cfg)?;
    let client = settings.connect_sql().await?;
    let captured = setup::find_tables(&client, cfg, &settings.database).await?;
    let asked = setup::find_tables(
        &client,
        &SourceConfig {
            tables: tables.to_vec(),
            ..cfg.clone()
        },
        &settings.database,
    )
    .await?;
    if setup::slot_state(&client, &cfg.slot).await?.is_none() {
        return Err(SourceError::Settings(format!(
            "the slot `{}` does not exist: the pipeline has not run yet (its first run copies \
             every table), or it was dropped (`weir run --start-over` copies every table again)",
            cfg.slot
        )));
    }
    let mut requested = Vec::with_capacity(asked.len());
    for table in asked {
        if !captured.iter().any(|t| t.oid == table.oid) {
            return Err(SourceError::Settings(format!(
                "`{}` is not one of the tables this pipeline captures (source.tables: {}); \
                 for a partition, resync its partitioned table",
                table.display(),
                cfg.tables.join(", ")
            )));
        }
        let request = ResyncRequest {
            slot: cfg.slot.clone(),
            oid: table.oid,
            table: table.display(),
        };
        let content = serde_json::to_string(&request).unwrap_or_default();
        let row = client
            .query_one(
                "SELECT pg_logical_emit_message(true, $1, $2)::text",
                &[&RESYNC_PREFIX, &content],
            )
            .await
            .map_err(setup::query_err(format!(
                "writing the resync request of `{}`",
                table.display()
            )))?;
        let lsn: String = row.get(0);
        let lsn = lsn.parse().map_err(|_| SourceError::Protocol {
            lsn: Lsn(0),
            message: format!("pg_logical_emit_message returned `{lsn}`, not an LSN"),
        })?;
        requested.push((table.display(), lsn));
    }
    Ok(requested)
}
