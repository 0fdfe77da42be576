//! Delta Lake: a replica per source table (merge by key), an optional change log per
//! table, in a lake folder or object store.
//!
//! # Delivery guarantee
//!
//! Exactly once per table. Every commit [`DeltaSink::write`] makes carries, in the same
//! Delta commit as the data, an application transaction (`txn` action) with app id
//! `weir:<pipeline>:<table>` and, as version, the source position (end LSN of the last
//! source transaction) up to which that table is complete. On open, each table's version
//! is read back; changes that committed before it are skipped for that table
//! ([`DeltaSink::write`] filters them), so replaying a range some tables already hold
//! writes nothing twice. The position a caller may acknowledge to PostgreSQL is the one
//! it passed to a `write` that returned `Ok`: every table is complete up to it.
//!
//! Tables are created on first use from the PostgreSQL schema (see [`schema`] for the
//! types), grow columns as the source does, and are named after the source table:
//! `users` (`schema_table` outside `public`, or `name` in the config), change logs
//! `<name>_changes`.

pub mod collection;
mod engine;
mod multiset;
pub mod replica;
mod reshape;
pub mod schema;
mod staging;
pub mod table;

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::datatypes::{DataType, Field, TimeUnit};
use futures_util::FutureExt as _;
use serde_json::{Map, Value};

use crate::config::{Config, DeleteMode, LakeConfig, LakeTableConfig};
use crate::document::{ChangeDocument, Op};
use crate::lsn::Lsn;
use crate::relation::Relation;
use crate::relation::TableInfo;
use crate::source::Resume;
use replica::{Reduced, has_key};
use schema::{arrow_field, record_batch, to_arrow_json};
use table::LakeTable;

/// Commit LSN of the change that last wrote the row (replica) or of the change (log).
pub const LSN: &str = "_lsn";
/// Commit time of that change.
pub const COMMIT_TS: &str = "_commit_ts";
/// Soft-delete marker of a replica row.
pub const DELETED: &str = "_deleted";
/// The exact change-document values (a JSON object by column name) of the row's values
/// that their Delta column cannot hold and holds as NULL: numeric `NaN`, `±infinity` and
/// BC dates, ... (see [`schema`]); NULL when there is none. Replicas and change logs.
pub const RAW: &str = "_raw";
/// Change-log column: `c`, `u`, `d`, `r`, `t`.
pub const OP: &str = "_op";
/// Change-log column: source transaction id.
pub const TXID: &str = "_txid";
/// Change-log column: position of the change in its transaction.
pub const SEQ: &str = "_seq";
/// Change-log column: true for backfill reads.
pub const SNAPSHOT: &str = "_snapshot";
/// Change-log column: the old row or key (JSON) where PostgreSQL sent it.
pub const BEFORE: &str = "_before";
/// Change-log column: columns whose TOAST value was not sent.
pub const UNCHANGED: &str = "_unchanged";
/// Table property: set (to the position the table stood at) on a source table's lake
/// tables while the configuration leaves them out; cleared when a copy fills them again.
pub const DETACHED_PROPERTY: &str = "weir.detached";

/// What went wrong writing the lake. Each names the table or location at fault.
#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    /// The lake location cannot be used.
    #[error("lake `{url}`: {reason}")]
    Location {
        /// The configured URL.
        url: String,
        /// Why, and what to do.
        reason: String,
    },
    /// A Delta operation failed.
    #[error("{action} Delta table `{table}`: {source}")]
    Table {
        /// The table.
        table: String,
        /// What weir was doing.
        action: String,
        /// The library's error.
        #[source]
        source: Box<deltalake::DeltaTableError>,
    },
    /// The table exists with a column of another type.
    #[error(
        "Delta table `{table}` has column `{column}` of type {found}, but the source needs {expected}; \
         nothing was acknowledged. weir widens a column in place (integer to bigint, real to double, \
         numeric to a wider numeric or to numeric without precision), not this change. If the \
         source column's type was changed, delete the table (and its change log) from the lake and \
         start weir again to backfill it; if the table was made by someone else or for another \
         source, move it away or configure another name"
    )]
    IncompatibleSchema {
        /// The table.
        table: String,
        /// The column.
        column: String,
        /// Its type in the table.
        found: String,
        /// The type weir writes.
        expected: String,
    },
    /// Another writer committed with this pipeline's application id.
    #[error(
        "Delta table `{table}`: another writer committed concurrently ({detail}). Is another weir running this pipeline?"
    )]
    Concurrent {
        /// The table.
        table: String,
        /// The library's message.
        detail: String,
    },
    /// A table is to be copied again: PostgreSQL rewrote its rows without sending them,
    /// or `weir resync` asked for it.
    #[error(
        "table `{table}`: {reason}. It is copied again: the pipeline starts again from what \
         the lake holds and backfills that table alone"
    )]
    Rewritten {
        /// `schema.table`.
        table: String,
        /// What happened.
        reason: String,
    },
    /// An operation needs a table that does not exist.
    #[error("Delta table `{table}` does not exist")]
    Missing {
        /// The table.
        table: String,
    },
    /// A change or schema of a table the lake has no tables for.
    #[error(
        "a change of table `{table}` (oid {oid}) reached the lake, which has no Delta table for it; \
         nothing was acknowledged. Add it to source.tables, or remove it from the publication"
    )]
    UnknownTable {
        /// `schema.table`.
        table: String,
        /// Its OID.
        oid: u32,
    },
    /// Two source tables (or one and weir's own) would share a Delta table.
    #[error(
        "source tables `{first}` and `{second}` would both be written to Delta table `{delta_table}`: \
         give one of them its own name with [lake.tables.\"{configured}\"] name = \"...\""
    )]
    NameClash {
        /// The table that has the name.
        first: String,
        /// The table that would get it too.
        second: String,
        /// The Delta table's name.
        delta_table: String,
        /// The second table's entry in `source.tables`.
        configured: String,
    },
    /// A change cannot be applied to its table.
    #[error("cannot apply a change of table `{table}`: {reason}; nothing was acknowledged")]
    Unplaceable {
        /// `schema.table`.
        table: String,
        /// Why, and the fix.
        reason: String,
    },
    /// Changes arrived for a table whose schema was never announced.
    #[error("changes for `{table}` arrived before its schema")]
    NoSchema {
        /// `schema.table`.
        table: String,
    },
    /// Rows could not be converted to Arrow.
    #[error("converting rows for Delta table `{table}`: {source}")]
    Arrow {
        /// The table.
        table: String,
        /// The library's error.
        #[source]
        source: deltalake::arrow::error::ArrowError,
    },
}

