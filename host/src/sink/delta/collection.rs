//! Tables for what plugins produce: one per output collection (for example
//! `fraud_alerts`), keyed by the key the plugin gives, and one dead-letter table for the
//! documents a plugin failed on.
//!
//! A collection's columns come from its documents: integers become `long`, other numbers
//! `double`, strings `string`, booleans `boolean`, objects and arrays `string` (their
//! JSON); a field seen for the first time adds a column. Every row also has `_key`,
//! `_lsn` (the source commit it came from) and `_commit_ts`. Like the replicas, every
//! commit carries the pipeline's position, so a replay writes nothing twice.

use deltalake::arrow::datatypes::{DataType, Field, TimeUnit};
use serde_json::{Map, Value};

use super::schema::{Cell, JsonRow, record_batch};
use super::table::{LakeTable, key_id};
use super::{COMMIT_TS, DeltaError, LSN};
use crate::json::{JsonObject, RawJson};
use crate::lsn::Lsn;

/// The key column of a collection table.
pub const KEY: &str = "_key";
/// Name of the dead-letter table.
pub const DEAD_LETTERS: &str = "weir_dead_letters";

/// A document a plugin emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputRow {
    /// Its key in the collection (a later row with the same key replaces it).
    pub key: String,
    /// The document (a JSON object).
    pub document: JsonObject,
    /// Commit LSN of the source change it came from.
    pub lsn: Lsn,
    /// Commit time of that change, Unix milliseconds.
    pub ts_ms: i64,
}

/// A document a plugin failed on.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    /// The plugin.
    pub plugin: String,
    /// `rejected`, `trap`, `timeout`, `memory`, `invalid_output`.
    pub kind: String,
    /// The plugin's message or the trap.
    pub error: String,
    /// Commit LSN of the source change.
    pub lsn: Lsn,
    /// Commit time of that change, Unix milliseconds.
    pub ts_ms: i64,
    /// `schema.table` of the change.
    pub source_table: String,
    /// The change document (JSON).
    pub document: String,
    /// Whether the change was a backfill read.
    pub snapshot: bool,
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The column type a JSON value asks for (`None` for null: no evidence).
fn inferred_type(v: RawJson) -> Option<DataType> {
    match v.text().as_bytes().first()? {
        b'n' => None,
        b't' | b'f' => Some(DataType::Boolean),
        b'"' | b'[' | b'{' => Some(DataType::Utf8),
        _ if v.as_i64().is_some() || v.as_u64().is_some() => Some(DataType::Int64),
        _ => Some(DataType::Float64),
    }
}

/// Whether the table's column type `found` takes values inferred as `wanted`.
fn takes(found: &DataType, wanted: &DataType) -> bool {
    match (found, wanted) {
        (DataType::Float64, DataType::Int64) => true,
        (DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8, DataType::Utf8) => true,
        (a, b) => a == b,
    }
}

/// An output row as the collection table's columns: the document's fields, then `_key`,
/// `_lsn` and `_commit_ts` (which win over document fields of the same name).
struct Cells<'a> {
    row: &'a OutputRow,
    key: Value,
    lsn: Value,
    ts: Value,
    /// Per column of the table, where the first row of the batch has it: documents of a
    /// collection mostly share their shape, so that is looked at first.
    places: &'a [usize],
}

impl<'a> Cells<'a> {
    fn of(row: &'a OutputRow, places: &'a [usize]) -> Cells<'a> {
        Cells {
            row,
            key: Value::String(row.key.clone()),
            lsn: Value::from(row.lsn.0 as i64),
            ts: Value::from(row.ts_ms * 1000),
            places,
        }
    }
}

impl JsonRow for Cells<'_> {
    fn field(&self, index: usize, name: &str) -> Option<Cell<'_>> {
        match name {
            KEY => Some(Cell::Value(&self.key)),
            LSN => Some(Cell::Value(&self.lsn)),
            COMMIT_TS => Some(Cell::Value(&self.ts)),
            _ => {
                let place = self.places.get(index).copied().unwrap_or(usize::MAX);
                self.row.document.get_near(name, place).map(Cell::Raw)
            }
        }
    }
}

