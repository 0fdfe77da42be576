//! Before streaming: check the server, find the tables, make the publications and the slot
//! what the configuration asks for.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::Client;

use super::error::SourceError;
use crate::config::SourceConfig;
use crate::decode::TypeRegistry;
use crate::decode::value::TypeDescription;
use crate::relation::TableInfo;

/// Suffix of the publication for tables without a replica identity: it publishes only
/// inserts and truncates, so that PostgreSQL keeps accepting updates and deletes on them.
pub const INSERT_ONLY_SUFFIX: &str = "_insert_only";

pub(super) fn query_err(
    context: impl Into<String>,
) -> impl FnOnce(tokio_postgres::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Query { context, source }
}

/// Checks `wal_level` and the role's right to replicate.
pub async fn check_server(client: &Client, user: &str) -> Result<(), SourceError> {
    let row = client
        .query_one("SELECT current_setting('wal_level')", &[])
        .await
        .map_err(query_err("reading wal_level"))?;
    let level: String = row.get(0);
    if level != "logical" {
        return Err(SourceError::WalLevel { actual: level });
    }
    let row = client
        .query_one(
            "SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .map_err(query_err("reading the role's attributes"))?;
    if !row.get::<_, bool>(0) {
        return Err(SourceError::Privilege {
            role: user.to_string(),
            action: "open a replication connection".into(),
            fix: format!("as a superuser, run ALTER ROLE \"{user}\" REPLICATION"),
        });
    }
    Ok(())
}

/// Resolves the configured table names, in configuration order, exactly as PostgreSQL
/// resolves a name in SQL: unquoted parts fold to lower case (`public.USERS` is `users`),
/// quoted ones keep theirs (`public."Accounts"`), a name without a schema follows the
/// search path. The result (oid, schema and name as the catalog has them) is the one
/// identity every later stage uses.
pub async fn find_tables(
    client: &Client,
    cfg: &SourceConfig,
    database: &str,
) -> Result<Vec<TableInfo>, SourceError> {
    let mut tables = Vec::with_capacity(cfg.tables.len());
    let mut seen = HashSet::new();
    for name in &cfg.tables {
        let row = client
            .query_opt(
                "SELECT c.oid, n.nspname::text, c.relname::text, c.relreplident::text, c.relkind::text, \
                   EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary), \
                   ARRAY(SELECT a.attname::text FROM pg_index i \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey) \
                     WHERE i.indrelid = c.oid \
                       AND CASE WHEN c.relreplident = 'i' THEN i.indisreplident ELSE i.indisprimary END \
                     ORDER BY array_position(i.indkey::int2[], a.attnum)) \
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.oid = to_regclass($1)",
                &[name],
            )
            .await;
        let missing = || SourceError::TableMissing {
            table: name.clone(),
            database: database.to_string(),
        };
        let row = match row {
            Ok(Some(row)) => row,
            Ok(None) => return Err(missing()),
            // Not a valid name (42602).
            Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42602") => {
                return Err(missing());
            }
            Err(e) => return Err(query_err(format!("looking up table `{name}`"))(e)),
        };
        let kind: String = row.get(4);
        if kind != "r" && kind != "p" {
            return Err(SourceError::Settings(format!(
                "`{name}` is not a table (relkind {kind}); only tables can be captured"
            )));
        }
        let info = TableInfo {
            oid: row.get(0),
            schema: row.get::<_, String>(1).into(),
            name: row.get::<_, String>(2).into(),
            configured: name.clone(),
            partitioned: kind == "p",
            replica_identity: row.get::<_, String>(3).bytes().next().unwrap_or(b'd'),
            has_primary_key: row.get(5),
            primary_key: row
                .get::<_, Vec<String>>(6)
                .into_iter()
                .map(Arc::from)
                .collect(),
        };
        if seen.insert(info.oid) {
            tables.push(info);
        }
    }
    Ok(tables)
}

/// Loads what the database says about the non-builtin types of the tables' columns.
pub async fn load_types(
    client: &Client,
    tables: &[TableInfo],
) -> Result<TypeRegistry, SourceError> {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let mut registry = TypeRegistry::default();
    registry.describe(&type_descriptions(client, &oids).await?);
    Ok(registry)
}

/// What the catalog says about the non-builtin types of the columns of tables `oids`
/// (also types created since the capture started: an enum or a domain of a new column).
pub async fn type_descriptions(
    client: &Client,
    oids: &[u32],
) -> Result<Vec<TypeDescription>, SourceError> {
    let rows = client
        .query(TypeRegistry::CATALOG_QUERY, &[&oids])
        .await
        .map_err(query_err("reading column types"))?;
    let parse = |s: String| s.parse::<u32>().unwrap_or(0);
    Ok(rows
        .into_iter()
        .map(|r| TypeDescription {
            oid: parse(r.get(0)),
            typtype: r.get::<_, String>(1).bytes().next().unwrap_or(b'b'),
            element: parse(r.get(2)),
            base: parse(r.get(3)),
        })
        .collect())
}

