//! One Delta table of the lake: created on first use, its schema grown as the source's
//! grows, and every commit carrying the pipeline's application transaction.

use std::collections::HashMap;
use std::sync::Arc;

use deltalake::arrow::datatypes::{Field, Schema, SchemaRef};
use deltalake::arrow::record_batch::{RecordBatch, RecordBatchOptions};
use deltalake::datafusion::prelude::SessionContext;
use deltalake::kernel::engine::arrow_conversion::TryIntoKernel;
use deltalake::kernel::transaction::{CommitData, CommitProperties, TransactionError};
use deltalake::kernel::{Action, StructField, Transaction};
use deltalake::logstore::CommitOrBytes;
use deltalake::protocol::{DeltaOperation, SaveMode};
use deltalake::writer::{DeltaWriter, RecordBatchWriter};
use deltalake::{DeltaTable, DeltaTableError};

use serde_json::{Map, Value};

use super::replica::{column, quote};
use super::{DeltaError, staging};
use crate::lsn::Lsn;
use deltalake::logstore::object_store::ObjectStoreExt;

/// Reopen a table after this many commits: the in-memory log state grows with every
/// commit and slows the next ones (measured in FINDINGS.md).
const REOPEN_EVERY: u64 = 100;

/// A Delta table weir writes.
pub struct LakeTable {
    /// Folder name, also the name `weir query` shows.
    pub name: String,
    url: url::Url,
    storage: HashMap<String, String>,
    /// `None` until created.
    table: Option<DeltaTable>,
    /// Application id of this pipeline's transactions in this table.
    app_id: String,
    /// Source position up to which the table is complete (from its last txn action).
    pub version: Option<Lsn>,
    /// Rows were committed without a position (a part of a large transaction or of the
    /// backfill) since the table last recorded one: the next position the pipeline
    /// reaches must be recorded here too, even if that write has nothing for this table
    /// ([`super::DeltaSink::close_parts`]); else a restart would take the finished
    /// transaction's rows for unfinished ones.
    pub open_part: bool,
    checkpoint_interval: u64,
    commits_since_open: u64,
    /// The log's latest version as this handle knows it, its own quick commits included:
    /// `table`'s snapshot lags behind after those (see [`LakeTable::quick_commit`]) and is
    /// brought up to date before anything reads it ([`LakeTable::fresh`]).
    head: Option<u64>,
    /// Whether the loaded table allows quick commits, and its checkpoint interval.
    quick: Option<u64>,
    /// For replicas and keyed collections: every key in the table ([`KeySet`]), so that rows with new
    /// keys are appended instead of merged (see `collection::write_collection`).
    pub known_keys: Option<KeySet>,
    /// The key columns `known_keys` was read for.
    pub known_keys_of: Vec<String>,
    /// The checkpoint being written in the background, and of which version.
    checkpointing: Option<(u64, tokio::task::JoinHandle<Result<(), DeltaTableError>>)>,
    /// While the parts of a source transaction are staged ([`LakeTable::stage`]): the
    /// table as its readers see it. `table` is then the staged one.
    staged: Option<Staged>,
}

/// The table as readers see it while its writes are staged (see `staging.rs`).
struct Staged {
    /// Its last version when staging began (`None`: it did not exist).
    base: Option<u64>,
    /// Its handle then.
    table: Option<DeltaTable>,
    /// Its position then.
    version: Option<Lsn>,
}

/// What a key set records of one key: integer keys (the common case: `bigserial` ids,
/// and collection keys that are integers as text) exactly, anything else by its hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyId {
    /// An integer key (two's complement for negative ones).
    Int(u64),
    /// The hash of any other key.
    Hash(u64),
}

/// The keys a table may hold. Integer keys are kept exactly, in a compressed bitmap
/// (`roaring`: 5,000,000 consecutive ids in well under 1 MiB). Other keys go into a Bloom
/// filter over their hashes: a key it has never been given is reported absent almost
/// always (about 1% of them are reported present and merely take the slower merge), a key
/// it was given never; ten bits per key of capacity, 5,000,000 keys in 6 MiB where a hash
/// set takes 70.
///
/// Exactness matters for large tables: every key reported present in a batch sends the
/// batch's rest to a MERGE, which reads the target table (heaptrack on a 1,000,000-row
/// transaction into a table keyed by text: merges of the Bloom filter's few false
/// positives made 165 MB of its 285 MB heap peak).
pub struct KeySet {
    ints: roaring::RoaringTreemap,
    /// Bloom filter bits (empty until the first hashed key).
    bits: Vec<u64>,
    /// Hashed keys it is sized for; past that it is read again, larger.
    capacity: usize,
    /// Hashed keys inserted.
    hashed: usize,
}

impl KeySet {
    const HASHES: u64 = 7;

    /// An empty set with room for `capacity` hashed keys (at least 1,048,576: 1.25 MiB,
    /// allocated with the first hashed key).
    pub fn with_capacity(capacity: usize) -> KeySet {
        KeySet {
            ints: roaring::RoaringTreemap::new(),
            bits: Vec::new(),
            capacity: capacity.max(1 << 20),
            hashed: 0,
        }
    }

    fn positions(&self, hash: u64) -> impl Iterator<Item = usize> + use<> {
        let mask = (self.bits.len() * 64 - 1) as u64;
        let (h1, h2) = (hash & 0xffff_ffff, (hash >> 32) | 1);
        (0..Self::HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    /// Adds a key.
    pub fn insert(&mut self, key: KeyId) {
        match key {
            KeyId::Int(v) => {
                self.ints.insert(v);
            }
            KeyId::Hash(hash) => {
                if self.bits.is_empty() {
                    self.bits = vec![0; (self.capacity * 10).next_power_of_two() / 64];
                }
                for p in self.positions(hash) {
                    self.bits[p / 64] |= 1 << (p % 64);
                }
                self.hashed += 1;
            }
        }
    }

    /// False only for a key never inserted (and for integer keys, exactly whether it was).
    pub fn may_contain(&self, key: KeyId) -> bool {
        match key {
            KeyId::Int(v) => self.ints.contains(v),
            KeyId::Hash(_) if self.bits.is_empty() => false,
            KeyId::Hash(hash) => self
                .positions(hash)
                .all(|p| self.bits[p / 64] & (1 << (p % 64)) != 0),
        }
    }

    /// Whether `more` keys still fit in what it was sized for.
    pub fn has_room_for(&self, more: &[KeyId]) -> bool {
        let hashed = more.iter().filter(|k| matches!(k, KeyId::Hash(_))).count();
        self.hashed + hashed <= self.capacity
    }

    /// Keys inserted.
    pub fn len(&self) -> usize {
        self.ints.len() as usize + self.hashed
    }

    /// Whether nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A set of `keys`, with room for as many hashed ones again.
    #[cfg(test)]
    fn of(keys: &[KeyId]) -> KeySet {
        let mut builder = KeySetBuilder::default();
        builder.extend(keys.iter().copied());
        builder.finish()
    }
}

/// Gathers a table's keys for a [`KeySet`]: integers straight into the set, hashes
/// until their count (which sizes the filter) is known.
#[derive(Default)]
struct KeySetBuilder {
    ints: roaring::RoaringTreemap,
    hashes: Vec<u64>,
}

impl KeySetBuilder {
    fn extend(&mut self, keys: impl IntoIterator<Item = KeyId>) {
        for k in keys {
            match k {
                KeyId::Int(v) => {
                    self.ints.insert(v);
                }
                KeyId::Hash(h) => self.hashes.push(h),
            }
        }
    }

    /// The set, with room for as many hashed keys again.
    fn finish(self) -> KeySet {
        let mut set = KeySet::with_capacity(self.hashes.len() * 2);
        set.ints = self.ints;
        for h in self.hashes {
            set.insert(KeyId::Hash(h));
        }
        set
    }
}

/// What a key set records of each row of the key `columns` (in Arrow form): one integer
/// column gives its values; anything else the hashes of the rows, equal values of equal
/// types hashing alike, whether they come from a batch or from the table.
pub fn row_keys(
    columns: &[deltalake::arrow::array::ArrayRef],
) -> Result<Vec<KeyId>, deltalake::arrow::error::ArrowError> {
    use deltalake::arrow::array::Array;
    use deltalake::arrow::datatypes::DataType;
    use deltalake::arrow::row::{RowConverter, SortField};
    use std::hash::{Hash, Hasher};
    if let [column] = columns
        && column.null_count() == 0
        && matches!(
            column.data_type(),
            DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64
        )
    {
        let ints = deltalake::arrow::compute::cast(column, &DataType::Int64)?;
        let ints = ints
            .as_any()
            .downcast_ref::<deltalake::arrow::array::Int64Array>()
            .expect("cast to Int64");
        return Ok(ints
            .values()
            .iter()
            .map(|&v| KeyId::Int(v as u64))
            .collect());
    }
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )?;
    let rows = converter.convert_columns(columns)?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut h = std::hash::DefaultHasher::new();
            r.as_ref().hash(&mut h);
            KeyId::Hash(h.finish())
        })
        .collect())
}

