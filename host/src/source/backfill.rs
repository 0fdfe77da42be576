//! The initial copy: every table read inside the snapshot the slot exported, so that the
//! copy and the stream meet without a gap or an overlap.

use std::sync::Arc;

use futures_util::StreamExt;
use pgwire_replication::ReplicationClient;

use super::changes::backfill_row;
use super::connection::ConnectionSettings;
use super::error::SourceError;
use super::{CaptureEvent, Outbox};
use crate::decode::TypeRegistry;
use crate::decode::value::unescape_copy_field;
use crate::document::{ChangeDocument, ExactJson, Op, Row, Source};
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

/// Copies every table inside `snapshot` and sends its rows as `r` documents; a large
/// table over several connections at that snapshot ([`Copiers`]). Returns `false` when
/// `stop` turned true before the copy was complete (it stops within a chunk of rows: a
/// shutdown does not wait for the rest of a large table).
pub async fn copy_tables(
    client: &tokio_postgres::Client,
    (snapshot, consistent_point): (&str, Lsn),
    tables: &[TableInfo],
    types: &TypeRegistry,
    events: &mut Outbox,
    stop: &tokio::sync::watch::Receiver<bool>,
    copiers: &Copiers,
) -> Result<bool, SourceError> {
    let q = |context: String| move |source| SourceError::Query { context, source };
    client.batch_execute(&begin_at(snapshot)).await.map_err(q(
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
        let blocks = copiers.blocks(client, table).await?;
        let parts = copiers.parts(blocks);
        events
            .push(CaptureEvent::BackfillTable {
                oid: table.oid,
                table: table.display(),
                estimated_rows: estimate.get::<_, i64>(0) as u64,
                connections: parts,
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
        let list = columns
            .iter()
            .map(|c| format!("\"{}\"", c.name.replace('"', "\"\"")))
            .collect::<Vec<_>>()
            .join(", ");
        let doc = |(columns, exact): (Row, Vec<ExactJson>), seq: u64| ChangeDocument {
            op: Op::Read,
            columns,
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
        // A table without columns has nothing to copy, and is copied all the same.
        let copied = if columns.is_empty() {
            Some(0)
        } else if parts > 1 {
            copiers
                .copy(
                    snapshot, table, &columns, &list, blocks, parts, events, stop, &doc,
                )
                .await?
        } else {
            copy_whole(client, table, &columns, &list, events, stop, &doc).await?
        };
        let Some(rows) = copied else {
            tracing::info!(table = %table.qualified(), "backfill interrupted by the shutdown");
            return Ok(false);
        };
        tracing::info!(table = %table.qualified(), rows, connections = parts, "backfilled");
        events
            .push(CaptureEvent::TableCopied {
                oid: table.oid,
                position: consistent_point,
            })
            .await?;
    }
    client
        .batch_execute("COMMIT")
        .await
        .map_err(q("ending the backfill transaction".into()))?;
    Ok(true)
}

/// A copied row, decoded.
type CopiedRow = (Row, Vec<ExactJson>);

/// Turns a copied row into its document, numbered.
type MakeDoc<'a> = &'a (dyn Fn(CopiedRow, u64) -> ChangeDocument + Sync);

/// Rows sent by a copying connection at a time.
const COPY_BATCH_ROWS: usize = 1024;

/// A table smaller than this many blocks per connection (1 MiB of 8 KiB pages) is copied
/// over fewer connections.
const MIN_PART_BLOCKS: i64 = 128;

/// Connections beside the snapshot's own session that copy a large table at the same
/// snapshot, each a range of its blocks (`source.backfill_connections`).
#[derive(Debug, Clone)]
pub struct Copiers {
    pub settings: ConnectionSettings,
    /// How many connections copy one table at most (1: the session's own only).
    pub connections: usize,
}

impl Copiers {
    /// The table's size in blocks now (rows the snapshot sees are all in them); 0 for a
    /// partitioned table, whose rows are its partitions'.
    async fn blocks(
        &self,
        client: &tokio_postgres::Client,
        table: &TableInfo,
    ) -> Result<i64, SourceError> {
        if table.partitioned || self.connections < 2 {
            return Ok(0);
        }
        let row = client
            .query_one(
                "SELECT pg_relation_size($1::oid::regclass) / current_setting('block_size')::int8",
                &[&table.oid],
            )
            .await
            .map_err(|source| SourceError::Query {
                context: format!("reading the size of {}", table.qualified()),
                source,
            })?;
        Ok(row.get(0))
    }

    /// Connections worth opening for a table of `blocks`.
    fn parts(&self, blocks: i64) -> usize {
        (blocks / MIN_PART_BLOCKS).clamp(1, self.connections.max(1) as i64) as usize
    }

    /// Copies `table` over `parts` connections at `snapshot`, each a range of its blocks
    /// (`ctid` ranges: a TID range scan reads only those), and sends its rows as they
    /// come. Returns the number of rows, `None` when `stop` turned true first.
    #[allow(clippy::too_many_arguments)]
    async fn copy(
        &self,
        snapshot: &str,
        table: &TableInfo,
        columns: &[ColumnInfo],
        list: &str,
        blocks: i64,
        parts: usize,
        events: &mut Outbox,
        stop: &tokio::sync::watch::Receiver<bool>,
        doc: MakeDoc<'_>,
    ) -> Result<Option<u64>, SourceError> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2 * parts);
        // Dropped on return: a copier still running is stopped.
        let mut copiers = tokio::task::JoinSet::new();
        let per = (blocks + parts as i64 - 1) / parts as i64;
        for i in 0..parts as i64 {
            // The last range is open: the table may have grown since its size was read
            // (by rows the snapshot does not see, but a range must not miss any).
            let range = if i + 1 == parts as i64 {
                format!("ctid >= '({},0)'", i * per)
            } else {
                format!(
                    "ctid >= '({},0)' AND ctid < '({},0)'",
                    i * per,
                    (i + 1) * per
                )
            };
            let sql = format!(
                "COPY (SELECT {list} FROM {} WHERE {range}) TO STDOUT",
                table.qualified()
            );
            let (settings, snapshot, tx) =
                (self.settings.clone(), snapshot.to_string(), tx.clone());
            let (columns, name) = (columns.to_vec(), table.qualified());
            copiers.spawn(async move {
                if let Err(e) = copy_part(&settings, &snapshot, &sql, &name, &columns, &tx).await {
                    let _ = tx.send(Err(e)).await;
                }
            });
        }
        drop(tx);
        let mut seq = 0u64;
        while let Some(batch) = rx.recv().await {
            if *stop.borrow() {
                return Ok(None);
            }
            for row in batch? {
                events.push(CaptureEvent::Change(doc(row, seq))).await?;
                seq += 1;
            }
        }
        Ok(Some(seq))
    }
}

/// One copier: its own session at `snapshot`, one range of the table's blocks.
async fn copy_part(
    settings: &ConnectionSettings,
    snapshot: &str,
    sql: &str,
    table: &str,
    columns: &[ColumnInfo],
    tx: &tokio::sync::mpsc::Sender<Result<Vec<CopiedRow>, SourceError>>,
) -> Result<(), SourceError> {
    let client = settings.connect_sql().await?;
    client
        .batch_execute(&begin_at(snapshot))
        .await
        .map_err(|source| SourceError::Query {
            context: format!("joining the backfill's snapshot to copy {table}"),
            source,
        })?;
    let stream = client
        .copy_out(sql)
        .await
        .map_err(|e| copy_error(table, e))?;
    let mut stream = std::pin::pin!(stream);
    let (mut pending, mut rows) = (Vec::new(), Vec::new());
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| copy_error(table, e))?;
        decode_lines(&mut pending, &chunk, columns, &mut rows);
        if rows.len() >= COPY_BATCH_ROWS && tx.send(Ok(std::mem::take(&mut rows))).await.is_err() {
            return Ok(());
        }
    }
    if !rows.is_empty() {
        let _ = tx.send(Ok(rows)).await;
    }
    Ok(())
}