/// A column as the catalog has it now: its number and, for rows older than an `ADD
/// COLUMN ... DEFAULT x`, their value (`attmissingval`) as text.
pub struct CatalogColumn {
    pub name: String,
    pub type_id: u32,
    pub type_modifier: i32,
    pub attnum: i16,
    pub missing: Option<String>,
    pub has_default: bool,
}

/// Where table `oid`'s rows are stored now: the sum of its leaf partitions'
/// `relfilenode`s (the table's own when not partitioned). A rewrite changes it.
pub async fn storage_of(client: &Client, oid: u32) -> Result<i64, SourceError> {
    let row = client
        .query_one(
            "SELECT coalesce(sum(c.relfilenode::int8), 0)::int8 FROM pg_class c \
             WHERE c.oid = $1 \
                OR c.oid IN (SELECT relid FROM pg_partition_tree($1::oid::regclass) WHERE isleaf)",
            &[&oid],
        )
        .await
        .map_err(query_err("reading where a table's rows are stored"))?;
    Ok(row.get(0))
}

/// The live columns of table `oid`, from the catalog.
pub async fn catalog_columns(client: &Client, oid: u32) -> Result<Vec<CatalogColumn>, SourceError> {
    const SQL: &str = "SELECT attname::text, attnum, atttypid, \
           CASE WHEN atthasmissing THEN (attmissingval::text::text[])[1] END, atttypmod, atthasdef \
         FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
         AND attgenerated = ''";
    let rows = match client.query(SQL, &[&oid]).await {
        Ok(rows) => rows,
        // A role that may not read attmissingval still learns the numbers.
        Err(e) if e.as_db_error().is_some_and(|d| d.code().code() == "42501") => {
            tracing::warn!(
                oid,
                "cannot read pg_attribute.attmissingval: rows older than an ADD COLUMN ... DEFAULT \
                 show NULL for it in the replica"
            );
            client
                .query(
                    "SELECT attname::text, attnum, atttypid, NULL::text, atttypmod, atthasdef \
                     FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped \
         AND attgenerated = ''",
                    &[&oid],
                )
                .await
                .map_err(query_err("reading a table's columns"))?
        }
        Err(e) => return Err(query_err("reading a table's columns")(e)),
    };
    Ok(rows
        .into_iter()
        .map(|r| CatalogColumn {
            name: r.get(0),
            attnum: r.get(1),
            type_id: r.get(2),
            missing: r.get(3),
            type_modifier: r.get(4),
            has_default: r.get(5),
        })
        .collect())
}

fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Makes sure the publications contain the tables; returns the publication names to
/// stream from.
///
/// When `resuming` (the consumer holds every table up to a position), a table that is in
/// none of them was removed from the publication (or dropped and re-created) while weir
/// was stopped: its changes since are not in the stream, so this stops rather than add
/// it back and go on without them.
pub async fn ensure_publications(
    client: &Client,
    cfg: &SourceConfig,
    tables: &[TableInfo],
    user: &str,
    resuming: bool,
    added: &[u32],
) -> Result<Vec<String>, SourceError> {
    let (full, insert_only): (Vec<&TableInfo>, Vec<&TableInfo>) =
        tables.iter().partition(|t| t.has_identity());
    for t in &insert_only {
        tracing::warn!(
            table = %t.qualified(),
            "table has no primary key or replica identity: its inserts are captured, but not \
             its updates and deletes. Fix: ALTER TABLE {} REPLICA IDENTITY FULL (or add a primary key)",
            t.qualified()
        );
    }
    let mut names = vec![cfg.publication.clone()];
    let insert_only_name = format!("{}{}", cfg.publication, INSERT_ONLY_SUFFIX);
    if !insert_only.is_empty() || publication_exists(client, &insert_only_name).await? {
        names.push(insert_only_name.clone());
    }
    if resuming {
        let published = published_tables(client, &names).await?;
        if let Some(t) = tables
            .iter()
            // A table added since (to be copied) may join now; any other left the
            // publication while weir was away, and its changes since are lost.
            .filter(|t| !added.contains(&t.oid))
            .find(|t| !published.contains(&(t.schema.to_string(), t.name.to_string())))
        {
            return Err(SourceError::NotPublished {
                table: t.display(),
                publication: cfg.publication.clone(),
            });
        }
    }
    ensure_publication(client, &cfg.publication, "", &full, user).await?;
    if names.len() > 1 {
        ensure_publication(
            client,
            &insert_only_name,
            "publish = 'insert, truncate', ",
            &insert_only,
            user,
        )
        .await?;
    }
    Ok(names)
}

