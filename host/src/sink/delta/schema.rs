//! PostgreSQL columns as Delta columns, and change-document values as Arrow rows.
//!
//! | PostgreSQL | Delta |
//! | --- | --- |
//! | `smallint`, `integer`, `bigint` (`oid`, `xid`) | `short`, `integer`, `long` |
//! | `numeric(p,s)`, p <= 38 | `decimal(p,s)` (`NaN`, `±Infinity` become NULL) |
//! | `numeric` without precision, or p > 38 | `string` (exact digits) |
//! | `real`, `double precision` | `float`, `double` |
//! | `boolean` | `boolean` |
//! | `timestamptz` | `timestamp` (UTC, microseconds) |
//! | `timestamp` | `timestamp_ntz` |
//! | `date` | `date` |
//! | `json`, `jsonb` | `string` (the JSON text) |
//! | `bytea` | `binary` |
//! | arrays | `array<element>` |
//! | everything else (`time`, `uuid`, text types, enums, `interval`, ...) | `string` |
//!
//! `±infinity` timestamps and dates become NULL: Delta has no such values.

use std::sync::Arc;

use base64::Engine as _;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::json::ReaderBuilder;
use deltalake::arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use crate::decode::TypeKind;
use crate::source::relation::ColumnInfo;

/// Largest precision of a Delta decimal.
const MAX_DECIMAL_PRECISION: i32 = 38;

/// The Arrow (and so Delta) type of a PostgreSQL column.
pub fn arrow_type(col: &ColumnInfo) -> DataType {
    kind_type(&col.kind, col.type_id, col.type_modifier)
}

fn kind_type(kind: &TypeKind, type_id: u32, type_modifier: i32) -> DataType {
    match kind {
        TypeKind::Bool => DataType::Boolean,
        TypeKind::Integer => match type_id {
            21 | 1005 => DataType::Int16,
            23 | 1007 => DataType::Int32,
            _ => DataType::Int64,
        },
        TypeKind::Float => match type_id {
            700 | 1021 => DataType::Float32,
            _ => DataType::Float64,
        },
        TypeKind::Numeric => match numeric_precision(type_modifier) {
            Some((p, s)) => DataType::Decimal128(p, s),
            None => DataType::Utf8,
        },
        TypeKind::Bytea => DataType::Binary,
        TypeKind::TimestampTz => DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
        TypeKind::Timestamp => DataType::Timestamp(TimeUnit::Microsecond, None),
        TypeKind::Date => DataType::Date32,
        TypeKind::Array(inner) => DataType::List(Arc::new(Field::new(
            "element",
            // Array type modifiers are the element's.
            kind_type(inner, element_type_id(type_id), type_modifier),
            true,
        ))),
        TypeKind::Json | TypeKind::Time | TypeKind::Text => DataType::Utf8,
    }
}

/// The element type OID of the builtin array types whose element width matters.
fn element_type_id(array_type_id: u32) -> u32 {
    match array_type_id {
        1005 => 21,
        1007 => 23,
        1016 => 20,
        1021 => 700,
        1022 => 701,
        other => other,
    }
}

/// `(precision, scale)` of `numeric(p,s)` when Delta can hold it as a decimal.
fn numeric_precision(type_modifier: i32) -> Option<(u8, i8)> {
    if type_modifier < 4 {
        return None;
    }
    let m = type_modifier - 4;
    let precision = (m >> 16) & 0xffff;
    let scale = m & 0xffff;
    (1..=MAX_DECIMAL_PRECISION)
        .contains(&precision)
        .then_some(())
        .filter(|_| scale <= precision)
        .map(|_| (precision as u8, scale as i8))
}

/// A nullable Arrow field for a PostgreSQL column.
pub fn arrow_field(col: &ColumnInfo) -> Field {
    Field::new(&*col.name, arrow_type(col), true)
}