impl DeltaError {
    /// Whether trying again later may succeed: the object store, or the network to it,
    /// failed for longer than the store client's own retries (a refused or reset
    /// connection, a timeout). Not a missing table, refused credentials or a schema
    /// clash: those stop the pipeline.
    pub fn is_transient(&self) -> bool {
        if matches!(self, DeltaError::Rewritten { .. }) {
            return true;
        }
        let DeltaError::Table { source, .. } = self else {
            return false;
        };
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
        while let Some(e) = cause {
            if let Some(http) =
                e.downcast_ref::<deltalake::logstore::object_store::client::HttpError>()
            {
                use deltalake::logstore::object_store::client::HttpErrorKind as Kind;
                return matches!(
                    http.kind(),
                    Kind::Connect | Kind::Request | Kind::Timeout | Kind::Interrupted
                );
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as Kind;
                if matches!(
                    io.kind(),
                    Kind::ConnectionRefused
                        | Kind::ConnectionReset
                        | Kind::ConnectionAborted
                        | Kind::NotConnected
                        | Kind::BrokenPipe
                        | Kind::TimedOut
                        | Kind::Interrupted
                        | Kind::UnexpectedEof
                ) {
                    return true;
                }
                // The Parquet writer wraps the store's error (a timeout among them) in an
                // `io::Error` of kind `Other`, whose `source()` skips the wrapped error:
                // look inside it.
                cause = io
                    .get_ref()
                    .map(|inner| inner as &(dyn std::error::Error + 'static));
                continue;
            }
            cause = match e.downcast_ref::<delta_kernel::error::Error>() {
                // The kernel holds the store's error without naming it as the source.
                Some(delta_kernel::error::Error::ObjectStore(store)) => Some(store),
                _ => e.source(),
            };
        }
        false
    }
}

/// Where the lake is.
#[derive(Clone)]
pub struct Lake {
    /// The folder (as a `file://` URL) or object-store URL of the lake.
    pub root: url::Url,
    /// Object-store options (credentials, endpoint); never logged.
    pub storage: HashMap<String, String>,
}

impl std::fmt::Debug for Lake {
    /// Storage options hold credentials: only their names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut keys: Vec<&String> = self.storage.keys().collect();
        keys.sort();
        f.debug_struct("Lake")
            .field("root", &self.root.as_str())
            .field("storage_option_names", &keys)
            .finish()
    }
}

impl Lake {
    /// Resolves a lake URL or path. Local folders are created when missing and must be
    /// writable.
    pub fn open(url: &str, create: bool) -> Result<Lake, DeltaError> {
        let location = |reason: String| DeltaError::Location {
            url: url.to_string(),
            reason,
        };
        let root = if url.contains("://") && !url.starts_with("file://") {
            let mut u = url::Url::parse(url).map_err(|e| location(e.to_string()))?;
            if !u.path().ends_with('/') {
                u.set_path(&format!("{}/", u.path()));
            }
            match u.scheme() {
                "s3" | "s3a" => deltalake::aws::register_handlers(None),
                "gs" => deltalake::gcp::register_handlers(None),
                "az" | "abfs" | "abfss" | "azure" | "adl" => {
                    deltalake::azure::register_handlers(None)
                }
                other => {
                    return Err(location(format!(
                        "`{other}://` is not a supported store (use a folder, s3://, gs:// or az://)"
                    )));
                }
            }
            u
        } else {
            let path = std::path::PathBuf::from(url.strip_prefix("file://").unwrap_or(url));
            if create {
                std::fs::create_dir_all(&path)
                    .map_err(|e| location(format!("cannot create the folder: {e}")))?;
                let probe = path.join(".weir-write-test");
                std::fs::write(&probe, b"").map_err(|e| {
                    location(format!(
                        "the folder is not writable ({e}); fix its permissions or set lake.url to another folder"
                    ))
                })?;
                let _ = std::fs::remove_file(probe);
            } else if !path.is_dir() {
                return Err(location("no such folder".into()));
            }
            let abs = std::fs::canonicalize(&path).map_err(|e| location(e.to_string()))?;
            url::Url::from_directory_path(&abs)
                .map_err(|_| location("not an absolute path".into()))?
        };
        Ok(Lake {
            root,
            storage: HashMap::new(),
        })
    }

    /// The lake of a `[lake]` configuration: its URL and object-store options.
    pub fn from_config(cfg: &LakeConfig, create: bool) -> Result<Lake, DeltaError> {
        let mut lake = Lake::open(&cfg.url, create)?;
        lake.storage = cfg
            .storage
            .0
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(lake)
    }

    /// URL of the table folder `name`.
    pub fn table_url(&self, name: &str) -> url::Url {
        let mut u = self.root.clone();
        u.set_path(&format!("{}{name}/", self.root.path()));
        u
    }
}

/// The `[lake.tables."..."]` settings of a source table: under the name as written in
/// `source.tables`, or as `schema.table` the way the catalog spells it.
pub fn table_settings<'a>(cfg: &'a LakeConfig, table: &TableInfo) -> Option<&'a LakeTableConfig> {
    let exact = format!("{}.{}", table.schema, table.name);
    cfg.tables
        .get(&table.configured)
        .or_else(|| cfg.tables.get(&format!("public.{}", table.configured)))
        .or_else(|| cfg.tables.get(&exact))
}