/// Copies `table` whole on the snapshot's own session. Returns the number of rows, `None`
/// when `stop` turned true first (it stops within a chunk of rows: a shutdown does not
/// wait for the rest of a large table).
async fn copy_whole(
    client: &tokio_postgres::Client,
    table: &TableInfo,
    columns: &[ColumnInfo],
    list: &str,
    events: &mut Outbox,
    stop: &tokio::sync::watch::Receiver<bool>,
    doc: MakeDoc<'_>,
) -> Result<Option<u64>, SourceError> {
    // A partitioned table cannot be copied as such; a query over it reads every
    // partition.
    let sql = if table.partitioned {
        format!("COPY (SELECT {list} FROM {}) TO STDOUT", table.qualified())
    } else {
        format!("COPY {} ({list}) TO STDOUT", table.qualified())
    };
    let stream = client
        .copy_out(sql.as_str())
        .await
        .map_err(|e| copy_error(&table.qualified(), e))?;
    let mut stream = std::pin::pin!(stream);
    let (mut pending, mut rows) = (Vec::new(), Vec::new());
    let mut seq = 0u64;
    while let Some(chunk) = stream.next().await {
        if *stop.borrow() {
            return Ok(None);
        }
        let chunk = chunk.map_err(|e| copy_error(&table.qualified(), e))?;
        decode_lines(&mut pending, &chunk, columns, &mut rows);
        for row in rows.drain(..) {
            events.push(CaptureEvent::Change(doc(row, seq))).await?;
            seq += 1;
        }
    }
    Ok(Some(seq))
}

/// Decodes the complete lines of COPY's text format in `pending` + `chunk` into `out`,
/// keeping an incomplete last line in `pending`.
fn decode_lines(
    pending: &mut Vec<u8>,
    chunk: &[u8],
    columns: &[ColumnInfo],
    out: &mut Vec<CopiedRow>,
) {
    pending.extend_from_slice(chunk);
    let mut start = 0;
    while let Some(nl) = pending[start..].iter().position(|&b| b == b'\n') {
        let line = &pending[start..start + nl];
        start += nl + 1;
        let fields: Vec<Option<String>> = line
            .split(|&b| b == b'\t')
            .map(|f| {
                (f != b"\\N").then(|| String::from_utf8_lossy(&unescape_copy_field(f)).into_owned())
            })
            .collect();
        out.push(backfill_row(columns, &fields));
    }
    pending.drain(..start);
}

/// The error of a COPY: a missing privilege names the fix.
fn copy_error(table: &str, e: tokio_postgres::Error) -> SourceError {
    if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
        SourceError::Privilege {
            role: "the configured role".into(),
            action: format!("read table {table}"),
            fix: format!("GRANT SELECT ON {table} TO the role weir connects as"),
        }
    } else {
        SourceError::Query {
            context: format!("copying {table}"),
            source: e,
        }
    }
}

/// Starts a read-only transaction at an exported snapshot.
fn begin_at(snapshot: &str) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'",
        snapshot.replace('\'', "''")
    )
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