/// A change-document value in the JSON form Arrow's JSON decoder reads for `ty`.
pub fn to_arrow_json(value: Value, ty: &DataType) -> Value {
    match (ty, value) {
        (_, Value::Null) => Value::Null,
        (DataType::Utf8, Value::String(s)) => Value::String(s),
        // json/jsonb values (and anything else) are stored as their JSON text.
        (DataType::Utf8, other) => Value::String(other.to_string()),
        (DataType::Binary, Value::String(b64)) => {
            match base64::engine::general_purpose::STANDARD.decode(b64.as_bytes()) {
                Ok(bytes) => Value::String(hex(&bytes)),
                Err(_) => Value::Null,
            }
        }
        (DataType::Decimal128(..), Value::String(s))
            if !s.starts_with(|c: char| c == '-' || c.is_ascii_digit()) || s == "-Infinity" =>
        {
            Value::Null
        }
        (DataType::Timestamp(..) | DataType::Date32, Value::String(s))
            if s.ends_with("infinity") =>
        {
            Value::Null
        }
        (DataType::Float32 | DataType::Float64, Value::String(s)) => match s.as_str() {
            // Arrow's decoder parses these spellings.
            "NaN" => Value::String("NaN".into()),
            "Infinity" => Value::String("inf".into()),
            "-Infinity" => Value::String("-inf".into()),
            _ => Value::Null,
        },
        (DataType::List(field), Value::Array(items)) => {
            let inner = field.data_type();
            Value::Array(
                items
                    .into_iter()
                    .map(|item| match (inner, item) {
                        // A multi-dimensional array in a one-dimensional column: keep the
                        // sub-array as text where the element is text, else NULL.
                        (DataType::Utf8, Value::Array(sub)) => {
                            Value::String(Value::Array(sub).to_string())
                        }
                        (_, Value::Array(_)) => Value::Null,
                        (_, v) => to_arrow_json(v, inner),
                    })
                    .collect(),
            )
        }
        (_, other) => other,
    }
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Builds a record batch of `schema` from rows given as JSON objects (missing fields are
/// NULL).
pub fn record_batch(
    schema: SchemaRef,
    rows: &[Map<String, Value>],
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    if rows.is_empty() {
        return Ok(RecordBatch::new_empty(schema));
    }
    let mut decoder = ReaderBuilder::new(schema.clone())
        .with_batch_size(rows.len())
        .build_decoder()?;
    decoder.serialize(rows)?;
    Ok(decoder
        .flush()?
        .unwrap_or_else(|| RecordBatch::new_empty(schema)))
}

/// A schema holding the named fields of `from`, in that order, followed by `extra`.
pub fn project(from: &Schema, names: &[&str], extra: Vec<Field>) -> SchemaRef {
    let mut fields: Vec<Field> = names
        .iter()
        .filter_map(|n| from.field_with_name(n).ok().cloned())
        .collect();
    fields.extend(extra);
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(type_id: u32, type_modifier: i32, kind: TypeKind) -> ColumnInfo {
        ColumnInfo {
            name: "c".into(),
            type_id,
            type_modifier,
            kind,
            key: false,
        }
    }

    #[test]
    fn numeric_precision_and_scale_come_from_the_type_modifier() {
        // numeric(12,2): ((12 << 16) | 2) + 4
        let t = arrow_type(&col(1700, (12 << 16 | 2) + 4, TypeKind::Numeric));
        assert_eq!(t, DataType::Decimal128(12, 2));
        assert_eq!(
            arrow_type(&col(1700, -1, TypeKind::Numeric)),
            DataType::Utf8
        );
        let wide = arrow_type(&col(1700, (60 << 16) + 4, TypeKind::Numeric));
        assert_eq!(wide, DataType::Utf8);
    }

    #[test]
    fn values_convert_and_decode() {
        let cols = [
            col(1700, (12 << 16 | 2) + 4, TypeKind::Numeric),
            col(17, -1, TypeKind::Bytea),
            col(1184, -1, TypeKind::TimestampTz),
            col(3802, -1, TypeKind::Json),
            col(1007, -1, TypeKind::Array(Box::new(TypeKind::Integer))),
            col(701, -1, TypeKind::Float),
        ];
        let fields: Vec<Field> = cols
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(format!("c{i}"), arrow_type(c), true))
            .collect();
        let schema = Arc::new(Schema::new(fields));
        let input = [
            json!(["1234.50", "3q2+7w==", "2024-05-01T12:00:00.250000Z", {"a": [1]}, [1, null, 3], "NaN"]),
            json!(["NaN", null, "infinity", null, [], 2.5]),
        ];
        let rows: Vec<Map<String, Value>> = input
            .iter()
            .map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .enumerate()
                    .map(|(i, v)| {
                        let name = format!("c{i}");
                        let ty = schema.field(i).data_type().clone();
                        (name, to_arrow_json(v.clone(), &ty))
                    })
                    .collect()
            })
            .collect();
        let batch = record_batch(schema, &rows).unwrap();
        assert_eq!(batch.num_rows(), 2);
        let show = deltalake::arrow::util::pretty::pretty_format_batches(&[batch])
            .unwrap()
            .to_string();
        assert!(show.contains("1234.50"), "{show}");
        assert!(show.contains("deadbeef"), "{show}");
        assert!(show.contains("2024-05-01T12:00:00.250Z"), "{show}");
        assert!(show.contains(r#"{"a":[1]}"#), "{show}");
        assert!(show.contains("[1, , 3]"), "{show}");
        assert!(show.contains("NaN"), "{show}");
    }
}