/// What `LakeTable::known_keys` holds for a collection's (text) key: an integer as text
/// as that integer (two spellings of one integer, "7" and "07", then share it: a false
/// "present", which only costs a merge), anything else by its hash.
pub fn key_id(key: &str) -> KeyId {
    use std::hash::{Hash, Hasher};
    match key.parse::<i64>() {
        Ok(v) => KeyId::Int(v as u64),
        Err(_) => {
            let mut h = std::hash::DefaultHasher::new();
            key.hash(&mut h);
            KeyId::Hash(h.finish())
        }
    }
}

impl LakeTable {
    /// Opens the table at `url` if it exists, reading this pipeline's version.
    pub async fn open(
        name: &str,
        url: url::Url,
        storage: HashMap<String, String>,
        pipeline: &str,
        checkpoint_interval: u64,
    ) -> Result<LakeTable, DeltaError> {
        let app_id = format!("weir:{pipeline}:{name}");
        let mut t = LakeTable {
            name: name.to_string(),
            url,
            storage,
            table: None,
            app_id,
            version: None,
            open_part: false,
            checkpoint_interval,
            commits_since_open: 0,
            head: None,
            quick: None,
            known_keys: None,
            known_keys_of: Vec::new(),
            checkpointing: None,
            staged: None,
        };
        t.reload().await?;
        Ok(t)
    }

    /// The folder of a local table.
    fn local_dir(&self) -> Option<std::path::PathBuf> {
        (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()
    }

    async fn reload(&mut self) -> Result<(), DeltaError> {
        self.commits_since_open = 0;
        let log = if self.staged.is_some() {
            format!("{}/_delta_log", staging::STAGING_DIR)
        } else {
            "_delta_log".to_string()
        };
        let staged_base = self.staged.as_ref().is_some_and(|s| s.base.is_some());
        if self.local_dir().is_some_and(|d| {
            !(d.join(&log).is_dir() || staged_base && d.join("_delta_log").is_dir())
        }) {
            self.table = None;
            self.head = None;
            return Ok(());
        }
        let mut table = self.unloaded("opening")?;
        match table.load().await {
            Ok(()) => {
                let version = table
                    .snapshot()
                    .map_err(|e| self.err("reading", e))?
                    .transaction_version(table.log_store().as_ref(), &self.app_id)
                    .await
                    .map_err(|e| self.err("reading the application transaction of", e))?;
                self.version = version.map(|v| Lsn(v as u64));
                self.loaded(table);
            }
            Err(DeltaTableError::NotATable(_)) => self.table = None,
            Err(e) => return Err(self.err("opening", e)),
        }
        self.commits_since_open = 0;
        Ok(())
    }

    /// Takes `table` (just loaded or just written by deltalake) as the current state.
    fn loaded(&mut self, table: DeltaTable) {
        self.head = table.version();
        self.quick = quick_commits(&table);
        self.table = Some(table);
    }

    /// Brings the table's snapshot up to the log's head after quick commits, before
    /// anything reads it or builds on it.
    async fn fresh(&mut self) -> Result<(), DeltaError> {
        match self.table.as_ref() {
            Some(table) if table.version() != self.head => self.update().await,
            _ => Ok(()),
        }
    }

    /// Reads the log's commits since the table's snapshot.
    async fn update(&mut self) -> Result<(), DeltaError> {
        let Some(table) = self.table.as_mut() else {
            return Ok(());
        };
        if let Err(e) = table.update_state().await {
            return Err(self.err("reading", e));
        }
        let table = self.table.take().expect("checked above");
        self.loaded(table);
        self.commits_since_open += 1;
        Ok(())
    }

    /// The table, not loaded yet, on weir's log store (`engine.rs`); while staging, on
    /// the staged log (`staging.rs`).
    fn unloaded(&self, action: &str) -> Result<DeltaTable, DeltaError> {
        let store = self.log_store(action)?;
        let store = match &self.staged {
            Some(staged) => {
                let config = store.config();
                deltalake::logstore::default_logstore(
                    Arc::new(staging::StagedLog::new(
                        store.object_store(None),
                        staged.base,
                    )),
                    Arc::new(staging::StagedLog::new(
                        store.root_object_store(None),
                        staged.base,
                    )),
                    config.location(),
                    config.options(),
                )
            }
            None => store,
        };
        Ok(DeltaTable::new(super::engine::lean(store)))
    }

    /// The table's own log store (what its readers use).
    fn log_store(&self, action: &str) -> Result<deltalake::logstore::LogStoreRef, DeltaError> {
        deltalake::DeltaTableBuilder::from_url(self.url.clone())
            .map_err(|e| self.err(action, e))?
            .with_storage_options(self.storage.clone())
            .build_storage()
            .map_err(|e| self.err(action, e))
    }

    fn err(&self, action: &str, source: DeltaTableError) -> DeltaError {
        DeltaError::Table {
            table: self.name.clone(),
            action: action.to_string(),
            source: Box::new(source),
        }
    }

    /// Whether the table exists.
    pub fn exists(&self) -> bool {
        self.table.is_some()
    }

    /// The table's Arrow schema (`None` before it exists).
    pub fn arrow_schema(&self) -> Option<SchemaRef> {
        let table = self.table.as_ref()?;
        Some(table.snapshot().ok()?.snapshot().arrow_schema())
    }

    /// Creates the table with `fields` when missing; adds the fields it lacks when it
    /// exists. A field whose type differs from the table's is an error naming both.
    pub async fn ensure_fields(&mut self, fields: &[Field]) -> Result<(), DeltaError> {
        let Some(schema) = self.arrow_schema() else {
            return self.create(fields).await;
        };
        let mut missing = Vec::new();
        let mut widened = Vec::new();
        for f in fields {
            match schema.field_with_name(f.name()) {
                Ok(existing) if compatible(existing.data_type(), f.data_type()) => {}
                Ok(existing) if widens(existing.data_type(), f.data_type()) => {
                    widened.push(f.clone());
                }
                Ok(existing) => {
                    return Err(DeltaError::IncompatibleSchema {
                        table: self.name.clone(),
                        column: f.name().clone(),
                        found: format!("{}", existing.data_type()),
                        expected: format!("{}", f.data_type()),
                    });
                }
                Err(_) => missing.push(f.clone()),
            }
        }
        if !widened.is_empty() {
            self.widen(&widened).await?;
        }
        if missing.is_empty() {
            return Ok(());
        }
        let kernel: Vec<StructField> = missing
            .iter()
            .map(|f| f.try_into_kernel())
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("converting the schema of", e.into()))?;
        self.fresh().await?;
        let table = self.table.take().expect("checked above");
        let names: Vec<String> = missing.iter().map(|f| f.name().clone()).collect();
        match table.add_columns().with_fields(kernel).await {
            Ok(table) => {
                tracing::info!(table = %self.name, columns = ?names, "added columns");
                self.loaded(table);
                Ok(())
            }
            Err(e) => {
                let err = self.err("adding columns to", e);
                self.reload().await?;
                Err(err)
            }
        }
    }

