//! The initial copy: every table read inside the snapshot the slot exported, so that the
//! copy and the stream meet without a gap or an overlap.

use std::sync::Arc;

use futures_util::StreamExt;
use pgwire_replication::ReplicationClient;

use super::changes::backfill_row;
use super::error::SourceError;
use super::{CaptureEvent, Outbox};
use crate::decode::TypeRegistry;
use crate::decode::value::unescape_copy_field;
use crate::document::{ChangeDocument, Op, Source};
use crate::lsn::Lsn;
use crate::relation::{ColumnInfo, Relation, TableInfo};

/// Creates the slot on the (gated) replication session; returns its consistent point and
/// the exported snapshot's name.
pub async fn create_slot(
    repl: &mut ReplicationClient,
    slot: &str,
    temporary: bool,
) -> Result<(Lsn, String), SourceError> {
    let err = |source| SourceError::Replication {
        slot: slot.to_string(),
        source,
    };
    let rows = repl
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT \"{slot}\"{} LOGICAL pgoutput EXPORT_SNAPSHOT",
            if temporary { " TEMPORARY" } else { "" }
        ))
        .await
        .map_err(err)?;
    let text = |i: usize| -> Option<String> {
        rows.first()?
            .get(i)?
            .as_ref()
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let bad = |what: &str| SourceError::SlotUnusable {
        slot: slot.to_string(),
        reason: format!("CREATE_REPLICATION_SLOT returned no {what}"),
    };
    let consistent_point: Lsn = text(1)
        .ok_or_else(|| bad("consistent point"))?
        .parse()
        .map_err(|_| bad("valid consistent point"))?;
    let snapshot = text(2).ok_or_else(|| bad("snapshot name"))?;
    Ok((consistent_point, snapshot))
}

/// Copies every table inside `snapshot` and sends its rows as `r` documents. Returns
/// `false` when `stop` turned true before the copy was complete (it stops within a chunk
/// of rows: a shutdown does not wait for the rest of a large table).
pub async fn copy_tables(
    client: &tokio_postgres::Client,
    snapshot: &str,
    consistent_point: Lsn,
    tables: &[TableInfo],
    types: &TypeRegistry,
    events: &mut Outbox,
    stop: &tokio::sync::watch::Receiver<bool>,
) -> Result<bool, SourceError> {
    let q = |context: String| move |source| SourceError::Query { context, source };
    client
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
            snapshot.replace('\'', "''")
        ))
        .await
        .map_err(q(
            "starting the backfill transaction on the slot's snapshot".into(),
        ))?;
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    for table in tables {
        let columns = table_columns(client, table, types).await?;
        let estimate = client
            .query_one(
                // A partitioned table's rows are in its partitions (pg_partition_tree
                // lists nothing for a table that is not partitioned).
                "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::int8 FROM pg_class c \
                 WHERE c.oid = $1 \
                    OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf)",
                &[&table.oid],
            )
            .await
            .map_err(q(format!("estimating the size of {}", table.qualified())))?;
        events
            .push(CaptureEvent::BackfillTable {
                oid: table.oid,
                table: table.display(),
                estimated_rows: estimate.get::<_, i64>(0) as u64,
            })
            .await?;
        // As of the snapshot, like the rows.
        let storage = super::setup::storage_of(client, table.oid).await?;
        events
            .push(CaptureEvent::Schema(Arc::new(Relation {
                oid: table.oid,
                schema: table.schema.clone(),
                table: table.name.clone(),
                columns: columns.clone(),
                multiset: table.multiset(),
                storage: Some(storage),
            })))
            .await?;
        if columns.is_empty() {
            continue;
        }
        let list = columns
            .iter()
            .map(|c| format!("\"{}\"", c.name.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ");
        // A partitioned table cannot be copied as such; a query over it reads every
        // partition.
        let sql = if table.partitioned {
            format!("COPY (SELECT {list} FROM {}) TO STDOUT", table.qualified())
        } else {
            format!("COPY {} ({list}) TO STDOUT", table.qualified())
        };
        let stream = client.copy_out(sql.as_str()).await.map_err(|e| {
            if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
                SourceError::Privilege {
                    role: "the configured role".into(),
                    action: format!("read table {}", table.qualified()),
                    fix: format!(
                        "GRANT SELECT ON {} TO the role weir connects as",
                        table.qualified()
                    ),
                }
            } else {
                SourceError::Query {
                    context: format!("copying {}", table.qualified()),
                    source: e,
                }
            }
        })?;
        let mut stream = std::pin::pin!(stream);
        let mut pending: Vec<u8> = Vec::new();
        let mut seq = 0u64;
        while let Some(chunk) = stream.next().await {
            if *stop.borrow() {
                tracing::info!(table = %table.qualified(), rows = seq, "backfill interrupted by the shutdown");
                return Ok(false);
            }
            let chunk = chunk.map_err(q(format!("copying {}", table.qualified())))?;
            pending.extend_from_slice(&chunk);
            let mut start = 0;
            while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
                let line = &pending[start..start + nl];
                start += nl + 1;
                let fields: Vec<Option<String>> = line
                    .split(|&b| b == b'\t')
                    .map(|f| {
                        (f != b"\\N")
                            .then(|| String::from_utf8_lossy(&unescape_copy_field(f)).into_owned())
                    })
                    .collect();
                let (row, exact) = backfill_row(&columns, &fields);
                let doc = ChangeDocument {
                    op: Op::Read,
                    columns: row,
                    source: Source {
                        oid: table.oid,
                        schema: table.schema.clone(),
                        table: table.name.clone(),
                        lsn: consistent_point,
                        txid: None,
                        ts_ms: started_ms,
                        seq,
                        snapshot: true,
                    },
                    before: None,
                    unchanged: Vec::new(),
                    exact,
                };
                seq += 1;
                events.push(CaptureEvent::Change(doc)).await?;
            }
            pending.drain(..start);
        }
        tracing::info!(table = %table.qualified(), rows = seq, "backfilled");
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(q("ending the backfill transaction".into()))?;
    Ok(true)
}

/// The table's columns as of the snapshot (generated columns excluded, as pgoutput does).
async fn table_columns(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    types: &TypeRegistry,
) -> Result<Vec<ColumnInfo>, SourceError> {
    let rows = client
        .query(
            "SELECT a.attname::text, a.atttypid, \
               coalesce(a.attnum = ANY (i.indkey), false), a.atttypmod, a.attnum \
             FROM pg_attribute a \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated = '' \
             ORDER BY a.attnum",
            &[&table.oid],
        )
        .await
        .map_err(|source| SourceError::Query {
            context: format!("reading the columns of {}", table.qualified()),
            source,
        })?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let type_id: u32 = r.get(1);
            let name: Arc<str> = r.get::<_, String>(0).into();
            // The same key the stream gives the table (the replica identity index's
            // columns with USING INDEX).
            let key = if table.primary_key.is_empty() {
                r.get(2)
            } else {
                table.primary_key.contains(&name)
            };
            ColumnInfo {
                name,
                type_id,
                type_modifier: r.get(3),
                kind: types.kind(type_id),
                key,
                attnum: Some(r.get(4)),
                missing: None,
                has_default: false,
            }
        })
        .collect())
}
