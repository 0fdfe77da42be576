//! While streaming: the captured tables' identity, watched in the catalog.
//!
//! pgoutput says nothing when a captured table is dropped, or leaves the publication: its
//! changes just stop coming. Reading the catalog now and then turns that silence into a
//! stop that names the table and the way back. A rename needs nothing: the stream's
//! Relation message carries the new name under the same OID, which is what the sinks
//! route by.

use std::time::Duration;

use super::connection::ConnectionSettings;
use super::error::SourceError;
use crate::relation::TableInfo;

/// How often the catalog is read.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// Returns (only) when a table is gone: dropped, or in none of `publications`.
pub async fn watch_tables(
    settings: ConnectionSettings,
    tables: Vec<TableInfo>,
    publications: Vec<String>,
) -> SourceError {
    let oids: Vec<u32> = tables.iter().map(|t| t.oid).collect();
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        tokio::time::sleep(INTERVAL).await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            // Connection trouble is the replication stream's to report; try again later.
            client = settings.connect_sql().await.ok();
        }
        let Some(c) = &client else { continue };
        let rows = c
            .query(
                "SELECT t.oid, n.nspname::text, c.relname::text, \
                   EXISTS (SELECT 1 FROM pg_publication_tables p \
                     WHERE p.pubname = ANY ($2) AND p.schemaname = n.nspname \
                       AND p.tablename = c.relname) \
                 FROM unnest($1::oid[]) AS t(oid) \
                 LEFT JOIN pg_class c ON c.oid = t.oid \
                 LEFT JOIN pg_namespace n ON n.oid = c.relnamespace",
                &[&oids, &publications],
            )
            .await;
        let Ok(rows) = rows else {
            client = None;
            continue;
        };
        for r in rows {
            let oid: u32 = r.get(0);
            let Some(t) = tables.iter().find(|t| t.oid == oid) else {
                continue;
            };
            let name: Option<String> = r.get(2);
            let Some(name) = name else {
                return SourceError::TableGone {
                    table: t.display(),
                    what: "was dropped".into(),
                    fix: "its replica keeps the rows it had. Remove it from source.tables (and \
                          its Delta tables from the lake); if it was re-created, delete its Delta \
                          tables (the replica and its change log) and start weir again to \
                          backfill it"
                        .into(),
                };
            };
            if !r.get::<_, bool>(3) {
                let schema: String = r.get(1);
                return SourceError::TableGone {
                    table: format!("{schema}.{name}"),
                    what: format!(
                        "was removed from publication `{}`",
                        publications.join("`, `")
                    ),
                    fix: format!(
                        "PostgreSQL no longer sends its changes. To go on capturing it, add it back \
                         (ALTER PUBLICATION \"{}\" ADD TABLE {}), delete its Delta tables (the \
                         replica and its change log) and start weir again to backfill it; or \
                         remove it from source.tables",
                        publications[0],
                        crate::relation::quote_qualified(&schema, &name)
                    ),
                };
            }
        }
    }
}