    async fn create(&mut self, fields: &[Field]) -> Result<(), DeltaError> {
        let kernel: Vec<StructField> = fields
            .iter()
            .map(|f| f.try_into_kernel())
            .collect::<Result<_, _>>()
            .map_err(|e| self.err("converting the schema of", e.into()))?;
        if let Some(dir) = self.local_dir() {
            std::fs::create_dir_all(&dir).map_err(|e| {
                self.err(
                    "creating",
                    DeltaTableError::Generic(format!("{}: {e}", dir.display())),
                )
            })?;
        }
        let table = self
            .unloaded("creating")?
            .create()
            .with_table_name(self.name.clone())
            .with_columns(kernel)
            .with_configuration_property(
                deltalake::TableProperty::CheckpointInterval,
                Some(self.checkpoint_interval.to_string()),
            )
            .with_save_mode(SaveMode::ErrorIfExists)
            .await;
        match table {
            Ok(table) => {
                tracing::info!(table = %self.name, url = %self.url, "created Delta table");
                self.loaded(table);
                Ok(())
            }
            // Someone created it meanwhile: use theirs (after checking its schema).
            Err(e) => {
                self.reload().await?;
                if self.table.is_some() {
                    Box::pin(self.ensure_fields(fields)).await
                } else {
                    Err(self.err("creating", e))
                }
            }
        }
    }

    fn properties(&self, position: Option<Lsn>) -> CommitProperties {
        let props = CommitProperties::default()
            .with_cleanup_expired_logs(Some(false))
            .with_max_retries(10);
        match position {
            Some(p) => {
                props.with_application_transaction(Transaction::new(&self.app_id, p.0 as i64))
            }
            None => props,
        }
    }

    /// Rewrites the table with `columns` widened to their new types (`ALTER COLUMN TYPE`
    /// in the source: `integer` to `bigint`, a wider `numeric`, ...), in one commit that
    /// keeps the table's position. Delta readers see the new types from that version on.
    async fn widen(&mut self, columns: &[Field]) -> Result<(), DeltaError> {
        use deltalake::datafusion::prelude::{Expr, cast};
        use deltalake::operations::write::SchemaMode;
        let table = self.take().await?;
        let reading = |e: deltalake::datafusion::error::DataFusionError| DeltaTableError::from(e);
        let plan = async {
            let ctx = SessionContext::new();
            table.update_datafusion_session(&ctx.state())?;
            let schema = table.snapshot()?.snapshot().arrow_schema();
            let exprs: Vec<Expr> = schema
                .fields()
                .iter()
                .map(|f| {
                    let c = Expr::Column(column(f.name()));
                    match columns.iter().find(|w| w.name() == f.name()) {
                        Some(w) => cast(c, w.data_type().clone()).alias(f.name()),
                        None => c,
                    }
                })
                .collect();
            let df = ctx
                .read_table(table.table_provider().await?)
                .map_err(reading)?
                .select(exprs)
                .map_err(reading)?;
            Ok::<_, DeltaTableError>(df.logical_plan().clone())
        }
        .await;
        let plan = match plan {
            Ok(p) => p,
            Err(e) => return self.failed("reading", e).await,
        };
        let result = table
            .write(Vec::new())
            .with_input_plan(plan)
            .with_save_mode(SaveMode::Overwrite)
            .with_schema_mode(SchemaMode::Overwrite)
            .with_commit_properties(self.properties(self.version))
            .await;
        match result {
            Ok(table) => {
                let names: Vec<&String> = columns.iter().map(|f| f.name()).collect();
                tracing::warn!(table = %self.name, columns = ?names, "widened columns to the source's new types (table rewritten)");
                self.loaded(table);
                Ok(())
            }
            Err(e) => self.failed("widening columns of", e).await,
        }
    }

    /// A table property (`None` when unset or before the table exists).
    pub fn property(&self, key: &str) -> Option<String> {
        let snapshot = self.table.as_ref()?.snapshot().ok()?;
        snapshot.metadata().configuration().get(key).cloned()
    }

    /// Whether a run that left this table out of its configuration marked it (see
    /// `DeltaSink::mark_detached`): its position no longer says what it holds.
    pub fn detached(&self) -> bool {
        self.property(super::DETACHED_PROPERTY)
            .is_some_and(|p| !p.is_empty())
    }

    /// Sets a table property (keeps the position).
    pub async fn set_property(&mut self, key: &str, value: String) -> Result<(), DeltaError> {
        let table = self.take().await?;
        let result = table
            .set_tbl_properties()
            .with_properties(HashMap::from([(key.to_string(), value)]))
            .with_raise_if_not_exists(false)
            .with_commit_properties(self.properties(self.version))
            .await;
        match result {
            Ok(table) => {
                self.loaded(table);
                Ok(())
            }
            Err(e) => self.failed("setting a property of", e).await,
        }
    }

    /// Sets columns of every row to expressions over the row (one rewrite, one commit
    /// that keeps the position).
    pub async fn update_every_row(
        &mut self,
        sets: Vec<(String, deltalake::datafusion::prelude::Expr)>,
        // Column names as they are (no case folding, no dots read as nesting).
    ) -> Result<(), DeltaError> {
        if sets.is_empty() {
            return Ok(());
        }
        let table = self.take().await?;
        let mut builder = table
            .update()
            .with_commit_properties(self.properties(self.version));
        for (name, expr) in sets {
            builder = builder.with_update(column(&name), expr);
        }
        match builder.await {
            Ok((table, _)) => {
                self.loaded(table);
                Ok(())
            }
            Err(e) => self.failed("updating the rows of", e).await,
        }
    }

    /// The table, up to date, for an operation that consumes it.
    async fn take(&mut self) -> Result<DeltaTable, DeltaError> {
        // deltalake's own commits may checkpoint too: ours is written first.
        self.settle().await?;
        self.fresh().await?;
        self.table.take().ok_or_else(|| DeltaError::Missing {
            table: self.name.clone(),
        })
    }

    /// After an operation: record the table and, when the operation made no commit (it
    /// had nothing to change), commit the position alone so the version still moves.
    async fn finish(
        &mut self,
        before: Option<deltalake::kernel::Version>,
        table: DeltaTable,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let committed = table.version() != before;
        self.loaded(table);
        if let Some(p) = position {
            if !committed {
                self.commit_position(p).await?;
            }
            self.version = Some(p);
            self.open_part = false;
        } else if committed {
            self.open_part = true;
        }
        self.commits_since_open += 1;
        if self.commits_since_open >= REOPEN_EVERY {
            self.reload().await?;
        }
        Ok(())
    }

    /// Records `position` with no data (a commit with only the txn action).
    pub async fn commit_position(&mut self, position: Lsn) -> Result<(), DeltaError> {
        if self.quick.is_some() {
            return self.quick_commit(Vec::new(), Some(position)).await;
        }
        // A table with features weir does not write itself: through deltalake.
        let table = self.take().await?;
        let result =
            deltalake::kernel::transaction::CommitBuilder::from(self.properties(Some(position)))
                .build(
                    Some(table.snapshot().map_err(|e| self.err("reading", e))?),
                    table.log_store(),
                    DeltaOperation::Write {
                        mode: SaveMode::Append,
                        partition_by: None,
                        predicate: None,
                    },
                )
                .await;
        self.table = Some(table);
        result.map_err(|e| self.err("committing to", e))?;
        self.version = Some(position);
        self.open_part = false;
        self.update().await
    }

