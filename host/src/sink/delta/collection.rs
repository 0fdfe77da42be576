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

use super::schema::record_batch;
use super::table::LakeTable;
use super::{COMMIT_TS, DeltaError, LSN};
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
    pub document: Value,
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
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The column type a JSON value asks for (`None` for null: no evidence).
fn inferred_type(v: &Value) -> Option<DataType> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some(DataType::Boolean),
        Value::Number(n) if n.is_i64() || n.is_u64() => Some(DataType::Int64),
        Value::Number(_) => Some(DataType::Float64),
        Value::String(_) | Value::Array(_) | Value::Object(_) => Some(DataType::Utf8),
    }
}

/// A value in Arrow's JSON form for a column of type `ty`.
fn cell(v: &Value, ty: &DataType) -> Value {
    match (ty, v) {
        (DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8, Value::String(_)) => v.clone(),
        (DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8, Value::Null) => Value::Null,
        (DataType::Utf8 | DataType::Utf8View | DataType::LargeUtf8, other) => {
            Value::String(other.to_string())
        }
        _ => v.clone(),
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
    for row in rows {
        let Some(obj) = row.document.as_object() else {
            continue;
        };
        for (name, value) in obj {
            let Some(wanted) = inferred_type(value) else {
                continue;
            };
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
                        column: name.clone(),
                        found: "Int64".into(),
                        expected: format!("{wanted} (the value {value})"),
                    });
                }
                Some(found) => {
                    return Err(DeltaError::IncompatibleSchema {
                        table: table.name.clone(),
                        column: name.clone(),
                        found: found.to_string(),
                        expected: format!("{wanted} (the value {value})"),
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
    let json_rows: Vec<Map<String, Value>> = chosen
        .into_iter()
        .map(|i| {
            let r = &rows[i];
            let mut out = Map::new();
            if let Some(obj) = r.document.as_object() {
                for (name, value) in obj {
                    if let Ok(f) = target.field_with_name(name) {
                        out.insert(name.clone(), cell(value, f.data_type()));
                    }
                }
            }
            out.insert(KEY.into(), Value::String(r.key.clone()));
            out.insert(LSN.into(), Value::from(r.lsn.0 as i64));
            out.insert(COMMIT_TS.into(), Value::from(r.ts_ms * 1000));
            out
        })
        .collect();
    let batch = record_batch(target.clone(), &json_rows).map_err(|source| DeltaError::Arrow {
        table: table.name.clone(),
        source,
    })?;
    let columns: Vec<String> = target.fields().iter().map(|f| f.name().clone()).collect();
    table.upsert(batch, KEY, &columns, position).await
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
    ]
}

/// Records the plugins' state changes (upsert by plugin and key), with `position` in the
/// same commit: the state is then the plugins' state after every change before it.
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
    let mut rows = Vec::new();
    for (plugin, keys) in changes {
        for (key, value) in keys {
            let mut m = Map::new();
            m.insert(KEY.into(), Value::String(format!("{plugin}\u{1f}{key}")));
            m.insert("plugin".into(), Value::from(plugin.as_str()));
            m.insert("key".into(), Value::from(key.as_str()));
            m.insert(
                "value".into(),
                value.as_ref().map_or(Value::Null, |v| {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(v))
                }),
            );
            rows.push(m);
        }
    }
    if rows.is_empty() {
        return table.commit_position(position).await;
    }
    let batch = record_batch(target, &rows).map_err(|source| DeltaError::Arrow {
        table: table.name.clone(),
        source,
    })?;
    let columns: Vec<String> = state_fields().iter().map(|f| f.name().clone()).collect();
    table.upsert(batch, KEY, &columns, Some(position)).await
}

/// Reads every plugin's state back: plugin → key → value.
pub async fn load_state(
    table: &LakeTable,
) -> Result<std::collections::HashMap<String, std::collections::HashMap<String, Vec<u8>>>, DeltaError>
{
    use base64::Engine as _;
    let mut out: std::collections::HashMap<String, std::collections::HashMap<String, Vec<u8>>> =
        Default::default();
    for row in table.rows(Some("value IS NOT NULL")).await? {
        let (Some(plugin), Some(key), Some(value)) = (
            row.get("plugin").and_then(Value::as_str),
            row.get("key").and_then(Value::as_str),
            row.get("value").and_then(Value::as_str),
        ) else {
            continue;
        };
        if let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(value) {
            out.entry(plugin.to_string())
                .or_default()
                .insert(key.to_string(), bytes);
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
            m
        })
        .collect();
    let batch = record_batch(target, &rows).map_err(|source| DeltaError::Arrow {
        table: table.name.clone(),
        source,
    })?;
    table.append(batch, position).await
}