/// The replica's name for a source table: `[lake.tables."...".name]`, else the table's name
/// (`schema_table` outside `public`), with every character but letters, digits, `_` and
/// `-` written as `_` (a folder and an SQL name any reader takes).
pub fn replica_name(cfg: &LakeConfig, table: &TableInfo) -> String {
    if let Some(name) = table_settings(cfg, table).and_then(|t| t.name.clone()) {
        return name;
    }
    let name = if &*table.schema == "public" {
        table.name.to_string()
    } else {
        format!("{}_{}", table.schema, table.name)
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

enum WriteKind {
    Replica,
    ChangeLog,
}

struct SourceTable {
    /// Without a key (append-only or multiset): a replay does not rewrite its rows.
    keyless: bool,
    /// `schema.table` as last seen (a rename changes it), for messages.
    display: String,
    relation: Option<Arc<Relation>>,
    replica: LakeTable,
    changes: Option<LakeTable>,
    delete: DeleteMode,
    /// Being copied (between [`DeltaSink::begin_backfill`] and [`DeltaSink::complete`]):
    /// its shape is the copy's.
    copying: bool,
    /// Copied again into its keyed replica as it stands (see `begin_backfill`): the rows
    /// the copy did not write go when it completes.
    in_place: bool,
}

/// Work done so far, for benchmarks and the status line.
#[derive(Debug, Clone, Default)]
pub struct SinkStats {
    /// Changes merged into replicas.
    pub replica_rows: u64,
    /// Time spent on replica commits.
    pub replica_time: std::time::Duration,
    /// Changes appended to change logs.
    pub log_rows: u64,
    /// Time spent on change-log commits.
    pub log_time: std::time::Duration,
    /// Plugin outputs merged into collections.
    pub collection_rows: u64,
    /// Time spent on collection commits.
    pub collection_time: std::time::Duration,
    /// Time spent on plugin-state commits.
    pub state_time: std::time::Duration,
    /// Delta commits made (data and position).
    pub commits: u64,
    /// Background compactions (see [`DeltaSink::compact_step`]).
    pub compactions: u64,
}

/// Writes change documents into the lake, exactly once per table (see the module doc).
pub struct DeltaSink {
    /// By table OID: the identity the capture resolved (see [`crate::relation`]).
    tables: HashMap<u32, SourceTable>,
    /// Work done so far.
    pub stats: SinkStats,
    lake: Lake,
    pipeline: String,
    checkpoint_interval: u64,
    /// Background compaction: small-file count that starts it (0: off), target size.
    compact_files: usize,
    compact_target: u64,
    /// Plugin output tables, opened on first use.
    collections: HashMap<String, LakeTable>,
    dead_letters: Option<LakeTable>,
    /// The plugins' state (when plugins are configured).
    plugin_state: Option<LakeTable>,
}

impl DeltaSink {
    /// Opens (without creating) the Delta tables of the source tables `tables` (as the
    /// capture resolved them: [`crate::source::Capture::describe_tables`]) and reads where
    /// each stands. Two source tables whose Delta tables would share a name are refused.
    pub async fn open(config: &Config, tables_in: &[TableInfo]) -> Result<DeltaSink, DeltaError> {
        let cfg = &config.lake;
        let lake = Lake::from_config(cfg, true)?;
        let pipeline = cfg.pipeline.clone().unwrap_or(config.source.slot.clone());
        let mut tables = HashMap::new();
        let mut names: HashMap<String, String> =
            [collection::PLUGIN_STATE, collection::DEAD_LETTERS]
                .into_iter()
                .map(|n| (n.to_string(), "weir itself".to_string()))
                .collect();
        for t in tables_in {
            let per = table_settings(cfg, t).cloned().unwrap_or_default();
            let replica_name = replica_name(cfg, t);
            let change_log = per.change_log.unwrap_or(cfg.change_log);
            let mut own = vec![replica_name.clone()];
            if change_log {
                own.push(format!("{replica_name}_changes"));
            }
            for n in own {
                if let Some(other) = names.insert(n.clone(), t.display()) {
                    return Err(DeltaError::NameClash {
                        first: other,
                        second: t.display(),
                        delta_table: n,
                        configured: t.configured.clone(),
                    });
                }
            }
            let open = |n: String| {
                let url = lake.table_url(&n);
                let storage = lake.storage.clone();
                let pipeline = pipeline.clone();
                async move {
                    LakeTable::open(&n, url, storage, &pipeline, cfg.checkpoint_interval).await
                }
            };
            let replica = open(replica_name.clone()).await?;
            let changes = if change_log {
                Some(open(format!("{replica_name}_changes")).await?)
            } else {
                None
            };
            tables.insert(
                t.oid,
                SourceTable {
                    keyless: t.primary_key.is_empty(),
                    display: t.display(),
                    relation: None,
                    replica,
                    changes,
                    delete: per.delete.unwrap_or(cfg.delete),
                    copying: false,
                    in_place: false,
                },
            );
        }
        let plugin_state = if config.plugins.is_empty() {
            None
        } else {
            let name = collection::PLUGIN_STATE;
            Some(
                LakeTable::open(
                    name,
                    lake.table_url(name),
                    lake.storage.clone(),
                    &pipeline,
                    cfg.checkpoint_interval,
                )
                .await?,
            )
        };
        Ok(DeltaSink {
            tables,
            stats: SinkStats::default(),
            checkpoint_interval: cfg.checkpoint_interval,
            compact_files: cfg.compact_files,
            compact_target: cfg.compact_target_mb.max(1) * 1024 * 1024,
            lake,
            pipeline,
            collections: HashMap::new(),
            dead_letters: None,
            plugin_state,
        })
    }

    /// Removes what a transaction that was being written in parts when the last run
    /// stopped left behind, before the capture replays it: its rows in change logs, and in
    /// replicas without a key (a keyed replica's merge lands the replay on the same rows).
    /// Only the process that owns the pipeline (it holds the slot) may call this: a reader
    /// or a maintenance command would remove the parts of a transaction in flight.
    pub async fn repair(&mut self) -> Result<(), DeltaError> {
        for t in self.tables.values_mut() {
            // A large transaction staged when the last run stopped: replayed in full.
            t.replica.discard_staged().await?;
            if let Some(log) = t.changes.as_mut() {
                log.discard_staged().await?;
            }
            if let Some(log) = t.changes.as_mut() {
                remove_unfinished_parts(log).await?;
            }
            if t.keyless
                && let (true, Some(v)) = (t.replica.exists(), t.replica.version)
            {
                // Past the position: backfill rows are at it, streamed rows of finished
                // transactions before it.
                t.replica
                    .delete_where(Some(&format!("{LSN} > {}", v.0 as i64)), None)
                    .await?;
            }
        }
        Ok(())
    }

    /// Reads which keys each existing replica holds, for the source tables described in
    /// `tables`, before the stream starts: on a large replica this takes a while (5,000,000
    /// keys: 0.6 s), which would otherwise delay the first changes after a start.
    pub async fn preload_keys(
        &mut self,
        tables: &[crate::relation::TableInfo],
    ) -> Result<(), DeltaError> {
        for info in tables {
            let Some(t) = self.tables.get_mut(&info.oid) else {
                continue;
            };
            let Some(target) = t.replica.arrow_schema() else {
                continue;
            };
            // In column order, as a relation lists its key columns.
            let Ok(mut keys) = info
                .primary_key
                .iter()
                .map(|k| target.index_of(k).map(|i| (i, k.to_string())))
                .collect::<Result<Vec<_>, _>>()
            else {
                continue;
            };
            if keys.is_empty() {
                continue;
            }
            keys.sort();
            let keys: Vec<String> = keys.into_iter().map(|(_, k)| k).collect();
            load_known_keys(&mut t.replica, &keys, &target).await?;
        }
        Ok(())
    }

    /// Waits for every table's checkpoint being written in the background (at the end of
    /// a run, so that it stops with its log complete).
    pub async fn settle(&mut self) -> Result<(), DeltaError> {
        for t in self.every_table_mut() {
            t.settle().await?;
        }
        Ok(())
    }

    fn lake_tables(&self) -> impl Iterator<Item = &LakeTable> {
        self.tables
            .values()
            .flat_map(|t| std::iter::once(&t.replica).chain(t.changes.as_ref()))
            .chain(self.plugin_state.as_ref())
    }

    /// The plugins' saved state (plugin → key → value) and the position it is at; empty
    /// for a fresh start (when it is also cleared).
    pub async fn plugin_state(
        &mut self,
        fresh: bool,
    ) -> Result<(HashMap<String, HashMap<String, Vec<u8>>>, Option<Lsn>), DeltaError> {
        let Some(t) = self.plugin_state.as_mut() else {
            return Ok((HashMap::new(), None));
        };
        if fresh {
            if t.exists() {
                t.delete_all(None).await?;
            }
            return Ok((HashMap::new(), None));
        }
        Ok((collection::load_state(t).await?, t.version))
    }

    async fn open_table(&self, name: &str) -> Result<LakeTable, DeltaError> {
        LakeTable::open(
            name,
            self.lake.table_url(name),
            self.lake.storage.clone(),
            &self.pipeline,
            self.checkpoint_interval,
        )
        .await
    }

    /// The dead-letter table, opened (and cleared of unfinished parts) on first use.
    async fn dead_letters(&mut self) -> Result<&mut LakeTable, DeltaError> {
        if self.dead_letters.is_none() {
            let mut t = self.open_table(collection::DEAD_LETTERS).await?;
            t.discard_staged().await?;
            remove_unfinished_parts(&mut t).await?;
            self.dead_letters = Some(t);
        }
        Ok(self.dead_letters.as_mut().expect("opened above"))
    }

    /// Writes what the plugins made of a batch: outputs into their collections, failures
    /// into the dead-letter table, then (last, so that a crash before it replays the
    /// batch through the plugins) their state, each commit with `position`. Rows that a
    /// table already holds (before its version) are skipped.
    pub async fn write_plugin_batch(
        &mut self,
        outputs: &HashMap<String, Vec<collection::OutputRow>>,
        dead_letters: &[collection::DeadLetter],
        state: &[(String, collection::StateChanges)],
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let mut names: Vec<&String> = outputs.keys().collect();
        names.sort();
        for name in names {
            if !self.collections.contains_key(name.as_str()) {
                let mut t = self.open_table(name).await?;
                t.discard_staged().await?;
                self.collections.insert(name.clone(), t);
            }
            let t = self
                .collections
                .get_mut(name.as_str())
                .expect("opened above");
            // Outputs of a part (of a large transaction, or of a table's copy) are staged
            // until its end: a crash before that leaves none of them, and the part is
            // run through the plugins again.
            if position.is_none() {
                t.stage().await?;
            }
            // Rows the table holds already (a replay) are left out; copied only then.
            let all = &outputs[name];
            let kept: Vec<collection::OutputRow>;
            let rows: &[collection::OutputRow] = match t.version {
                Some(v) if all.iter().any(|r| r.lsn < v) => {
                    kept = all.iter().filter(|r| r.lsn >= v).cloned().collect();
                    &kept
                }
                _ => all,
            };
            if !rows.is_empty() {
                let started = std::time::Instant::now();
                collection::write_collection(t, rows, position).await?;
                self.stats.collection_time += started.elapsed();
                self.stats.collection_rows += rows.len() as u64;
                self.stats.commits += 1;
            }
        }
        if !dead_letters.is_empty() {
            let t = self.dead_letters().await?;
            if position.is_none() {
                t.stage().await?;
            }
            let rows: Vec<collection::DeadLetter> = dead_letters
                .iter()
                .filter(|r| t.version.is_none_or(|v| r.lsn >= v))
                .cloned()
                .collect();
            if !rows.is_empty() {
                collection::write_dead_letters(t, &rows, position).await?;
                self.stats.commits += 1;
            }
        }
        // A large transaction's outputs land before the state that says it was run: a
        // crash in between runs it through the plugins again.
        if position.is_some() {
            for t in self
                .collections
                .values_mut()
                .chain(self.dead_letters.as_mut())
                .filter(|t| t.is_staging())
            {
                t.unstage().await?;
                self.stats.commits += 1;
            }
        }
        if let (Some(t), Some(p)) = (self.plugin_state.as_mut(), position) {
            let started = std::time::Instant::now();
            collection::write_state(t, state, p).await?;
            self.stats.state_time += started.elapsed();
            self.stats.commits += 1;
        }
        Ok(())
    }

    /// Where the capture should start, and the source tables (OIDs) to backfill on the
    /// way: after the lowest position a table holds, backfilling the tables that hold
    /// none (added since) or that a run without them marked (see
    /// [`DeltaSink::mark_detached`]); afresh, backfilling every table, when no table holds one, or
    /// when the plugins' state holds none (plugins added since see every row).
    pub fn resume(&self) -> (Resume, Vec<u32>) {
        let lowest = self.lake_tables().filter_map(|t| t.version).min();
        let state_missing = self
            .plugin_state
            .as_ref()
            .is_some_and(|s| s.version.is_none());
        match lowest {
            Some(lowest) if !state_missing => {
                let mut added: Vec<u32> = self
                    .tables
                    .iter()
                    .filter(|(_, t)| {
                        std::iter::once(&t.replica)
                            .chain(t.changes.as_ref())
                            .any(|lt| lt.version.is_none() || lt.detached())
                    })
                    .map(|(oid, _)| *oid)
                    .collect();
                added.sort_unstable();
                (Resume::After(lowest), added)
            }
            _ => (Resume::Fresh, Vec::new()),
        }
    }

    /// The highest position any table holds: every position weir acknowledged is
    /// recorded in at least one table.
    pub fn highest_position(&self) -> Option<Lsn> {
        self.lake_tables().filter_map(|t| t.version).max()
    }

    /// [`DeltaSink::highest_position`] over every table of the lake this pipeline wrote,
    /// also those no longer configured (a table left out of `source.tables` holds the
    /// positions of the transactions that touched only it).
    pub async fn highest_position_in_lake(&self) -> Result<Option<Lsn>, DeltaError> {
        let mut highest = self.highest_position();
        for t in self.unopened_tables().await? {
            highest = highest.max(t.version);
        }
        Ok(highest)
    }

    /// The lake's tables this sink has not opened (tables of other pipelines, or of
    /// this one that the configuration no longer names).
    async fn unopened_tables(&self) -> Result<Vec<LakeTable>, DeltaError> {
        let open: std::collections::HashSet<&str> =
            self.every_table().map(|t| t.name.as_str()).collect();
        let names =
            crate::query::list_tables(&self.lake)
                .await
                .map_err(|e| DeltaError::Location {
                    url: self.lake.root.to_string(),
                    reason: e.to_string(),
                })?;
        let mut tables = Vec::new();
        for name in names.iter().filter(|n| !open.contains(n.as_str())) {
            tables.push(
                LakeTable::open(
                    name,
                    self.lake.table_url(name),
                    self.lake.storage.clone(),
                    &self.pipeline,
                    self.checkpoint_interval,
                )
                .await?,
            );
        }
        Ok(tables)
    }

    /// Marks the tables this pipeline wrote that this run does not (a source table left
    /// out of `source.tables`, a change log turned off, a plugin removed): from now on
    /// their changes are not captured, so a table configured again later is copied
    /// afresh ([`DeltaSink::resume`] lists it) rather than continued from a position it
    /// no longer follows. Runs before any position past the lake's is acknowledged, by
    /// the process that holds the slot. Returns the tables marked.
    pub async fn mark_detached(&mut self) -> Result<Vec<String>, DeltaError> {
        let mut marked = Vec::new();
        for mut t in self.unopened_tables().await? {
            let Some(v) = t.version else { continue };
            // A source table's replica or change log (both keep the exact values).
            let of_source = t
                .arrow_schema()
                .is_some_and(|s| s.field_with_name(RAW).is_ok());
            if !of_source || t.detached() {
                continue;
            }
            t.set_property(DETACHED_PROPERTY, v.to_string()).await?;
            self.stats.commits += 1;
            marked.push(t.name.clone());
        }
        if !marked.is_empty() {
            tracing::warn!(
                tables = ?marked,
                "lake tables this run does not write (left out of the configuration): \
                 marked, so that if configured again they are copied afresh"
            );
        }
        Ok(marked)
    }

    /// Records an idle position (nothing to write before it) in one table, the one that
    /// stands highest already: one commit, rather than one per table, so that a quiet
    /// pipeline on a busy server acknowledges its way forward cheaply.
    pub async fn record_idle(&mut self, position: Lsn) -> Result<(), DeltaError> {
        let table = self
            .tables
            .values_mut()
            .flat_map(|t| std::iter::once(&mut t.replica).chain(t.changes.as_mut()))
            .filter(|t| t.exists())
            .max_by_key(|t| t.version);
        match table {
            Some(t) if t.version.is_none_or(|v| v < position) => {
                t.commit_position(position).await?;
                self.stats.commits += 1;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Of `tables` (from [`DeltaSink::resume`]), those the lake holds from before (a
    /// replica with a position): copied again, their changes before the copy still
    /// wanted by their change logs.
    pub fn copied_again(&self, tables: &[u32]) -> Vec<u32> {
        tables
            .iter()
            .copied()
            .filter(|oid| {
                self.tables
                    .get(oid)
                    .is_some_and(|t| t.replica.version.is_some())
            })
            .collect()
    }

    /// Each table and the position it holds (`None`: nothing yet).
    pub fn positions(&self) -> Vec<(String, Option<Lsn>)> {
        let mut v: Vec<_> = self
            .lake_tables()
            .map(|t| (t.name.clone(), t.version))
            .collect();
        v.sort();
        v
    }

    /// Records a table's (new) shape; columns it adds are added to its tables at the
    /// next write.
    pub fn schema(&mut self, rel: Arc<Relation>) -> Result<(), DeltaError> {
        let t = self
            .tables
            .get_mut(&rel.oid)
            .ok_or_else(|| DeltaError::UnknownTable {
                table: format!("{}.{}", rel.schema, rel.table),
                oid: rel.oid,
            })?;
        t.display = format!("{}.{}", rel.schema, rel.table);
        // A source column under a name weir writes its own values in.
        let mut reserved = vec![LSN, COMMIT_TS, RAW];
        if t.delete == DeleteMode::Soft {
            reserved.push(DELETED);
        }
        if t.changes.is_some() {
            reserved.extend([OP, TXID, SEQ, SNAPSHOT, BEFORE, UNCHANGED]);
        }
        if let Some(c) = rel.columns.iter().find(|c| reserved.contains(&&*c.name)) {
            return Err(DeltaError::Unplaceable {
                table: t.display.clone(),
                reason: format!(
                    "its column `{}` has the name of a column weir adds to its Delta tables ({}). \
                     Fix: rename the column in PostgreSQL (ALTER TABLE {} RENAME COLUMN \"{}\" TO ...), \
                     or leave the table out of source.tables",
                    c.name,
                    reserved.join(", "),
                    crate::relation::quote_qualified(&rel.schema, &rel.table),
                    c.name.replace('"', "\"\"")
                ),
            });
        }
        t.relation = Some(rel);
        Ok(())
    }

    /// A backfill of `schema.table` starts (afresh: a new slot, a new snapshot): the
    /// replica is emptied, to be rebuilt from the snapshot, and backfill rows an earlier
    /// backfill left in the change log are removed (its streamed history stays).
    pub async fn begin_backfill(&mut self, oid: u32) -> Result<(), DeltaError> {
        let mut source = None;
        if let Some(t) = self.tables.get_mut(&oid) {
            source = Some(t.display.clone());
            t.copying = true;
            // A keyed replica is copied into as it stands: the copy's rows replace theirs
            // key by key and the rows it did not write (gone from the source) go when it
            // completes, so that readers never see it emptied or half-filled. Without a
            // key (rows matched by value, or appended) it is emptied first.
            let keyed = t
                .relation
                .as_deref()
                .is_some_and(|r| has_key(r) && !r.multiset);
            t.in_place = keyed && t.replica.exists();
            if t.in_place {
                tracing::info!(table = %t.replica.name, "copying into the replica as it stands");
            } else if t.replica.exists() {
                tracing::info!(table = %t.replica.name, "emptying the replica for a new backfill");
                t.replica.delete_all(None).await?;
            }
            // The rows of an unfinished copy (past the log's position); an earlier copy's,
            // complete, stay as history.
            if let Some(c) = t.changes.as_mut().filter(|c| c.exists()) {
                let predicate = match c.version {
                    Some(v) => format!("{SNAPSHOT} = true AND {LSN} > {}", v.0 as i64),
                    None => format!("{SNAPSHOT} = true"),
                };
                c.delete_where(Some(&predicate), None).await?;
            }
        }
        // Likewise the dead letters of an earlier backfill of this table.
        if let (Some(source), true) = (source, self.plugin_state.is_some()) {
            let letters = self.dead_letters().await?;
            if letters.exists() {
                let source = source.replace('\'', "''");
                letters
                    .delete_where(
                        Some(&format!("{SNAPSHOT} = true AND source_table = '{source}'")),
                        None,
                    )
                    .await?;
            }
        }
        Ok(())
    }

    /// `weir resync` asked at `lsn` for table `oid` to be copied again: marks it (so that
    /// the copy happens also after a crash) and ends the run with
    /// [`DeltaError::Rewritten`], whose retry copies it alone. A request that a copy
    /// already under way, or finished since, answers is done; one for a table this
    /// pipeline does not capture (any more) is left with a warning.
    pub async fn resync(&mut self, oid: u32, lsn: Lsn) -> Result<(), DeltaError> {
        let Some(t) = self.tables.get_mut(&oid) else {
            tracing::warn!(oid, %lsn, "a resync was asked for a table this pipeline does not capture; nothing to copy");
            return Ok(());
        };
        if t.copying || t.replica.detached() || t.replica.version.is_some_and(|v| v > lsn) {
            return Ok(());
        }
        t.replica
            .set_property(DETACHED_PROPERTY, format!("weir resync at {lsn}"))
            .await?;
        self.stats.commits += 1;
        Err(DeltaError::Rewritten {
            table: t.display.clone(),
            reason: format!("a copy was asked with `weir resync` (at {lsn})"),
        })
    }

    /// Writes `docs` (in source order) to their tables. With a `position`, every table
    /// written records it, in the same commit: the caller may then acknowledge it. Without
    /// one (a part of a backfill), nothing is recorded.
    pub async fn write(
        &mut self,
        docs: &[ChangeDocument],
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let mut by_table: HashMap<u32, Vec<&ChangeDocument>> = HashMap::new();
        for d in docs {
            // Never skipped: a change no table takes stops the write (and with it the
            // acknowledgment of its position).
            if !self.tables.contains_key(&d.source.oid) {
                return Err(DeltaError::UnknownTable {
                    table: format!("{}.{}", d.source.schema, d.source.table),
                    oid: d.source.oid,
                });
            }
            by_table.entry(d.source.oid).or_default().push(d);
        }
        // json and jsonb values are stored as their JSON text, a JSON string with its
        // quotes: the documents of a table with such columns are copied with them as text.
        let mut texts: HashMap<u32, Vec<ChangeDocument>> = HashMap::new();
        for (oid, docs) in &by_table {
            let Some(rel) = self.tables.get(oid).and_then(|t| t.relation.as_ref()) else {
                continue;
            };
            let json: Vec<(&str, &crate::decode::TypeKind)> = rel
                .columns
                .iter()
                .filter(|c| schema::holds_json(&c.kind))
                .map(|c| (&*c.name, &c.kind))
                .collect();
            if json.is_empty() {
                continue;
            }
            // A value whose numbers its parsed form does not hold exactly: its exact text.
            let as_text = |d: &ChangeDocument, row: &crate::document::Row, before: bool| {
                row.iter()
                    .map(|(name, v)| match json.iter().find(|(n, _)| **n == **name) {
                        Some((_, kind)) => {
                            let text = match d.exact_text(before, name) {
                                Some(exact) => schema::exact_json_as_text(kind, exact),
                                None => schema::json_as_text(kind, v),
                            };
                            (name.clone(), text)
                        }
                        None => (name.clone(), v.clone()),
                    })
                    .collect::<crate::document::Row>()
            };
            let copies = docs
                .iter()
                .map(|d| ChangeDocument {
                    op: d.op,
                    columns: as_text(d, &d.columns, false),
                    source: d.source.clone(),
                    before: d.before.as_ref().map(|b| as_text(d, b, true)),
                    unchanged: d.unchanged.clone(),
                    exact: Vec::new(),
                })
                .collect();
            texts.insert(*oid, copies);
        }
        let by_table: HashMap<u32, Vec<&ChangeDocument>> = by_table
            .into_iter()
            .map(|(oid, docs)| match texts.get(&oid) {
                Some(copies) => (oid, copies.iter().collect()),
                None => (oid, docs),
            })
            .collect();
        // A table that PostgreSQL rewrote without sending the rows is copied again: marked
        // (so that the copy happens also after a crash), then the run starts again (see
        // `pipeline::run_with_retries`), before anything of this batch is acknowledged.
        for (key, t) in self.tables.iter_mut() {
            // (Marked already: copied again soon; its changes until then go to its
            // change log, and the copy supersedes them in the replica.)
            if t.copying || t.replica.detached() || !by_table.contains_key(key) {
                continue;
            }
            let Some(reason) = t
                .relation
                .as_deref()
                .and_then(|rel| reshape::rewritten(&t.replica, rel))
            else {
                continue;
            };
            t.replica
                .set_property(DETACHED_PROPERTY, reason.clone())
                .await?;
            self.stats.commits += 1;
            return Err(DeltaError::Rewritten {
                table: t.display.clone(),
                reason,
            });
        }
        // A part of a source transaction too large to hold (not of a backfill, which
        // readers see filling): staged in every table it touches until the transaction
        // ends ([`DeltaSink::close_parts`]).
        if position.is_none() && docs.iter().any(|d| !d.source.snapshot) {
            for (key, t) in self.tables.iter_mut() {
                if by_table.contains_key(key) {
                    t.replica.stage().await?;
                    if let Some(log) = t.changes.as_mut() {
                        log.stage().await?;
                    }
                }
            }
        }
        // Every Delta table is independent: write them all at once.
        let mut writes = Vec::new();
        for (key, t) in self.tables.iter_mut() {
            let Some(docs) = by_table.get(key) else {
                continue;
            };
            let rel = t.relation.clone().ok_or_else(|| DeltaError::NoSchema {
                table: t.display.clone(),
            })?;
            let fresh = |lt: &LakeTable| -> Vec<&ChangeDocument> {
                docs.iter()
                    .copied()
                    .filter(|d| lt.version.is_none_or(|v| d.source.lsn >= v))
                    .collect()
            };
            let for_replica = fresh(&t.replica);
            let for_log = t.changes.as_ref().map(fresh).unwrap_or_default();
            let delete = t.delete;
            let replica = &mut t.replica;
            let changes = t.changes.as_mut();
            let rel2 = rel.clone();
            writes.push(
                async move {
                    let started = std::time::Instant::now();
                    if !for_replica.is_empty() {
                        write_replica(replica, &rel, delete, &for_replica, position).await?;
                    }
                    Ok::<_, DeltaError>((WriteKind::Replica, for_replica.len(), started.elapsed()))
                }
                .boxed(),
            );
            if let Some(changes) = changes {
                writes.push(
                    async move {
                        let started = std::time::Instant::now();
                        if !for_log.is_empty() {
                            write_change_log(changes, &rel2, &for_log, position).await?;
                        }
                        Ok((WriteKind::ChangeLog, for_log.len(), started.elapsed()))
                    }
                    .boxed(),
                );
            }
        }
        for (kind, rows, took) in futures_util::future::try_join_all(writes).await? {
            if rows == 0 {
                continue;
            }
            self.stats.commits += 1;
            match kind {
                WriteKind::Replica => {
                    self.stats.replica_rows += rows as u64;
                    self.stats.replica_time += took;
                }
                WriteKind::ChangeLog => {
                    self.stats.log_rows += rows as u64;
                    self.stats.log_time += took;
                }
            }
        }
        Ok(())
    }

    /// Records `position` in every table that does not hold it yet (the end of a
    /// backfill: also tables that had no rows), creating missing tables; with `only`,
    /// in those source tables' (the backfill of tables added since).
    pub async fn complete(
        &mut self,
        position: Lsn,
        only: Option<&[u32]>,
    ) -> Result<(), DeltaError> {
        for (oid, t) in self.tables.iter_mut() {
            if only.is_some_and(|only| !only.contains(oid)) {
                continue;
            }
            let rel = t.relation.clone();
            let delete = t.delete;
            let replica_fields = rel.as_ref().map(|r| replica_fields(r, delete));
            let log_fields = rel.as_ref().map(|r| change_log_fields(r));
            if let Some(f) = &replica_fields {
                t.replica.ensure_fields(f).await?;
            }
            if let (Some(c), Some(f)) = (t.changes.as_mut(), &log_fields) {
                c.ensure_fields(f).await?;
            }
            if let Some(rel) = &rel {
                reshape::record_shape(&mut t.replica, rel).await?;
            }
            // Every row the source holds at `position` was copied with that position
            // (rows streamed before it that still exist were copied again): the others
            // are gone from the source.
            if t.in_place && t.replica.exists() {
                let stale = format!("({LSN} IS NULL OR {LSN} <> {})", position.0 as i64);
                match delete {
                    DeleteMode::Hard => t.replica.delete_where(Some(&stale), None).await?,
                    DeleteMode::Soft => {
                        t.replica
                            .mark_deleted_where(
                                Some(&format!("NOT {DELETED} AND {stale}")),
                                None,
                                position,
                            )
                            .await?
                    }
                }
                self.stats.commits += 1;
            }
            t.in_place = false;
            t.copying = false;
            for lt in std::iter::once(&mut t.replica).chain(t.changes.as_mut()) {
                if lt.exists() && lt.version.is_none_or(|v| v < position) {
                    lt.commit_position(position).await?;
                }
                // After the position: a crash in between copies the table once more.
                if lt.detached() {
                    lt.set_property(DETACHED_PROPERTY, String::new()).await?;
                }
            }
        }
        Ok(())
    }

    /// Records `position` in every table that took rows without a position since its
    /// last one (parts of a large transaction or of the backfill) and that the write of
    /// `position` did not reach: a transaction's earlier parts may touch tables its last
    /// part does not, and its last part may be empty. Every change before `position` has
    /// been written, so each table is complete up to it.
    pub async fn close_parts(&mut self, position: Lsn) -> Result<(), DeltaError> {
        let mut commits = 0;
        for lt in self.every_table_mut() {
            if lt.open_part && lt.exists() && lt.version.is_none_or(|v| v < position) {
                lt.commit_position(position).await?;
                commits += 1;
            }
        }
        // The staged parts of the transaction that ends here, one commit per table.
        for lt in self.every_table_mut() {
            if lt.is_staging() {
                lt.unstage().await?;
                commits += 1;
            }
        }
        self.stats.commits += commits;
        Ok(())
    }

    /// Every table this sink has open: replicas, change logs, plugin outputs, dead
    /// letters, plugin state.
    fn every_table(&self) -> impl Iterator<Item = &LakeTable> {
        self.tables
            .values()
            .flat_map(|t| std::iter::once(&t.replica).chain(t.changes.as_ref()))
            .chain(self.collections.values())
            .chain(self.dead_letters.as_ref())
            .chain(self.plugin_state.as_ref())
    }

    fn every_table_mut(&mut self) -> Vec<&mut LakeTable> {
        let mut tables: Vec<&mut LakeTable> = Vec::new();
        for t in self.tables.values_mut() {
            tables.push(&mut t.replica);
            tables.extend(t.changes.as_mut());
        }
        tables.extend(self.collections.values_mut());
        tables.extend(self.dead_letters.as_mut());
        tables.extend(self.plugin_state.as_mut());
        tables
    }

    /// Compacts the one table with the most small files, if it has at least
    /// `lake.compact_files` of them (between two writes: one table at a time keeps the
    /// pause short). Compaction changes no data and keeps every position, so it needs no
    /// acknowledgment and cannot double or lose a change.
    pub async fn compact_step(&mut self) -> Result<(), DeltaError> {
        if self.compact_files == 0 {
            return Ok(());
        }
        let target = self.compact_target;
        let min = self.compact_files;
        let Some(t) = self
            .every_table_mut()
            .into_iter()
            .filter(|t| t.exists() && !t.is_staging())
            .map(|t| (t.small_files(target), t))
            .filter(|(n, _)| *n >= min)
            .max_by_key(|(n, _)| *n)
            .map(|(_, t)| t)
        else {
            return Ok(());
        };
        let started = std::time::Instant::now();
        let (removed, added) = t.compact(target).await?;
        tracing::info!(
            table = %t.name,
            removed,
            added,
            ms = started.elapsed().as_millis() as u64,
            "compacted small files"
        );
        self.stats.commits += 1;
        self.stats.compactions += 1;
        Ok(())
    }

    /// Compacts every table; one line per table.
    pub async fn optimize(&mut self) -> Result<Vec<String>, DeltaError> {
        let mut out = Vec::new();
        for t in self.tables.values_mut() {
            for lt in std::iter::once(&mut t.replica).chain(t.changes.as_mut()) {
                if lt.exists() {
                    let done = lt.optimize().await?;
                    out.push(format!("{}: {done}", lt.name));
                }
            }
        }
        Ok(out)
    }

    /// Removes files that no version of the last `retention_hours` uses; one line per
    /// table.
    pub async fn vacuum(&mut self, retention_hours: u64) -> Result<Vec<String>, DeltaError> {
        let mut out = Vec::new();
        for t in self.tables.values_mut() {
            for lt in std::iter::once(&mut t.replica).chain(t.changes.as_mut()) {
                if lt.exists() {
                    let n = lt.vacuum(retention_hours).await?;
                    out.push(format!("{}: {n} files deleted", lt.name));
                }
            }
        }
        Ok(out)
    }
}

/// Removes from an append-only table (a change log, the dead letters) the rows of a
/// transaction that was being written in parts when the last run stopped: streamed rows
/// past the table's position (all of them when it holds none yet), which the capture
/// replays in full. (Replicas and collections need no cleanup: their merge by key makes
/// the replay land the same rows.)
async fn remove_unfinished_parts(table: &mut LakeTable) -> Result<(), DeltaError> {
    if !table.exists() {
        return Ok(());
    }
    // Backfill rows carry the slot's consistent point, which may be the position itself.
    // Files whose `_lsn` statistics end before the position are skipped unread; when
    // nothing matches, no commit is made.
    let predicate = match table.version {
        Some(position) => format!("{LSN} >= {} AND {SNAPSHOT} = false", position.0 as i64),
        None => format!("{SNAPSHOT} = false"),
    };
    table.delete_where(Some(&predicate), None).await
}

fn meta_timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// Columns of a replica: the source's, then `_lsn`, `_commit_ts` (and `_deleted`).
fn replica_fields(rel: &Relation, delete: DeleteMode) -> Vec<Field> {
    let mut fields: Vec<Field> = rel.columns.iter().map(arrow_field).collect();
    fields.push(Field::new(LSN, DataType::Int64, true));
    fields.push(Field::new(COMMIT_TS, meta_timestamp(), true));
    fields.push(Field::new(RAW, DataType::Utf8, true));
    if delete == DeleteMode::Soft {
        fields.push(Field::new(DELETED, DataType::Boolean, true));
    }
    fields
}

/// Columns of a change log: the source's, then the change's metadata.
fn change_log_fields(rel: &Relation) -> Vec<Field> {
    let mut fields: Vec<Field> = rel.columns.iter().map(arrow_field).collect();
    fields.extend([
        Field::new(RAW, DataType::Utf8, true),
        Field::new(OP, DataType::Utf8, true),
        Field::new(LSN, DataType::Int64, true),
        Field::new(TXID, DataType::Int64, true),
        Field::new(COMMIT_TS, meta_timestamp(), true),
        Field::new(SEQ, DataType::Int64, true),
        Field::new(SNAPSHOT, DataType::Boolean, true),
        Field::new(BEFORE, DataType::Utf8, true),
        Field::new(
            UNCHANGED,
            DataType::List(Arc::new(Field::new("element", DataType::Utf8, true))),
            true,
        ),
    ]);
    fields
}

async fn write_replica(
    lt: &mut LakeTable,
    rel: &Relation,
    delete: DeleteMode,
    docs: &[&ChangeDocument],
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    reshape::follow(lt, rel, &replica_fields(rel, delete)).await?;
    reshape::record_shape(lt, rel).await?;
    let target = lt.arrow_schema().ok_or_else(|| DeltaError::Missing {
        table: lt.name.clone(),
    })?;
    let name = lt.name.clone();
    let arrow_err = |source| DeltaError::Arrow {
        table: name.clone(),
        source,
    };
    if rel.multiset {
        return multiset::write(lt, rel, &target, docs, position, delete).await;
    }
    if !has_key(rel) {
        // No key: inserts are appended (PostgreSQL sends no updates or deletes for such
        // tables: they are in the insert-only publication); a truncate empties the table
        // first. Anything else cannot be placed.
        if let Some(d) = docs
            .iter()
            .find(|d| matches!(d.op, Op::Update | Op::Delete))
        {
            return Err(DeltaError::Unplaceable {
                table: format!("{}.{}", rel.schema, rel.table),
                reason: format!(
                    "a change at {} updates or deletes a row, but the table has no key or replica \
                     identity to find it by. Fix: ALTER TABLE {} REPLICA IDENTITY FULL (or add a \
                     primary key), then restart weir",
                    d.source.lsn,
                    crate::relation::quote_qualified(&rel.schema, &rel.table)
                ),
            });
        }
        let last_truncate = docs.iter().rposition(|d| d.op == Op::Truncate);
        let rows: Vec<Map<String, Value>> = docs[last_truncate.map_or(0, |i| i + 1)..]
            .iter()
            .filter(|d| matches!(d.op, Op::Insert | Op::Read))
            .map(|d| {
                let mut row = convert_columns(&d.columns, &target);
                row.insert(LSN.into(), Value::from(d.source.lsn.0 as i64));
                row.insert(COMMIT_TS.into(), Value::from(d.source.ts_ms * 1000));
                row
            })
            .collect();
        if last_truncate.is_some() {
            lt.delete_all(if rows.is_empty() { position } else { None })
                .await?;
        }
        if !rows.is_empty() || last_truncate.is_none() {
            let batch = record_batch(target.clone(), &rows).map_err(arrow_err)?;
            lt.append(batch, position).await?;
        }
        return Ok(());
    }
    if let Some(source) = replica::inserts_only(rel, docs, &target, delete) {
        let (batch, plan) = source.map_err(arrow_err)?;
        return write_merge_source(lt, rel, &target, batch, &plan, position).await;
    }
    let mut reduced = Reduced::default();
    for d in docs {
        reduced.push(rel, d);
    }
    let moved = reduced.needs_stored_values();
    if !moved.is_empty() {
        let keys = replica::key_columns(rel);
        for (id, values) in lt.stored_values(&keys, &moved).await? {
            reduced.set_stored_values(&id, values);
        }
    }
    let has_rows = !reduced.is_empty();
    if let Some((lsn, _)) = reduced.truncated {
        let pos = if has_rows { None } else { position };
        match delete {
            DeleteMode::Hard => lt.delete_all(pos).await?,
            DeleteMode::Soft => lt.mark_all_deleted(pos, Lsn(lsn)).await?,
        }
    }
    if has_rows {
        let (schema, rows, plan) = reduced.into_merge(rel, &target, delete);
        let batch = record_batch(schema, &rows).map_err(arrow_err)?;
        write_merge_source(lt, rel, &target, batch, &plan, position).await?;
    } else if reduced.truncated.is_none()
        && let Some(p) = position
    {
        lt.commit_position(p).await?;
    }
    Ok(())
}

/// Writes a merge source into the replica: rows with keys the table does not hold are
/// appended, the rest merged.
async fn write_merge_source(
    lt: &mut LakeTable,
    rel: &Relation,
    target: &deltalake::arrow::datatypes::SchemaRef,
    batch: deltalake::arrow::record_batch::RecordBatch,
    plan: &replica::MergePlan,
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    let keys = replica::key_columns(rel);
    let (fresh, rest, fresh_hashes) = split_new_keys(lt, &batch, &keys, target).await?;
    let before = lt.delta_version();
    let mut commits = 0;
    if let Some(fresh) = fresh {
        let pos = if rest.num_rows() == 0 { position } else { None };
        lt.append(fresh, pos).await?;
        commits += 1;
    }
    if rest.num_rows() > 0 {
        lt.merge(rest, plan, position).await?;
        commits += 1;
    }
    lt.remember_keys(before, commits, fresh_hashes);
    Ok(())
}

/// Above this many keys a replica stops tracking which keys it holds (the time to read
/// them, and memory: 2.5 bytes per key) and merges every batch.
const MAX_TRACKED_KEYS: usize = 50_000_000;

/// Reads the keys `lt` holds (of the key `columns`, typed as in `target`), unless there
/// are too many to track.
async fn load_known_keys(
    lt: &mut LakeTable,
    keys: &[String],
    target: &deltalake::arrow::datatypes::Schema,
) -> Result<(), DeltaError> {
    let known = lt.row_key_hashes(keys, target).await?;
    lt.known_keys = (known.len() <= MAX_TRACKED_KEYS).then_some(known);
    lt.known_keys_of = keys.to_vec();
    Ok(())
}

/// Splits a replica's merge batch into the upserts of keys the table does not hold (a
/// plain append, in the table's schema) and the rest (to merge), with the new keys'
/// hashes. Rows with unchanged TOAST columns always merge (their stored values matter).
async fn split_new_keys(
    lt: &mut LakeTable,
    batch: &deltalake::arrow::record_batch::RecordBatch,
    keys: &[String],
    target: &deltalake::arrow::datatypes::SchemaRef,
) -> Result<
    (
        Option<deltalake::arrow::record_batch::RecordBatch>,
        deltalake::arrow::record_batch::RecordBatch,
        Vec<table::KeyId>,
    ),
    DeltaError,
> {
    use deltalake::arrow::array::{Array, BooleanArray, StringArray, new_null_array};
    use deltalake::arrow::compute::{cast, filter, filter_record_batch};
    let name = lt.name.clone();
    let arrow = |source| DeltaError::Arrow {
        table: name.clone(),
        source,
    };
    // (Read again when they were read for other key columns: a primary key that changed.)
    if lt.known_keys.is_none() || lt.known_keys_of != keys {
        load_known_keys(lt, keys, target).await?;
    }
    let Some(known) = lt.known_keys.as_ref() else {
        return Ok((None, batch.clone(), Vec::new()));
    };
    let mut key_cols = Vec::new();
    for k in keys {
        let (Some(c), Ok(f)) = (batch.column_by_name(k), target.field_with_name(k)) else {
            return Ok((None, batch.clone(), Vec::new()));
        };
        key_cols.push(cast(c, f.data_type()).map_err(arrow)?);
    }
    let hashes = table::row_keys(&key_cols).map_err(arrow)?;
    let ops = batch
        .column_by_name(replica::OP)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned());
    let unchanged: Vec<BooleanArray> = batch
        .schema()
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.name().starts_with(replica::UNCHANGED_PREFIX))
        .filter_map(|(i, _)| {
            batch
                .column(i)
                .as_any()
                .downcast_ref::<BooleanArray>()
                .cloned()
        })
        .collect();
    let Some(ops) = ops else {
        return Ok((None, batch.clone(), Vec::new()));
    };
    let fresh_mask: BooleanArray = (0..batch.num_rows())
        .map(|i| {
            Some(
                ops.value(i) == "u"
                    && !known.may_contain(hashes[i])
                    && unchanged.iter().all(|u| u.is_null(i) || !u.value(i)),
            )
        })
        .collect();
    if fresh_mask.true_count() == 0 {
        return Ok((None, batch.clone(), Vec::new()));
    }
    let rest_mask = deltalake::arrow::compute::not(&fresh_mask).map_err(arrow)?;
    let rest = filter_record_batch(batch, &rest_mask).map_err(arrow)?;
    let n = fresh_mask.true_count();
    let mut columns = Vec::with_capacity(target.fields().len());
    for f in target.fields() {
        let col = match batch.column_by_name(f.name()) {
            Some(c) => {
                cast(&filter(c, &fresh_mask).map_err(arrow)?, f.data_type()).map_err(arrow)?
            }
            None if f.name() == DELETED => Arc::new(BooleanArray::from(vec![false; n])) as _,
            None => new_null_array(f.data_type(), n),
        };
        columns.push(col);
    }
    let fresh = deltalake::arrow::record_batch::RecordBatch::try_new(target.clone(), columns)
        .map_err(arrow)?;
    let fresh_hashes = hashes
        .iter()
        .zip(fresh_mask.iter())
        .filter(|(_, m)| m.unwrap_or(false))
        .map(|(h, _)| *h)
        .collect();
    Ok((Some(fresh), rest, fresh_hashes))
}

/// A document's columns (or old row) in Arrow's JSON form for the table `target`.
fn convert_columns(
    columns: &crate::document::Row,
    target: &deltalake::arrow::datatypes::Schema,
) -> Map<String, Value> {
    let mut row = Map::with_capacity(columns.len() + 8);
    let mut raw = Map::new();
    for (name, value) in columns {
        if let Ok(f) = target.field_with_name(name) {
            let converted = to_arrow_json(value.clone(), f.data_type());
            if schema::lost(value, &converted) {
                raw.insert(name.to_string(), value.clone());
            }
            row.insert(name.to_string(), converted);
        }
    }
    if !raw.is_empty() && target.field_with_name(RAW).is_ok() {
        row.insert(RAW.into(), Value::String(Value::Object(raw).to_string()));
    }
    row
}

async fn write_change_log(
    lt: &mut LakeTable,
    rel: &Relation,
    docs: &[&ChangeDocument],
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    lt.ensure_fields(&change_log_fields(rel)).await?;
    let target = lt.arrow_schema().ok_or_else(|| DeltaError::Missing {
        table: lt.name.clone(),
    })?;
    let rows: Vec<Map<String, Value>> = docs
        .iter()
        .map(|d| {
            let mut row = convert_columns(&d.columns, &target);
            let op = match d.op {
                Op::Insert => "c",
                Op::Update => "u",
                Op::Delete => "d",
                Op::Read => "r",
                Op::Truncate => "t",
            };
            row.insert(OP.into(), Value::from(op));
            row.insert(LSN.into(), Value::from(d.source.lsn.0 as i64));
            row.insert(TXID.into(), d.source.txid.map_or(Value::Null, Value::from));
            row.insert(COMMIT_TS.into(), Value::from(d.source.ts_ms * 1000));
            row.insert(SEQ.into(), Value::from(d.source.seq));
            row.insert(SNAPSHOT.into(), Value::Bool(d.source.snapshot));
            if let Some(before) = &d.before {
                let obj: Map<String, Value> = before
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                row.insert(BEFORE.into(), Value::String(Value::Object(obj).to_string()));
            }
            if !d.unchanged.is_empty() {
                row.insert(
                    UNCHANGED.into(),
                    Value::Array(d.unchanged.iter().map(|u| Value::from(&**u)).collect()),
                );
            }
            row
        })
        .collect();
    let batch = record_batch(target, &rows).map_err(|source| DeltaError::Arrow {
        table: lt.name.clone(),
        source,
    })?;
    lt.append(batch, position).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store timeout while a Parquet file is uploaded reaches weir wrapped in the
    /// Parquet writer's `io::Error` of kind `Other` (as CI saw it on 2026-12-04): still
    /// transient. A refused key is not.
    #[test]
    fn a_store_timeout_inside_the_parquet_writer_is_transient() {
        use deltalake::logstore::object_store;
        let wrapped = |inner: std::io::Error| DeltaError::Table {
            table: "b_changes".into(),
            action: "appending to".into(),
            source: Box::new(deltalake::DeltaTableError::Parquet {
                source: deltalake::parquet::errors::ParquetError::External(Box::new(
                    std::io::Error::other(object_store::Error::Generic {
                        store: "S3",
                        source: Box::new(inner),
                    }),
                )),
            }),
        };
        assert!(wrapped(std::io::Error::from(std::io::ErrorKind::TimedOut)).is_transient());
        assert!(
            !wrapped(std::io::Error::from(std::io::ErrorKind::PermissionDenied)).is_transient()
        );
    }

    #[test]
    fn lake_debug_shows_no_credentials() {
        let mut lake = Lake::open("s3://bucket/prefix", false).unwrap();
        lake.storage
            .insert("aws_secret_access_key".into(), "very-secret".into());
        let shown = format!("{lake:?}");
        assert!(shown.contains("aws_secret_access_key") && !shown.contains("very-secret"));
        assert_eq!(
            lake.table_url("users").as_str(),
            "s3://bucket/prefix/users/"
        );
    }

    #[test]
    fn table_names_follow_the_source() {
        let mut cfg = LakeConfig::default();
        let t = |name: &str| TableInfo::offline(name, 1);
        assert_eq!(replica_name(&cfg, &t("public.USERS")), "users");
        assert_eq!(replica_name(&cfg, &t("sales.orders")), "sales_orders");
        assert_eq!(replica_name(&cfg, &t("\"Accounts\"")), "Accounts");
        assert_eq!(
            replica_name(&cfg, &t("\"my.app\".\"odd \"\"x\"\"\"")),
            "my_app_odd__x_"
        );
        cfg.tables.insert(
            "public.USERS".into(),
            LakeTableConfig {
                name: Some("people".into()),
                ..Default::default()
            },
        );
        assert_eq!(replica_name(&cfg, &t("public.USERS")), "people");
    }
}