    /// Appends `batch` and records `position` in the same commit.
    pub async fn append(
        &mut self,
        batch: RecordBatch,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        if let Some(batch) = self.quick_batch(&batch) {
            return self.quick_append(batch, position).await;
        }
        let table = self.take().await?;
        let before = table.version();
        let result = table
            .write(vec![batch])
            .with_save_mode(SaveMode::Append)
            .with_commit_properties(self.properties(position))
            .await;
        match result {
            Ok(table) => self.finish(before, table, position).await,
            Err(e) => self.failed("appending to", e).await,
        }
    }

    /// `batch` in the table's schema when it can take the quick path (see [`conform`]).
    fn quick_batch(&self, batch: &RecordBatch) -> Option<RecordBatch> {
        self.quick?;
        conform(batch, &self.arrow_schema()?)
    }

    /// Appends through a commit weir writes itself ([`LakeTable::quick_commit`]): the
    /// Parquet file by deltalake's `RecordBatchWriter`, with the same statistics as a
    /// `write` operation.
    async fn quick_append(
        &mut self,
        batch: RecordBatch,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let table = self.table.as_ref().ok_or_else(|| DeltaError::Missing {
            table: self.name.clone(),
        })?;
        let written = async {
            let mut writer = RecordBatchWriter::for_table(table)?;
            writer.write(batch).await?;
            writer.flush().await
        }
        .await;
        let adds = written.map_err(|e| self.err("appending to", e))?;
        self.quick_commit(adds.into_iter().map(Action::Add).collect(), position)
            .await
    }

    /// Commits `actions` (adds only: a blind append) with `position`, writing the log entry
    /// itself instead of through deltalake's transaction: deltalake replays the log after
    /// every commit to refresh the table's state (parsing the statistics of every file:
    /// ~60% of a small commit's cost, growing with the table), which appends do not need.
    /// The state is refreshed once, when something reads it ([`LakeTable::fresh`]);
    /// checkpoints are written at the table's interval as deltalake writes them.
    async fn quick_commit(
        &mut self,
        actions: Vec<Action>,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let operation = DeltaOperation::Write {
            mode: SaveMode::Append,
            partition_by: None,
            predicate: None,
        };
        let txns = position
            .map(|p| vec![Transaction::new(&self.app_id, p.0 as i64)])
            .unwrap_or_default();
        let bytes = CommitData::new(actions, operation, HashMap::new(), txns)
            .get_bytes()
            .map_err(|e| self.err("committing to", e.into()))?;
        let mut attempts = 0;
        let version = loop {
            let (Some(table), Some(head)) = (self.table.as_ref(), self.head) else {
                return Err(DeltaError::Missing {
                    table: self.name.clone(),
                });
            };
            let entry = CommitOrBytes::LogBytes(bytes.clone());
            match table
                .log_store()
                .write_commit_entry(head + 1, entry, uuid::Uuid::new_v4())
                .await
            {
                Ok(()) => break head + 1,
                // Another writer committed that version: an append conflicts with nothing
                // of another pipeline, so it takes the next one, unless that writer was
                // this pipeline (a second weir, or a stale handle: its position moved) or
                // changed the table's protocol.
                Err(TransactionError::VersionAlreadyExists(v)) if attempts < 10 => {
                    // Ours: the store wrote it, its reply was lost, and the store client
                    // sent it again (taken for someone else's, it would be written twice).
                    let ours = table
                        .log_store()
                        .read_commit_entry(v)
                        .await
                        .ok()
                        .flatten()
                        .is_some_and(|written| written == bytes);
                    if v == head + 1 && ours {
                        tracing::warn!(table = %self.name, version = v, "a commit's reply was lost; the commit is in the log");
                        break v;
                    }
                    attempts += 1;
                    self.update().await?;
                    let table = self.table.as_ref().expect("fresh keeps the table");
                    let theirs = table
                        .snapshot()
                        .map_err(|e| self.err("reading", e))?
                        .transaction_version(table.log_store().as_ref(), &self.app_id)
                        .await
                        .map_err(|e| self.err("reading the application transaction of", e))?
                        .map(|v| Lsn(v as u64));
                    let detail = if theirs != self.version {
                        format!("version {v} moved this pipeline's position to {theirs:?}")
                    } else if self.quick.is_none() {
                        format!("version {v} changed the table's protocol")
                    } else {
                        continue;
                    };
                    return Err(DeltaError::Concurrent {
                        table: self.name.clone(),
                        detail,
                    });
                }
                Err(e) => return Err(self.err("committing to", e.into())),
            }
        };
        self.head = Some(version);
        match position {
            Some(p) => {
                self.version = Some(p);
                self.open_part = false;
            }
            None => self.open_part = true,
        }
        // (A staged log is not checkpointed: it ends in one commit of the table.)
        if let Some(interval) = self.quick
            && (version + 1).is_multiple_of(interval)
            && self.staged.is_none()
        {
            self.start_checkpoint(version).await?;
        }
        Ok(())
    }

    /// Starts writing the checkpoint of `version` (with the kernel, as deltalake's
    /// post-commit hook does, without loading the table's state) in the background: on a
    /// table of thousands of files it takes 100-200 ms, which the next commits need not
    /// wait for (they did: at 5,000 tx/s, a quarter of the writer's time). One at a time:
    /// the one before is waited for first, and a failure is reported there or at
    /// [`LakeTable::settle`].
    async fn start_checkpoint(&mut self, version: u64) -> Result<(), DeltaError> {
        self.settle().await?;
        let Some(table) = self.table.as_ref() else {
            return Ok(());
        };
        let log_store = table.log_store();
        let root = log_store
            .transaction_url(None)
            .map_err(|e| self.err("checkpointing", e))?;
        let engine = log_store.engine(None);
        let name = self.name.clone();
        let task = tokio::task::spawn_blocking(move || -> Result<(), DeltaTableError> {
            let started = std::time::Instant::now();
            let snapshot = delta_kernel::Snapshot::builder_for(root.as_str())
                .at_version(version)
                .build(engine.as_ref())?;
            snapshot.checkpoint(engine.as_ref(), None)?;
            tracing::debug!(table = %name, version, ms = started.elapsed().as_millis() as u64, "checkpoint written");
            Ok(())
        });
        self.checkpointing = Some((version, task));
        Ok(())
    }

    /// Waits for the checkpoint being written in the background, if any; its failure is
    /// this table's error.
    pub async fn settle(&mut self) -> Result<(), DeltaError> {
        let Some((version, task)) = self.checkpointing.take() else {
            return Ok(());
        };
        let written: Result<(), DeltaTableError> = match task.await {
            Ok(r) => r,
            Err(e) => Err(DeltaTableError::Generic(e.to_string())),
        };
        written.map_err(|e| self.err(&format!("writing checkpoint {version} of"), e))
    }

    async fn failed<T>(&mut self, action: &str, e: DeltaTableError) -> Result<T, DeltaError> {
        let err = match e {
            DeltaTableError::Transaction { .. } if e.to_string().contains("oncurrent") => {
                DeltaError::Concurrent {
                    table: self.name.clone(),
                    detail: e.to_string(),
                }
            }
            e => self.err(action, e),
        };
        // The operation consumed the table: open it again so the next call can retry.
        self.reload().await?;
        Err(err)
    }

    /// Deletes every row (hard) and records `position` in the same commit.
    pub async fn delete_all(&mut self, position: Option<Lsn>) -> Result<(), DeltaError> {
        self.delete_where(None, position).await
    }