/// The tables the publications publish (`schema`, `table`), as the catalog spells them.
pub async fn published_tables(
    client: &Client,
    publications: &[String],
) -> Result<HashSet<(String, String)>, SourceError> {
    Ok(client
        .query(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables \
             WHERE pubname = ANY ($1)",
            &[&publications],
        )
        .await
        .map_err(query_err("reading publication tables"))?
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
}

async fn publication_exists(client: &Client, name: &str) -> Result<bool, SourceError> {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_err("reading publications"))?;
    Ok(row.get::<_, i64>(0) > 0)
}

async fn ensure_publication(
    client: &Client,
    name: &str,
    with: &str,
    tables: &[&TableInfo],
    user: &str,
) -> Result<(), SourceError> {
    let list = tables
        .iter()
        .map(|t| t.qualified())
        .collect::<Vec<_>>()
        .join(", ");
    // Changes a publication, saying who can when the role cannot.
    let ddl = |sql: String| async move {
        client.batch_execute(&sql).await.map_err(|e| {
            if e.as_db_error().is_some_and(|d| d.code().code() == "42501") {
                SourceError::Privilege {
                    role: user.to_string(),
                    action: format!("create or change publication `{name}`"),
                    fix: format!(
                        "have the tables' owner (or a superuser) run: {sql}; weir then reuses it"
                    ),
                }
            } else {
                SourceError::Query {
                    context: format!("setting up publication `{name}` ({sql})"),
                    source: e,
                }
            }
        })
    };
    // Partitions publish as their root, under the root's identity: a partitioned table in
    // source.tables then captures every partition, also those created later.
    let options = format!(" WITH ({with}publish_via_partition_root = true)");
    let row = client
        .query_opt(
            "SELECT puballtables, pubviaroot FROM pg_publication WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(query_err("reading publications"))?;
    let Some(row) = row else {
        let sql = if tables.is_empty() {
            format!("CREATE PUBLICATION {}{options}", quote_ident(name))
        } else {
            format!(
                "CREATE PUBLICATION {} FOR TABLE {list}{options}",
                quote_ident(name)
            )
        };
        ddl(sql).await?;
        tracing::info!(publication = name, tables = %list, "created publication");
        return Ok(());
    };
    if !row.get::<_, bool>(1) && tables.iter().any(|t| t.partitioned) {
        // Without it, a partition's changes arrive under the partition's own name.
        ddl(format!(
            "ALTER PUBLICATION {} SET (publish_via_partition_root = true)",
            quote_ident(name)
        ))
        .await?;
        tracing::warn!(
            publication = name,
            "set publish_via_partition_root on the publication: partitioned tables are captured through their root"
        );
    }
    if row.get::<_, bool>(0) {
        return Ok(());
    }
    let present = published_tables(client, &[name.to_string()]).await?;
    for t in tables {
        if !present.contains(&(t.schema.to_string(), t.name.to_string())) {
            ddl(format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(name),
                t.qualified()
            ))
            .await?;
            tracing::warn!(
                publication = name,
                table = %t.qualified(),
                "added table to an existing publication: its rows from before now are not backfilled"
            );
        }
    }
    Ok(())
}

/// What PostgreSQL says about the slot.
#[derive(Debug, Clone)]
pub struct SlotState {
    /// Output plugin.
    pub plugin: String,
    /// Slot kind (`logical` / `physical`).
    pub slot_type: String,
    /// Database it belongs to.
    pub database: Option<String>,
    /// PID of the session holding it.
    pub active_pid: Option<i32>,
    /// Where its consumer last confirmed it stands.
    pub confirmed_flush: Option<crate::lsn::Lsn>,
}

/// Reads the slot, if it exists.
pub async fn slot_state(client: &Client, slot: &str) -> Result<Option<SlotState>, SourceError> {
    let row = client
        .query_opt(
            "SELECT coalesce(plugin::text, ''), slot_type, database::text, active_pid, \
               confirmed_flush_lsn::text \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("reading replication slots"))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        slot_type: r.get(1),
        database: r.get(2),
        active_pid: r.get(3),
        confirmed_flush: r.get::<_, Option<String>>(4).and_then(|l| l.parse().ok()),
    }))
}

/// Drops the slot (it must not be in use).
pub async fn drop_slot(client: &Client, slot: &str) -> Result<(), SourceError> {
    client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(query_err(format!("dropping replication slot `{slot}`")))?;
    Ok(())
}