/// Merges `rows` into the collection table by key, with `position` in the same commit.
pub async fn write_collection(
    table: &mut LakeTable,
    rows: &[OutputRow],
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    // Columns: what the table has, plus what these documents add.
    let existing = table.arrow_schema();
    let mut fields: Vec<Field> = vec![
        Field::new(KEY, DataType::Utf8, true),
        Field::new(LSN, DataType::Int64, true),
        Field::new(COMMIT_TS, timestamp(), true),
    ];
    // (field, inferred type) pairs already checked in this batch: most documents of a
    // collection have the same shape, so each field is checked against the schema once.
    let mut accepted: std::collections::HashSet<(&str, u8)> = Default::default();
    let code = |t: &DataType| match t {
        DataType::Boolean => 0u8,
        DataType::Int64 => 1,
        DataType::Float64 => 2,
        _ => 3,
    };
    for row in rows {
        for (name, value) in row.document.members() {
            let Some(wanted) = inferred_type(value) else {
                continue;
            };
            if !accepted.insert((name, code(&wanted))) {
                continue;
            }
            let known = existing
                .as_ref()
                .and_then(|s| s.field_with_name(name).ok().map(|f| f.data_type().clone()))
                .or_else(|| {
                    fields
                        .iter()
                        .find(|f| f.name() == name)
                        .map(|f| f.data_type().clone())
                });
            match known {
                Some(found) if takes(&found, &wanted) => {}
                Some(DataType::Int64) if wanted == DataType::Float64 => {
                    return Err(DeltaError::IncompatibleSchema {
                        table: table.name.clone(),
                        column: name.to_string(),
                        found: "Int64".into(),
                        expected: format!("{wanted} (the value {})", value.text()),
                    });
                }
                Some(found) => {
                    return Err(DeltaError::IncompatibleSchema {
                        table: table.name.clone(),
                        column: name.to_string(),
                        found: found.to_string(),
                        expected: format!("{wanted} (the value {})", value.text()),
                    });
                }
                None => fields.push(Field::new(name, wanted, true)),
            }
        }
    }
    table.ensure_fields(&fields).await?;
    let target = table.arrow_schema().ok_or_else(|| DeltaError::Missing {
        table: table.name.clone(),
    })?;
    // The last row of each key wins.
    let mut last: std::collections::HashMap<&str, usize> = Default::default();
    for (i, r) in rows.iter().enumerate() {
        last.insert(&r.key, i);
    }
    let mut chosen: Vec<usize> = last.into_values().collect();
    chosen.sort_unstable();
    // Rows whose key the table does not hold yet are appended (cheap, and the common case:
    // an alert per new transaction); the rest are merged by key. The key set is read once
    // and kept up to date with this handle's commits; a commit by another writer in
    // between drops it (read again next time).
    if table.known_keys.is_none() {
        table.known_keys = Some(table.key_hashes(KEY).await?);
    }
    let known = table.known_keys.as_ref().expect("loaded above");
    let places: Vec<usize> = target
        .fields()
        .iter()
        .map(|f| {
            rows.first()
                .and_then(|r| r.document.position(f.name()))
                .unwrap_or(usize::MAX)
        })
        .collect();
    let (fresh, existing): (Vec<Cells>, Vec<Cells>) = chosen
        .into_iter()
        .map(|i| Cells::of(&rows[i], &places))
        .partition(|c| !known.may_contain(key_id(&c.row.key)));
    let fresh_keys: Vec<_> = fresh.iter().map(|c| key_id(&c.row.key)).collect();
    let batch = |rows: &[Cells]| {
        record_batch(target.clone(), rows).map_err(|source| DeltaError::Arrow {
            table: table.name.clone(),
            source,
        })
    };
    let (fresh_batch, existing_batch) = (batch(&fresh)?, batch(&existing)?);
    let columns: Vec<String> = target.fields().iter().map(|f| f.name().clone()).collect();
    let before = table.delta_version();
    let commits = match (fresh.is_empty(), existing.is_empty()) {
        (_, true) => {
            table.append(fresh_batch, position).await?;
            1
        }
        (true, false) => {
            table
                .upsert(existing_batch, KEY, &columns, position)
                .await?;
            1
        }
        (false, false) => {
            table.append(fresh_batch, None).await?;
            table
                .upsert(existing_batch, KEY, &columns, position)
                .await?;
            2
        }
    };
    table.remember_keys(before, commits, fresh_keys);
    Ok(())
}

/// Name of the table holding the plugins' state.
pub const PLUGIN_STATE: &str = "weir_plugin_state";

pub use crate::plugin::StateChanges;

fn state_fields() -> Vec<Field> {
    vec![
        Field::new(KEY, DataType::Utf8, true),
        Field::new("plugin", DataType::Utf8, true),
        Field::new("key", DataType::Utf8, true),
        // base64; NULL once deleted.
        Field::new("value", DataType::Utf8, true),
        // The position the change was recorded with: the latest per key wins.
        Field::new(LSN, DataType::Int64, true),
    ]
}