    /// Deletes the rows matching `predicate` (SQL; every row without one) and records
    /// `position` in the same commit.
    pub async fn delete_where(
        &mut self,
        predicate: Option<&str>,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let table = self.take().await?;
        let before = table.version();
        let mut builder = table
            .delete()
            .with_commit_properties(self.properties(position));
        if let Some(p) = predicate {
            builder = builder.with_predicate(p.to_string());
        }
        let result = builder.await;
        match result {
            Ok((table, _)) => self.finish(before, table, position).await,
            Err(e) => self.failed("deleting from", e).await,
        }
    }

    /// The rows matching `filter` (SQL over the table's columns), as Arrow batches; none
    /// for a table not created yet.
    pub async fn batches_where(&mut self, filter: &str) -> Result<Vec<RecordBatch>, DeltaError> {
        self.fresh().await?;
        let Some(table) = self.table.as_ref() else {
            return Ok(Vec::new());
        };
        self.query(table, &format!("SELECT * FROM t WHERE {filter}"))
            .await
    }

    /// Replaces the rows matching `predicate` (SQL) with `batches` (every row of which
    /// must match it) and records `position`, all in one commit.
    pub async fn replace_where(
        &mut self,
        predicate: &str,
        batches: Vec<RecordBatch>,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let table = self.take().await?;
        let before = table.version();
        let result = table
            .write(batches)
            .with_save_mode(SaveMode::Overwrite)
            .with_replace_where(predicate.to_string())
            .with_commit_properties(self.properties(position))
            .await;
        match result {
            Ok(table) => self.finish(before, table, position).await,
            Err(e) => self.failed("replacing rows of", e).await,
        }
    }

    /// Sets `_deleted = true` on every row (a soft truncate).
    pub async fn mark_all_deleted(
        &mut self,
        position: Option<Lsn>,
        lsn: Lsn,
    ) -> Result<(), DeltaError> {
        self.mark_deleted_where(None, position, lsn).await
    }

    /// Sets `_deleted = true` and `_lsn = lsn` on the rows matching `predicate` (SQL;
    /// every row without one), recording `position` in the same commit.
    pub async fn mark_deleted_where(
        &mut self,
        predicate: Option<&str>,
        position: Option<Lsn>,
        lsn: Lsn,
    ) -> Result<(), DeltaError> {
        let table = self.take().await?;
        let before = table.version();
        let mut builder = table.update();
        if let Some(p) = predicate {
            builder = builder.with_predicate(p.to_string());
        }
        let result = builder
            .with_update(super::DELETED, "true")
            .with_update(super::LSN, format!("CAST({} AS BIGINT)", lsn.0 as i64))
            .with_commit_properties(self.properties(position))
            .await;
        match result {
            Ok((table, _)) => self.finish(before, table, position).await,
            Err(e) => self.failed("updating", e).await,
        }
    }

    /// Merges `source` into the table by `key` (see [`super::replica`] for the clauses)
    /// and records `position` in the same commit.
    pub async fn merge(
        &mut self,
        source: RecordBatch,
        plan: &super::replica::MergePlan,
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let ctx = SessionContext::new();
        let df = ctx
            .read_batch(source)
            .map_err(|e| self.err("preparing a merge into", e.into()))?;
        let table = self.take().await?;
        let before = table.version();
        let builder = table
            .merge(df, plan.predicate.clone())
            .with_source_alias("source")
            .with_target_alias("target")
            .with_commit_properties(self.properties(position));
        let result = match plan.apply(builder) {
            Ok(b) => b.await,
            Err(e) => Err(e),
        };
        match result {
            Ok((table, _)) => self.finish(before, table, position).await,
            Err(e) => self.failed("merging into", e).await,
        }
    }

    /// Reads stored values: for each `(id, key row, columns)`, the named columns of the
    /// row whose `key_columns` equal the key row's (compared as text), in Arrow's JSON
    /// form. Rows not found are left out.
    pub async fn stored_values(
        &mut self,
        key_columns: &[String],
        wanted: &[(String, Map<String, Value>, Vec<String>)],
    ) -> Result<Vec<(String, Map<String, Value>)>, DeltaError> {
        self.fresh().await?;
        let Some(table) = self.table.as_ref() else {
            return Ok(Vec::new());
        };
        let text = |v: &Value| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        let literal = |s: &str| format!("'{}'", s.replace('\'', "''"));
        let mut select = vec!["*".to_string()];
        for (i, k) in key_columns.iter().enumerate() {
            select.push(format!("CAST({} AS VARCHAR) AS __weir_k{i}", quote(k)));
        }
        let conditions: Vec<String> = wanted
            .iter()
            .map(|(_, key_row, _)| {
                let parts: Vec<String> = key_columns
                    .iter()
                    .map(|k| {
                        let v = key_row.get(k).map(text).unwrap_or_default();
                        format!("CAST({} AS VARCHAR) = {}", quote(k), literal(&v))
                    })
                    .collect();
                format!("({})", parts.join(" AND "))
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM t WHERE {}",
            select.join(", "),
            conditions.join(" OR ")
        );
        let rows = self.query_json(table, &sql).await?;
        let mut out = Vec::new();
        for (id, key_row, columns) in wanted {
            let want: Vec<String> = key_columns
                .iter()
                .map(|k| key_row.get(k).map(text).unwrap_or_default())
                .collect();
            let found = rows.iter().find(|r| {
                (0..key_columns.len())
                    .all(|i| r.get(&format!("__weir_k{i}")).map(text).as_ref() == Some(&want[i]))
            });
            if let Some(r) = found {
                let values = columns
                    .iter()
                    .filter_map(|c| r.get(c).map(|v| (c.clone(), v.clone())))
                    .collect();
                out.push((id.clone(), values));
            }
        }
        Ok(out)
    }

    /// Replaces rows by `key` (inserting new keys) with the rows of `source`, which has
    /// `columns`; records `position` in the same commit.
    pub async fn upsert(
        &mut self,
        source: RecordBatch,
        key: &str,
        columns: &[String],
        position: Option<Lsn>,
    ) -> Result<(), DeltaError> {
        let ctx = SessionContext::new();
        let df = ctx
            .read_batch(source)
            .map_err(|e| self.err("preparing a merge into", e.into()))?;
        let table = self.take().await?;
        let before = table.version();
        let k = quote(key);
        let result = async {
            table
                .merge(df, format!("target.{k} = source.{k}"))
                .with_source_alias("source")
                .with_target_alias("target")
                .with_commit_properties(self.properties(position))
                .when_matched_update(|mut u| {
                    for c in columns {
                        u = u.update(column(c), format!("source.{}", quote(c)));
                    }
                    u
                })?
                .when_not_matched_insert(|mut i| {
                    for c in columns {
                        i = i.set(column(c), format!("source.{}", quote(c)));
                    }
                    i
                })?
                .await
        }
        .await;
        match result {
            Ok((table, _)) => self.finish(before, table, position).await,
            Err(e) => self.failed("merging into", e).await,
        }
    }

    /// The Delta version of the table as this handle last saw or wrote it.
    pub fn delta_version(&self) -> Option<u64> {
        self.head
    }

    /// Adds the keys of rows just appended to the key set, when the table went from version
    /// `before` to `before + commits` by this handle's commits alone; a commit by another
    /// writer in between (or a set grown too large) drops the set, to be read again.
    pub fn remember_keys(&mut self, before: Option<u64>, commits: u64, fresh: Vec<KeyId>) {
        let ours = matches!((before, self.delta_version()), (Some(b), Some(a)) if a == b + commits);
        match (&mut self.known_keys, ours) {
            (Some(known), true) if known.has_room_for(&fresh) => {
                fresh.into_iter().for_each(|k| known.insert(k))
            }
            _ => self.known_keys = None,
        }
    }

    /// The keys ([`row_keys`]) of every row of the key `columns`, each cast to its type in
    /// `schema`. Read batch by batch, into the set: the key column is never held whole.
    pub async fn row_key_hashes(
        &mut self,
        columns: &[String],
        schema: &Schema,
    ) -> Result<KeySet, DeltaError> {
        let list: Vec<String> = columns.iter().map(|c| quote(c)).collect();
        let name = self.name.clone();
        let arrow = |source| DeltaError::Arrow {
            table: name.clone(),
            source,
        };
        let mut keys = KeySetBuilder::default();
        let started = std::time::Instant::now();
        self.for_each_batch(&format!("SELECT {} FROM t", list.join(", ")), |b| {
            let mut cols = Vec::new();
            for (i, name) in columns.iter().enumerate() {
                let ty = schema.field_with_name(name).map_err(arrow)?.data_type();
                cols.push(deltalake::arrow::compute::cast(b.column(i), ty).map_err(arrow)?);
            }
            keys.extend(row_keys(&cols).map_err(arrow)?);
            Ok(())
        })
        .await?;
        let keys = keys.finish();
        tracing::info!(table = %self.name, keys = keys.len(), ms = started.elapsed().as_millis() as u64, "read the keys the table holds");
        Ok(keys)
    }

    /// The keys ([`key_id`]) of every value of the string column `column`.
    pub async fn key_hashes(&mut self, column: &str) -> Result<KeySet, DeltaError> {
        use deltalake::arrow::array::{Array, StringArray};
        let name = self.name.clone();
        let mut keys = KeySetBuilder::default();
        self.for_each_batch(&format!("SELECT {} FROM t", quote(column)), |b| {
            let col = deltalake::arrow::compute::cast(
                b.column(0),
                &deltalake::arrow::datatypes::DataType::Utf8,
            )
            .map_err(|source| DeltaError::Arrow {
                table: name.clone(),
                source,
            })?;
            if let Some(values) = col.as_any().downcast_ref::<StringArray>() {
                keys.extend(values.iter().flatten().map(key_id));
            }
            Ok(())
        })
        .await?;
        Ok(keys.finish())
    }

    /// Runs `sql` over the table (registered as `t`), handing each result batch to `f` as
    /// it is read; nothing for a table not created yet.
    async fn for_each_batch(
        &mut self,
        sql: &str,
        mut f: impl FnMut(&RecordBatch) -> Result<(), DeltaError>,
    ) -> Result<(), DeltaError> {
        use futures_util::StreamExt as _;
        self.fresh().await?;
        let Some(table) = self.table.as_ref() else {
            return Ok(());
        };
        let reading =
            |e: deltalake::datafusion::error::DataFusionError| self.err("reading", e.into());
        let mut stream = self
            .frame(table, sql)
            .await?
            .execute_stream()
            .await
            .map_err(reading)?;
        while let Some(batch) = stream.next().await {
            f(&batch.map_err(reading)?)?;
        }
        Ok(())
    }

    /// Every row matching `filter` (SQL over the table's columns; all rows without one),
    /// as JSON objects in Arrow's JSON form. For small tables (plugin state).
    pub async fn rows(
        &mut self,
        filter: Option<&str>,
    ) -> Result<Vec<Map<String, Value>>, DeltaError> {
        self.fresh().await?;
        let Some(table) = self.table.as_ref() else {
            return Ok(Vec::new());
        };
        let sql = match filter {
            Some(f) => format!("SELECT * FROM t WHERE {f}"),
            None => "SELECT * FROM t".to_string(),
        };
        self.query_json(table, &sql).await
    }

    /// Runs `sql` over `table` (registered as `t`).
    async fn query(&self, table: &DeltaTable, sql: &str) -> Result<Vec<RecordBatch>, DeltaError> {
        self.frame(table, sql)
            .await?
            .collect()
            .await
            .map_err(|e| self.err("reading", e.into()))
    }

    /// `sql` over `table` (registered as `t`), planned, not run.
    async fn frame(
        &self,
        table: &DeltaTable,
        sql: &str,
    ) -> Result<deltalake::datafusion::dataframe::DataFrame, DeltaError> {
        let ctx = SessionContext::new();
        let reading =
            |e: deltalake::datafusion::error::DataFusionError| self.err("reading", e.into());
        table
            .update_datafusion_session(&ctx.state())
            .map_err(|e| self.err("reading", e))?;
        let provider = table
            .table_provider()
            .await
            .map_err(|e| self.err("reading", e.into()))?;
        ctx.register_table("t", provider).map_err(reading)?;
        ctx.sql(sql).await.map_err(reading)
    }

    /// Runs `sql` over `table` (registered as `t`); rows as JSON objects in Arrow's JSON
    /// form.
    async fn query_json(
        &self,
        table: &DeltaTable,
        sql: &str,
    ) -> Result<Vec<Map<String, Value>>, DeltaError> {
        let batches = self.query(table, sql).await?;
        let arrow = |source| DeltaError::Arrow {
            table: self.name.clone(),
            source,
        };
        let mut writer = deltalake::arrow::json::ArrayWriter::new(Vec::new());
        for b in &batches {
            writer.write(b).map_err(arrow)?;
        }
        writer.finish().map_err(arrow)?;
        let bytes = writer.into_inner();
        Ok(if bytes.is_empty() {
            Vec::new()
        } else {
            serde_json::from_slice(&bytes).unwrap_or_default()
        })
    }

    /// About how many of the table's files are smaller than `target` bytes: those of its
    /// snapshot, and one per quick commit since (each adds a file or two of one write).
    pub fn small_files(&self, target: u64) -> usize {
        let Some(table) = self.table.as_ref() else {
            return 0;
        };
        let Some(snapshot) = table.snapshot().ok() else {
            return 0;
        };
        let since = match (self.head, table.version()) {
            (Some(head), Some(seen)) => head.saturating_sub(seen) as usize,
            _ => 0,
        };
        since
            + snapshot
                .log_data()
                .iter()
                .filter(|f| (f.size() as u64) < target)
                .count()
    }

    /// Compacts the files smaller than `target` bytes into files of about that size, in
    /// one commit that changes no data and keeps the position (readers see the same rows
    /// before and after). Returns the files removed and added.
    pub async fn compact(&mut self, target: u64) -> Result<(u64, u64), DeltaError> {
        self.fresh().await?;
        let table = self.take().await?;
        let target = std::num::NonZeroU64::new(target.max(1)).expect("at least 1");
        match table
            .optimize()
            .with_target_size(target)
            .with_max_concurrent_tasks(1)
            .await
        {
            Ok((table, metrics)) => {
                self.loaded(table);
                Ok((metrics.num_files_removed, metrics.num_files_added))
            }
            Err(e) => self.failed("compacting", e).await,
        }
    }

    /// Runs `optimize` (compaction) and returns what it did.
    pub async fn optimize(&mut self) -> Result<String, DeltaError> {
        let table = self.take().await?;
        match table.optimize().await {
            Ok((table, metrics)) => {
                self.loaded(table);
                Ok(format!(
                    "{} files added, {} removed",
                    metrics.num_files_added, metrics.num_files_removed
                ))
            }
            Err(e) => self.failed("compacting", e).await,
        }
    }

    /// Runs `vacuum` (removes files no version within `retention_hours` uses).
    pub async fn vacuum(&mut self, retention_hours: u64) -> Result<usize, DeltaError> {
        let table = self.take().await?;
        match table
            .vacuum()
            .with_retention_period(chrono::Duration::hours(retention_hours as i64))
            .with_enforce_retention_duration(false)
            .await
        {
            Ok((table, metrics)) => {
                self.loaded(table);
                Ok(metrics.files_deleted.len())
            }
            Err(e) => self.failed("vacuuming", e).await,
        }
    }

    /// Whether writes go to the staged log ([`LakeTable::stage`]).
    pub fn is_staging(&self) -> bool {
        self.staged.is_some()
    }

    /// From now on, until [`LakeTable::unstage`], commits go to a staged log over the
    /// table's files (see `staging.rs`): readers of the table see none of them.
    pub async fn stage(&mut self) -> Result<(), DeltaError> {
        if self.staged.is_some() {
            return Ok(());
        }
        self.settle().await?;
        self.fresh().await?;
        // A table with writer features weir does not write itself (see `quick_commits`)
        // might need more in a commit than netted actions: its parts land as they come.
        if self.table.as_ref().is_some_and(|t| !plain_features(t)) {
            return Ok(());
        }
        self.staged = Some(Staged {
            base: self.head,
            table: self.table.take(),
            version: self.version,
        });
        // The staged table starts as the table: its state, on the staged log.
        let staged = match self.unloaded("staging") {
            Ok(t) => t,
            Err(e) => {
                self.restore_staged();
                return Err(e);
            }
        };
        let state = self
            .staged
            .as_ref()
            .and_then(|s| s.table.as_ref()?.state.clone());
        if let Some(state) = state {
            let mut staged = staged;
            staged.state = Some(state);
            self.loaded(staged);
        }
        tracing::debug!(table = %self.name, base = ?self.head, "staging a large transaction");
        Ok(())
    }

    /// Back to the table as its readers see it, the staged commits dropped.
    fn restore_staged(&mut self) {
        if let Some(staged) = self.staged.take() {
            self.table = None;
            self.head = staged.base;
            self.quick = None;
            self.version = staged.version;
            if let Some(table) = staged.table {
                self.loaded(table);
            }
        }
    }

    /// Commits what was staged since [`LakeTable::stage`] as one commit of the table
    /// (its position included: the staged commits carry it), then drops the staged log.
    pub async fn unstage(&mut self) -> Result<(), DeltaError> {
        let Some(base) = self.staged.as_ref().map(|s| s.base) else {
            return Ok(());
        };
        self.settle().await?;
        let first = base.map_or(0, |b| b + 1);
        let head = self.head;
        let staged_store = self.table.as_ref().map(|t| t.log_store());
        let mut commits = Vec::new();
        if let (Some(store), Some(head)) = (&staged_store, head) {
            for v in first..=head {
                let entry = store
                    .read_commit_entry(v)
                    .await
                    .map_err(|e| self.err("reading the staged log of", e))?;
                commits.push(entry.ok_or_else(|| {
                    self.err(
                        "reading the staged log of",
                        DeltaTableError::Generic(format!("staged version {v} is missing")),
                    )
                })?);
            }
        }
        let version = self.version;
        self.restore_staged();
        if !commits.is_empty() {
            let netted = staging::net_commits(&commits, "WRITE").map_err(|reason| {
                self.err(
                    "committing the staged log of",
                    DeltaTableError::Generic(reason),
                )
            })?;
            let store = self.log_store("committing to")?;
            let bytes = bytes::Bytes::from(netted.bytes);
            match store
                .write_commit_entry(
                    first,
                    CommitOrBytes::LogBytes(bytes.clone()),
                    uuid::Uuid::new_v4(),
                )
                .await
            {
                Ok(()) => {}
                // Its reply lost and sent again by the store's client: ours is there.
                Err(TransactionError::VersionAlreadyExists(v))
                    if store.read_commit_entry(v).await.ok().flatten().as_ref() == Some(&bytes) => {
                }
                Err(TransactionError::VersionAlreadyExists(v)) => {
                    return Err(DeltaError::Concurrent {
                        table: self.name.clone(),
                        detail: format!(
                            "version {v} was written by another writer while a large transaction                              was staged on version {base:?}"
                        ),
                    });
                }
                Err(e) => return Err(self.err("committing to", e.into())),
            }
            tracing::info!(
                table = %self.name,
                version = first,
                staged_commits = commits.len(),
                adds = netted.adds,
                removes = netted.removes,
                "a large transaction's parts committed at once"
            );
            self.head = Some(first);
            self.version = version;
            match self.table.is_some() {
                true => self.update().await?,
                false => self.reload().await?,
            }
            self.remove_staged_files(&netted.orphans).await;
        } else {
            self.remove_staged_files(&[]).await;
        }
        Ok(())
    }

    /// Deletes the staged log and the files `orphans` (staged, then removed again: in no
    /// version). Best effort: what is left is unreferenced, and dropped at the next start.
    async fn remove_staged_files(&self, orphans: &[String]) {
        let Ok(store) = self.log_store("cleaning") else {
            return;
        };
        let store = store.object_store(None);
        let mut paths: Vec<deltalake::Path> = orphans
            .iter()
            .filter_map(|p| deltalake::Path::from_url_path(p).ok())
            .collect();
        let staged: Vec<deltalake::ObjectMeta> = {
            use futures_util::TryStreamExt;
            store
                .list(Some(&deltalake::Path::from(staging::STAGING_DIR)))
                .try_collect()
                .await
                .unwrap_or_default()
        };
        paths.extend(staged.into_iter().map(|m| m.location));
        // In batches where the store has them (S3: up to 1,000 keys a request).
        let deleted: Vec<_> = {
            use futures_util::StreamExt;
            let locations = futures_util::stream::iter(paths.into_iter().map(Ok)).boxed();
            store.delete_stream(locations).collect().await
        };
        for e in deleted.into_iter().filter_map(Result::err) {
            if !matches!(e, deltalake::ObjectStoreError::NotFound { .. }) {
                tracing::warn!(table = %self.name, error = %e, "could not delete a staged file");
            }
        }
        if let Some(dir) = self.local_dir() {
            let _ = std::fs::remove_dir_all(dir.join(staging::STAGING_DIR));
        }
    }

    /// Drops what a run that stopped while staging left (see `staging.rs`): the staged
    /// log, and the files it added that no version of the table holds. Returns whether
    /// there was any. Only the process that owns the pipeline may call this.
    pub async fn discard_staged(&mut self) -> Result<bool, DeltaError> {
        use futures_util::TryStreamExt;
        let store = self.log_store("cleaning")?;
        let objects = store.object_store(None);
        let listed: Vec<deltalake::ObjectMeta> = objects
            .list(Some(&deltalake::Path::from(staging::STAGING_DIR)))
            .try_collect()
            .await
            .map_err(|e| self.err("listing the staged log of", e.into()))?;
        if listed.is_empty() {
            return Ok(false);
        }
        let mut versions: Vec<u64> = Vec::new();
        let mut commits = Vec::new();
        for m in &listed {
            let Some(name) = m.location.filename() else {
                continue;
            };
            if let (Some(v), true) = (staging::log_version(name), name.ends_with(".json")) {
                let read = async { objects.get(&m.location).await?.bytes().await };
                let bytes = read
                    .await
                    .map_err(|e| self.err("reading the staged log of", e.into()))?;
                versions.push(v);
                commits.push(bytes);
            }
        }
        let mut added = staging::added_paths(&commits);
        // The staged commits ended in one commit of the table right after their base
        // when that commit is there: its files stay.
        if let Some(first) = versions.iter().min()
            && let Some(entry) = store
                .read_commit_entry(*first)
                .await
                .map_err(|e| self.err("reading", e))?
        {
            for kept in staging::added_paths(&[entry]) {
                added.remove(&kept);
            }
        }
        let orphans: Vec<String> = added.into_iter().collect();
        tracing::info!(table = %self.name, files = orphans.len(), "dropping what a stopped run had staged");
        self.remove_staged_files(&orphans).await;
        Ok(true)
    }
}

/// `batch` in the table's `schema`, for a quick append: its columns by name, a nullable
/// column it lacks as nulls. `None` when that is not enough (a column of another type or
/// not in the table, nulls in a non-nullable column): the regular `write` then applies its
/// own rules and errors.
fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Option<RecordBatch> {
    let batch_schema = batch.schema();
    if batch_schema
        .fields()
        .iter()
        .any(|f| schema.field_with_name(f.name()).is_err())
    {
        return None;
    }
    let rows = batch.num_rows();
    let mut columns = Vec::with_capacity(schema.fields().len());
    for field in schema.fields() {
        match batch.column_by_name(field.name()) {
            Some(c) if c.data_type() == field.data_type() => columns.push(c.clone()),
            None if field.is_nullable() => columns.push(deltalake::arrow::array::new_null_array(
                field.data_type(),
                rows,
            )),
            _ => return None,
        }
    }
    let options = RecordBatchOptions::new().with_row_count(Some(rows));
    RecordBatch::try_new_with_options(schema.clone(), columns, &options).ok()
}

/// Whether weir may write `table`'s appends as its own commits (its checkpoint interval
/// then), which is when such a commit needs nothing but add actions and the txn action:
/// the writer features, if any, are among those an append need not act on, no column
/// carries an invariant, no CHECK constraint, no in-commit timestamps, and the log store
/// takes a commit as bytes (a conditional put; not the DynamoDB-locked S3 store).
fn quick_commits(table: &DeltaTable) -> Option<u64> {
    use deltalake::table::config::TablePropertiesExt;
    if !["DefaultLogStore", "LakeFSLogStore"].contains(&table.log_store().name().as_str()) {
        return None;
    }
    plain_features(table)
        .then(|| {
            Some(
                table
                    .snapshot()
                    .ok()?
                    .table_config()
                    .checkpoint_interval()
                    .get(),
            )
        })
        .flatten()
}

/// Whether the table has no writer features a commit weir writes itself would have to
/// honour (constraints, invariants, in-commit timestamps, ...).
fn plain_features(table: &DeltaTable) -> bool {
    const HARMLESS: [&str; 3] = ["appendOnly", "timestampNtz", "deletionVectors"];
    let Some(snapshot) = table.snapshot().ok() else {
        return false;
    };
    let Some(protocol) = serde_json::to_value(snapshot.protocol()).ok() else {
        return false;
    };
    let Some(writer_version) = protocol.get("minWriterVersion").and_then(Value::as_i64) else {
        return false;
    };
    let features_ok = match protocol.get("writerFeatures").and_then(Value::as_array) {
        Some(features) => features
            .iter()
            .all(|f| f.as_str().is_some_and(|f| HARMLESS.contains(&f))),
        None => writer_version <= 2,
    };
    let config = snapshot.metadata().configuration();
    let constrained = config
        .keys()
        .any(|k| k.starts_with("delta.constraints.") || k == "delta.enableInCommitTimestamps");
    let invariants = snapshot
        .snapshot()
        .arrow_schema()
        .fields()
        .iter()
        .any(|f| f.metadata().contains_key("delta.invariants"));
    features_ok && !constrained && !invariants
}

/// Whether a column of type `found` in the table can take values of type `expected`.
fn compatible(
    found: &deltalake::arrow::datatypes::DataType,
    expected: &deltalake::arrow::datatypes::DataType,
) -> bool {
    use deltalake::arrow::datatypes::DataType as T;
    match (found, expected) {
        (T::List(a), T::List(b)) | (T::LargeList(a), T::List(b)) => {
            compatible(a.data_type(), b.data_type())
        }
        (T::Utf8 | T::LargeUtf8 | T::Utf8View, T::Utf8) => true,
        (T::Binary | T::LargeBinary | T::BinaryView, T::Binary) => true,
        (T::Timestamp(_, a), T::Timestamp(_, b)) => a.is_some() == b.is_some(),
        (a, b) => a == b,
    }
}

/// Whether a column of type `from` can take the values of `to` after a rewrite that
/// casts each value exactly: a wider integer or float, a decimal with at least as many
/// digits before and after the point, or a decimal becoming text (`numeric` without
/// precision).
fn widens(
    from: &deltalake::arrow::datatypes::DataType,
    to: &deltalake::arrow::datatypes::DataType,
) -> bool {
    use deltalake::arrow::datatypes::DataType as T;
    match (from, to) {
        (T::Int16, T::Int32 | T::Int64) | (T::Int32, T::Int64) | (T::Float32, T::Float64) => true,
        (T::Int16 | T::Int32 | T::Int64, T::Decimal128(p, s)) => {
            let digits = match from {
                T::Int16 => 5,
                T::Int32 => 10,
                _ => 19,
            };
            i16::from(*p) - i16::from(*s) >= digits
        }
        (T::Decimal128(p1, s1), T::Decimal128(p2, s2)) => {
            s2 >= s1 && i16::from(*p2) - i16::from(*s2) >= i16::from(*p1) - i16::from(*s1)
        }
        (T::Decimal128(..), T::Utf8) => true,
        _ => false,
    }
}

/// A schema made of `fields`.
pub fn schema_of(fields: Vec<Field>) -> SchemaRef {
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::{KeyId, KeySet, key_id, row_keys};

    #[test]
    fn a_key_set_never_forgets_a_key_and_rarely_invents_one() {
        let text = |i: u32| key_id(&format!("k{i}"));
        let mut set = KeySet::of(&(0..100_000).map(text).collect::<Vec<_>>());
        assert_eq!(set.len(), 100_000);
        let more = |n: usize| vec![KeyId::Hash(0); n];
        assert!(set.has_room_for(&more((1 << 20) - 100_000)));
        assert!(!set.has_room_for(&more((1 << 20) - 99_999)));
        for i in 100_000..150_000 {
            set.insert(text(i));
        }
        assert!((0..150_000).all(|i| set.may_contain(text(i))));
        let invented = (150_000..250_000)
            .filter(|&i| set.may_contain(text(i)))
            .count();
        // Ten bits and seven hashes per key of capacity: about 1% at capacity, less below.
        assert!(
            invented < 1_500,
            "{invented} of 100,000 absent keys reported present"
        );
    }

    #[test]
    fn integer_keys_are_kept_exactly_and_take_no_room() {
        // Collection keys that are integers as text, and integer key columns, agree.
        assert_eq!(key_id("42"), KeyId::Int(42));
        assert_eq!(key_id("-3"), KeyId::Int(-3i64 as u64));
        assert!(matches!(key_id("tx-42"), KeyId::Hash(_)));
        let column: deltalake::arrow::array::ArrayRef =
            std::sync::Arc::new(deltalake::arrow::array::Int32Array::from(vec![42, -3]));
        assert_eq!(
            row_keys(&[column]).unwrap(),
            [KeyId::Int(42), KeyId::Int(-3i64 as u64)]
        );

        let mut set = KeySet::of(&(0..2_000_000).map(KeyId::Int).collect::<Vec<_>>());
        for i in (4_000_000..6_000_000).step_by(2) {
            set.insert(KeyId::Int(i));
        }
        assert_eq!(set.len(), 3_000_000);
        assert!(set.has_room_for(&vec![KeyId::Int(0); 10_000_000]));
        assert!((0..2_000_000).all(|i| set.may_contain(KeyId::Int(i))));
        assert!((2_000_000..4_000_000).all(|i| !set.may_contain(KeyId::Int(i))));
        assert!(
            (4_000_000..6_000_000).all(|i| set.may_contain(KeyId::Int(i)) == (i % 2 == 0)),
            "exact: no absent key reported present"
        );
        assert!(set.bits.is_empty(), "no Bloom filter without hashed keys");
    }
}