/// Records the plugins' state changes, with `position` in the same commit: the state is
/// then the plugins' state after every change before it.
///
/// The table is a log (appends are cheap and do not grow with the table, where a merge by
/// key rewrites the files it touches); [`load_state`] keeps the latest value per key.
pub async fn write_state(
    table: &mut LakeTable,
    changes: &[(String, StateChanges)],
    position: Lsn,
) -> Result<(), DeltaError> {
    use base64::Engine as _;
    table.ensure_fields(&state_fields()).await?;
    let target = table.arrow_schema().ok_or_else(|| DeltaError::Missing {
        table: table.name.clone(),
    })?;
    /// One state change as the table's columns.
    struct StateRow([Value; 5]);
    impl JsonRow for StateRow {
        fn field(&self, _: usize, name: &str) -> Option<Cell<'_>> {
            let i = match name {
                KEY => 0,
                "plugin" => 1,
                "key" => 2,
                "value" => 3,
                LSN => 4,
                _ => return None,
            };
            Some(Cell::Value(&self.0[i]))
        }
    }
    let at = Value::from(position.0 as i64);
    let mut rows = Vec::new();
    for (plugin, keys) in changes {
        for (key, value) in keys {
            rows.push(StateRow([
                Value::String(format!("{plugin}\u{1f}{key}")),
                Value::from(plugin.as_str()),
                Value::from(key.as_str()),
                value.as_ref().map_or(Value::Null, |v| {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(v))
                }),
                at.clone(),
            ]));
        }
    }
    if rows.is_empty() {
        return table.commit_position(position).await;
    }
    let batch = record_batch(target, &rows).map_err(|source| DeltaError::Arrow {
        table: table.name.clone(),
        source,
    })?;
    table.append(batch, Some(position)).await
}

/// Reads every plugin's state back: plugin → key → value (the latest recorded per key;
/// rows of the earlier merge-by-key layout, with no position, count as oldest).
pub async fn load_state(
    table: &mut LakeTable,
) -> Result<std::collections::HashMap<String, std::collections::HashMap<String, Vec<u8>>>, DeltaError>
{
    use base64::Engine as _;
    let mut latest: std::collections::HashMap<(String, String), (i64, Option<String>)> =
        Default::default();
    for row in table.rows(None).await? {
        let (Some(plugin), Some(key)) = (
            row.get("plugin").and_then(Value::as_str),
            row.get("key").and_then(Value::as_str),
        ) else {
            continue;
        };
        let at = row.get(LSN).and_then(Value::as_i64).unwrap_or(i64::MIN);
        let value = row.get("value").and_then(Value::as_str).map(str::to_string);
        let slot = latest
            .entry((plugin.to_string(), key.to_string()))
            .or_insert((i64::MIN, None));
        if at >= slot.0 {
            *slot = (at, value);
        }
    }
    let mut out: std::collections::HashMap<String, std::collections::HashMap<String, Vec<u8>>> =
        Default::default();
    for ((plugin, key), (_, value)) in latest {
        let Some(value) = value else { continue };
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(value) {
            out.entry(plugin).or_default().insert(key, bytes);
        }
    }
    Ok(out)
}

/// Columns of the dead-letter table.
pub fn dead_letter_fields() -> Vec<Field> {
    vec![
        Field::new("plugin", DataType::Utf8, true),
        Field::new("kind", DataType::Utf8, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("source_table", DataType::Utf8, true),
        Field::new("document", DataType::Utf8, true),
        Field::new(LSN, DataType::Int64, true),
        Field::new(COMMIT_TS, timestamp(), true),
        Field::new(super::SNAPSHOT, DataType::Boolean, true),
    ]
}

/// Appends dead letters, with `position` in the same commit.
pub async fn write_dead_letters(
    table: &mut LakeTable,
    letters: &[DeadLetter],
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    table.ensure_fields(&dead_letter_fields()).await?;
    let target = table.arrow_schema().ok_or_else(|| DeltaError::Missing {
        table: table.name.clone(),
    })?;
    let rows: Vec<Map<String, Value>> = letters
        .iter()
        .map(|d| {
            let mut m = Map::new();
            m.insert("plugin".into(), Value::from(d.plugin.as_str()));
            m.insert("kind".into(), Value::from(d.kind.as_str()));
            m.insert("error".into(), Value::from(d.error.as_str()));
            m.insert("source_table".into(), Value::from(d.source_table.as_str()));
            m.insert("document".into(), Value::from(d.document.as_str()));
            m.insert(LSN.into(), Value::from(d.lsn.0 as i64));
            m.insert(COMMIT_TS.into(), Value::from(d.ts_ms * 1000));
            m.insert(super::SNAPSHOT.into(), Value::from(d.snapshot));
            m
        })
        .collect();
    let batch = record_batch(target, &rows).map_err(|source| DeltaError::Arrow {
        table: table.name.clone(),
        source,
    })?;
    table.append(batch, position).await
}
