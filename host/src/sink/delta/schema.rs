//! PostgreSQL columns as Delta columns, and change-document values as Arrow rows.
//!
//! | PostgreSQL | Delta |
//! | --- | --- |
//! | `smallint`, `integer`, `bigint` (`oid`, `xid`) | `short`, `integer`, `long` |
//! | `numeric(p,s)`, p <= 38 | `decimal(p,s)` |
//! | `numeric` without precision, or p > 38 | `string` (exact digits) |
//! | `real`, `double precision` | `float`, `double` |
//! | `boolean` | `boolean` |
//! | `timestamptz` | `timestamp` (UTC, microseconds) |
//! | `timestamp` | `timestamp_ntz` |
//! | `date` | `date` |
//! | `json`, `jsonb` | `string` (the JSON text, see [`json_as_text`]) |
//! | `bytea` | `binary` |
//! | arrays | `array<element>` |
//! | everything else (`time`, `uuid`, text types, enums, `interval`, ...) | `string` |
//!
//! Values a Delta column cannot hold (numeric `NaN` and `±Infinity` in a decimal column;
//! `±infinity`, BC and year-10000+ dates and timestamps; a multi-dimensional array in a
//! one-dimensional column of other than text) are NULL in their column, and their exact
//! change-document value is in the row's `_raw` column (see [`super::RAW`]): nothing is
//! lost.

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine as _;
use deltalake::arrow::array::ArrayRef;
use deltalake::arrow::compute::kernels::cast_utils;
use deltalake::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use deltalake::arrow::json::ReaderBuilder;
use deltalake::arrow::record_batch::RecordBatch;
use serde_json::{Map, Value};

use crate::decode::TypeKind;
use crate::json::RawJson;
use crate::relation::ColumnInfo;

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
        (DataType::Decimal128(..), Value::String(s)) if !decimal_fits(&s) => Value::Null,
        (DataType::Timestamp(..) | DataType::Date32, Value::String(s)) if !time_fits(&s, ty) => {
            Value::Null
        }
        // A value that did not parse as its type (PostgreSQL never sends one).
        (
            DataType::Boolean | DataType::Int16 | DataType::Int32 | DataType::Int64,
            Value::String(_),
        ) => Value::Null,
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

/// Whether a column of `kind` holds JSON values: `json`, `jsonb` (also through a domain),
/// or arrays of them.
pub fn holds_json(kind: &TypeKind) -> bool {
    match kind {
        TypeKind::Json => true,
        TypeKind::Array(inner) => holds_json(inner),
        _ => false,
    }
}

/// A value of a column that [`holds_json`], as its Delta `string` column stores it: the
/// JSON text, so that a JSON string keeps its quotes (`"123"` is not `123`). Of an array,
/// each element's text (a sub-array of a multi-dimensional one as one JSON text).
pub fn json_as_text(kind: &TypeKind, value: &Value) -> Value {
    match (kind, value) {
        (_, Value::Null) => Value::Null,
        (TypeKind::Array(_), Value::Array(items)) => Value::Array(
            items
                .iter()
                .map(|item| match item {
                    Value::Null => Value::Null,
                    other => Value::String(other.to_string()),
                })
                .collect(),
        ),
        (_, other) => Value::String(other.to_string()),
    }
}

/// [`json_as_text`] of a value known by its exact JSON text (see
/// [`crate::document::ChangeDocument::exact`]): the text itself, or of an array each
/// element's (`null` as NULL, as [`json_as_text`] has it).
pub fn exact_json_as_text(kind: &TypeKind, exact: &str) -> Value {
    if matches!(kind, TypeKind::Array(_)) {
        type Items = Vec<Option<Box<serde_json::value::RawValue>>>;
        if let Ok(items) = serde_json::from_str::<Items>(exact) {
            return Value::Array(
                items
                    .into_iter()
                    .map(|i| i.map_or(Value::Null, |raw| Value::String(raw.get().to_string())))
                    .collect(),
            );
        }
    }
    Value::String(exact.to_string())
}

/// [`to_arrow_json`] of a borrowed value: the value itself where that leaves it as it is
/// (nearly always: numbers, text, dates), so that rows need not copy their values.
pub fn to_arrow_json_ref<'a>(value: &'a Value, ty: &DataType) -> Cow<'a, Value> {
    let converts = match (ty, value) {
        (_, Value::Null) => false,
        (DataType::Utf8, Value::String(_)) => false,
        (DataType::Utf8, _) => true,
        (DataType::Binary, Value::String(_)) => true,
        (DataType::Decimal128(..), Value::String(s)) => !decimal_fits(s),
        (DataType::Timestamp(..) | DataType::Date32, Value::String(s)) => !time_fits(s, ty),
        (
            DataType::Boolean | DataType::Int16 | DataType::Int32 | DataType::Int64,
            Value::String(_),
        ) => true,
        (DataType::Float32 | DataType::Float64, Value::String(_)) => true,
        (DataType::List(_), Value::Array(_)) => true,
        _ => false,
    };
    if converts {
        Cow::Owned(to_arrow_json(value.clone(), ty))
    } else {
        Cow::Borrowed(value)
    }
}

/// Whether a numeric's text is a number a decimal column holds (not `NaN`, `±Infinity`).
fn decimal_fits(s: &str) -> bool {
    s.starts_with(|c: char| c == '-' || c.is_ascii_digit()) && s != "-Infinity"
}

/// Whether a date or timestamp (in the change document's form) is one a Delta `date` or
/// `timestamp` holds: not `±infinity`, not BC, year 1 to 9999.
fn time_fits(s: &str, ty: &DataType) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    // The canonical forms, checked cheaply: `2024-05-01`, `2024-05-01T12:00:00.250000[Z]`.
    let date = b.len() >= 10 && digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-';
    if !date || &s[..4] == "0000" {
        return false;
    }
    match ty {
        DataType::Date32 => b.len() == 10 && digits(8..10),
        _ => {
            (b.len() == 26 || (b.len() == 27 && b[26] == b'Z'))
                && b[10] == b'T'
                && b[13] == b':'
                && b[16] == b':'
                && b[19] == b'.'
                && digits(20..26)
        }
    }
}

/// Whether `converted` (what [`to_arrow_json`] made of `original`) lost something the
/// Delta column cannot hold: a non-NULL value written as NULL, also inside an array.
pub fn lost(original: &Value, converted: &Value) -> bool {
    match (original, converted) {
        (Value::Null, _) => false,
        (_, Value::Null) => true,
        (Value::Array(a), Value::Array(b)) => a.iter().zip(b).any(|(x, y)| lost(x, y)),
        _ => false,
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

/// One cell of a row: a JSON value, or the text of one.
#[derive(Debug, Clone, Copy)]
pub enum Cell<'a> {
    /// A value.
    Value(&'a Value),
    /// A value's JSON text.
    Raw(RawJson<'a>),
}

impl<'a> Cell<'a> {
    fn is_null(self) -> bool {
        match self {
            Cell::Value(v) => v.is_null(),
            Cell::Raw(r) => r.is_null(),
        }
    }
    fn as_bool(self) -> Option<bool> {
        match self {
            Cell::Value(v) => v.as_bool(),
            Cell::Raw(r) => r.as_bool(),
        }
    }
    fn as_i64(self) -> Option<i64> {
        match self {
            Cell::Value(v) => v.as_i64(),
            Cell::Raw(r) => r.as_i64(),
        }
    }
    fn as_f64(self) -> Option<f64> {
        match self {
            Cell::Value(Value::Number(n)) => n.as_f64(),
            Cell::Value(_) => None,
            Cell::Raw(r) => r.as_f64(),
        }
    }
    fn as_str(self) -> Option<Cow<'a, str>> {
        match self {
            Cell::Value(v) => v.as_str().map(Cow::Borrowed),
            Cell::Raw(r) => r.as_str(),
        }
    }
    fn to_value(self) -> Cow<'a, Value> {
        match self {
            Cell::Value(v) => Cow::Borrowed(v),
            Cell::Raw(r) => Cow::Owned(r.to_value()),
        }
    }
}

/// A row as named JSON values.
pub trait JsonRow {
    /// The value of field `name`, the `index`th of the schema (`None`: absent, NULL).
    fn field(&self, index: usize, name: &str) -> Option<Cell<'_>>;
}

impl JsonRow for Map<String, Value> {
    fn field(&self, _: usize, name: &str) -> Option<Cell<'_>> {
        self.get(name).map(Cell::Value)
    }
}

/// Values in schema order.
impl JsonRow for Vec<Value> {
    fn field(&self, index: usize, _: &str) -> Option<Cell<'_>> {
        self.get(index).map(Cell::Value)
    }
}

/// Values in schema order, borrowed where they can be.
impl JsonRow for Vec<Cow<'_, Value>> {
    fn field(&self, index: usize, _: &str) -> Option<Cell<'_>> {
        self.get(index).map(|v| Cell::Value(v.as_ref()))
    }
}

/// Builds a record batch of `schema` from rows of JSON values (missing fields are NULL),
/// in Arrow's JSON forms (see [`to_arrow_json`]); a string column takes any other value
/// as its JSON text.
///
/// The common column types are built straight from the values; a column of another type,
/// or with a value in a form not handled here, goes through Arrow's JSON decoder, which
/// sets the rules (and words the errors) for all of them. Building directly is several
/// times cheaper than serializing every row into the decoder.
pub fn record_batch<R: JsonRow>(
    schema: SchemaRef,
    rows: &[R],
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    if rows.is_empty() {
        return Ok(RecordBatch::new_empty(schema));
    }
    let columns = schema
        .fields()
        .iter()
        .enumerate()
        .map(|(i, field)| {
            let name = field.name().as_str();
            let values = rows.iter().map(move |r| r.field(i, name));
            match direct_column(field.data_type(), values.clone()) {
                Some(array) => Ok(array),
                None => decoded_column(field, values),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(schema, columns)
}

/// One column through Arrow's JSON decoder.
fn decoded_column<'a>(
    field: &Field,
    values: impl Iterator<Item = Option<Cell<'a>>>,
) -> Result<ArrayRef, deltalake::arrow::error::ArrowError> {
    /// A one-field JSON object, without building one.
    struct One<'a>(&'a str, Option<Cell<'a>>);
    impl serde::Serialize for One<'_> {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeMap as _;
            let mut map = s.serialize_map(Some(1))?;
            if let Some(v) = self.1 {
                map.serialize_entry(self.0, &*v.to_value())?;
            }
            map.end()
        }
    }
    let cells: Vec<One> = values.map(|v| One(field.name(), v)).collect();
    let schema = Arc::new(Schema::new(vec![field.clone()]));
    let mut decoder = ReaderBuilder::new(schema)
        .with_batch_size(cells.len().max(1))
        .build_decoder()?;
    decoder.serialize(&cells)?;
    let batch = decoder.flush()?.ok_or_else(|| {
        deltalake::arrow::error::ArrowError::JsonError(format!(
            "no rows decoded for column `{}`",
            field.name()
        ))
    })?;
    Ok(batch.column(0).clone())
}

/// A column of a common type built from its values, or `None` when the type or a value's
/// form is left to Arrow's JSON decoder.
fn direct_column<'a>(
    ty: &DataType,
    values: impl Iterator<Item = Option<Cell<'a>>>,
) -> Option<ArrayRef> {
    use deltalake::arrow::array::*;
    use deltalake::arrow::datatypes::*;

    fn cells<'a, T>(
        values: impl Iterator<Item = Option<Cell<'a>>>,
        mut one: impl FnMut(Cell<'a>) -> Option<T>,
    ) -> Option<Vec<Option<T>>> {
        values
            .map(|v| match v {
                None => Some(None),
                Some(v) if v.is_null() => Some(None),
                Some(v) => one(v).map(Some),
            })
            .collect()
    }
    fn int<T: TryFrom<i64>>(v: Cell) -> Option<T> {
        v.as_i64().and_then(|i| T::try_from(i).ok())
    }
    fn text(v: Cell<'_>) -> Option<Cow<'_, str>> {
        Some(match v.as_str() {
            Some(s) => s,
            None => Cow::Owned(v.to_value().to_string()),
        })
    }
    fn timestamp(v: Cell, unit: TimeUnit) -> Option<i64> {
        let Some(s) = v.as_str() else {
            return v.as_i64();
        };
        let t = cast_utils::string_to_datetime(&chrono::Utc, &s).ok()?;
        match unit {
            TimeUnit::Second => Some(t.timestamp()),
            TimeUnit::Millisecond => Some(t.timestamp_millis()),
            TimeUnit::Microsecond => Some(t.timestamp_micros()),
            TimeUnit::Nanosecond => t.timestamp_nanos_opt(),
        }
    }
    Some(match ty {
        DataType::Boolean => Arc::new(BooleanArray::from(cells(values, Cell::as_bool)?)),
        DataType::Int16 => Arc::new(Int16Array::from(cells(values, int::<i16>)?)),
        DataType::Int32 => Arc::new(Int32Array::from(cells(values, int::<i32>)?)),
        DataType::Int64 => Arc::new(Int64Array::from(cells(values, int::<i64>)?)),
        DataType::Float64 => Arc::new(Float64Array::from(cells(values, Cell::as_f64)?)),
        DataType::Float32 => Arc::new(Float32Array::from(cells(values, |v| {
            v.as_f64().map(|f| f as f32)
        })?)),
        DataType::Utf8 => Arc::new(StringArray::from_iter(cells(values, text)?)),
        DataType::Date32 => Arc::new(Date32Array::from(cells(values, |v| {
            <Date32Type as cast_utils::Parser>::parse(&v.as_str()?)
        })?)),
        DataType::Decimal128(p, s) => Arc::new(
            Decimal128Array::from(cells(values, |v| {
                cast_utils::parse_decimal::<Decimal128Type>(&v.as_str()?, *p, *s).ok()
            })?)
            .with_precision_and_scale(*p, *s)
            .ok()?,
        ),
        // Offsets and strings without a zone are read as UTC, as Arrow's decoder does.
        DataType::Timestamp(unit, tz)
            if tz.as_deref().is_none_or(|z| z == "UTC" || z == "+00:00") =>
        {
            let v = cells(values, |v| timestamp(v, *unit))?;
            let tz = tz.clone();
            match unit {
                TimeUnit::Second => Arc::new(TimestampSecondArray::from(v).with_timezone_opt(tz)),
                TimeUnit::Millisecond => {
                    Arc::new(TimestampMillisecondArray::from(v).with_timezone_opt(tz))
                }
                TimeUnit::Microsecond => {
                    Arc::new(TimestampMicrosecondArray::from(v).with_timezone_opt(tz))
                }
                TimeUnit::Nanosecond => {
                    Arc::new(TimestampNanosecondArray::from(v).with_timezone_opt(tz))
                }
            }
        }
        _ => return None,
    })
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

    #[test]
    fn borrowed_conversion_equals_the_owned_one_and_copies_only_what_changes() {
        let list = DataType::List(Arc::new(Field::new("item", DataType::Utf8, true)));
        let types = [
            DataType::Utf8,
            DataType::Binary,
            DataType::Int64,
            DataType::Float64,
            DataType::Decimal128(12, 2),
            DataType::Date32,
            DataType::Timestamp(TimeUnit::Microsecond, None),
            list,
        ];
        let values = [
            json!(null),
            json!("text"),
            json!(7),
            json!(1.5),
            json!("12.50"),
            json!("-3.00"),
            json!("NaN"),
            json!("-Infinity"),
            json!("infinity"),
            json!("2024-01-02"),
            json!("2024-01-02 03:04:05"),
            json!("aGk="),
            json!({"a": 1}),
            json!(["a", ["b"]]),
            json!(true),
        ];
        for ty in &types {
            for v in &values {
                let borrowed = to_arrow_json_ref(v, ty);
                let owned = to_arrow_json(v.clone(), ty);
                assert_eq!(*borrowed, owned, "{v} as {ty}");
            }
        }
        // The common forms are not copied.
        for (v, ty) in [
            (json!("12.50"), DataType::Decimal128(12, 2)),
            (json!("text"), DataType::Utf8),
            (json!(7), DataType::Int64),
            (json!("2024-01-02"), DataType::Date32),
            (json!(null), DataType::Float64),
        ] {
            assert!(
                matches!(to_arrow_json_ref(&v, &ty), Cow::Borrowed(_)),
                "{v}"
            );
        }
    }

    #[test]
    fn json_values_are_stored_as_their_json_text_strings_with_their_quotes() {
        let jsonb = TypeKind::Json;
        assert_eq!(json_as_text(&jsonb, &json!("123")), json!("\"123\""));
        assert_eq!(json_as_text(&jsonb, &json!(123)), json!("123"));
        assert_eq!(
            json_as_text(&jsonb, &json!({"a": "b"})),
            json!(r#"{"a":"b"}"#)
        );
        assert_eq!(json_as_text(&jsonb, &json!(null)), json!(null));
        let array = TypeKind::Array(Box::new(TypeKind::Json));
        assert!(holds_json(&array) && !holds_json(&TypeKind::Text));
        assert_eq!(
            json_as_text(&array, &json!(["x", 1, null, ["y"]])),
            json!(["\"x\"", "1", null, r#"["y"]"#])
        );
        // Stored as they are from then on.
        let text = json_as_text(&jsonb, &json!("123"));
        assert_eq!(to_arrow_json(text.clone(), &DataType::Utf8), text);
    }

    fn col(type_id: u32, type_modifier: i32, kind: TypeKind) -> ColumnInfo {
        ColumnInfo {
            name: "c".into(),
            type_id,
            type_modifier,
            kind,
            key: false,
            attnum: None,
            missing: None,
            has_default: false,
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
    fn columns_built_directly_equal_the_json_decoders() {
        let utc = Some(Arc::<str>::from("UTC"));
        let cases: Vec<(DataType, Vec<Value>)> = vec![
            (
                DataType::Boolean,
                vec![json!(true), json!(null), json!(false)],
            ),
            (DataType::Int16, vec![json!(-32768), json!(null), json!(7)]),
            (DataType::Int32, vec![json!(2147483647), json!(0)]),
            (
                DataType::Int64,
                vec![json!(i64::MIN), json!(null), json!(42)],
            ),
            (
                DataType::Float64,
                vec![json!(1.5), json!(2), json!(null), json!(-0.25)],
            ),
            (DataType::Float32, vec![json!(1.5), json!(null)]),
            (
                DataType::Utf8,
                vec![json!("a"), json!(null), json!("élan \"q\"")],
            ),
            (
                DataType::Date32,
                vec![json!("2024-02-29"), json!(null), json!("1970-01-01")],
            ),
            (
                DataType::Decimal128(12, 2),
                vec![json!("1234.50"), json!("-0.01"), json!(null), json!("7")],
            ),
            (
                DataType::Timestamp(TimeUnit::Microsecond, utc.clone()),
                vec![
                    json!("2024-05-01T12:00:00.250000Z"),
                    json!("2024-05-01T14:00:00+02:00"),
                    json!(1714564800250000_i64),
                    json!(null),
                ],
            ),
            (
                DataType::Timestamp(TimeUnit::Microsecond, None),
                vec![json!("2024-05-01T12:00:00.123456"), json!(null)],
            ),
            (
                DataType::Timestamp(TimeUnit::Millisecond, utc),
                vec![json!("2024-05-01 12:00:00Z"), json!(5)],
            ),
        ];
        fn of(values: &[Value]) -> Vec<Option<Cell<'_>>> {
            values.iter().map(|v| Some(Cell::Value(v))).collect()
        }
        // The same values as JSON text (as plugin outputs come), spaced as a plugin may.
        let texts = |values: &[Value]| -> Vec<String> {
            values
                .iter()
                .map(|v| serde_json::to_string_pretty(v).unwrap())
                .collect()
        };
        fn raw(texts: &[String]) -> Vec<Option<Cell<'_>>> {
            texts
                .iter()
                .map(|t| Some(Cell::Raw(RawJson::assume(t))))
                .collect()
        }
        for (ty, values) in cases {
            let field = Field::new("c", ty.clone(), true);
            let cells = of(&values);
            let direct = direct_column(&ty, cells.iter().copied())
                .unwrap_or_else(|| panic!("{ty} not direct"));
            let decoded = decoded_column(&field, cells.iter().copied()).unwrap();
            assert_eq!(direct.data_type(), decoded.data_type(), "{ty}");
            assert_eq!(&direct, &decoded, "{ty}: {values:?}");
            let texts = texts(&values);
            let from_text = direct_column(&ty, raw(&texts).into_iter()).unwrap();
            assert_eq!(&from_text, &decoded, "{ty} from text: {texts:?}");
        }
        // Forms left to the decoder: its rules (and errors) hold.
        let nan = [json!("NaN")];
        assert!(direct_column(&DataType::Float64, of(&nan).into_iter()).is_none());
        assert!(direct_column(&DataType::Float64, raw(&texts(&nan)).into_iter()).is_none());
        let bad = [json!("twelve")];
        assert!(direct_column(&DataType::Decimal128(12, 2), of(&bad).into_iter()).is_none());
        let field = Field::new("c", DataType::Decimal128(12, 2), true);
        assert!(decoded_column(&field, of(&bad).into_iter()).is_err());
        assert!(decoded_column(&field, raw(&texts(&bad)).into_iter()).is_err());
        // A string column takes other values as their (compact) JSON text.
        let mixed = [json!({"a": [1]}), json!(3), json!(true), json!(1.50)];
        for cells in [of(&mixed), raw(&texts(&mixed))] {
            let text = direct_column(&DataType::Utf8, cells.into_iter()).unwrap();
            let text = text
                .as_any()
                .downcast_ref::<deltalake::arrow::array::StringArray>()
                .unwrap();
            assert_eq!(text.value(0), r#"{"a":[1]}"#);
            assert_eq!(text.value(1), "3");
            assert_eq!(text.value(2), "true");
            assert_eq!(text.value(3), "1.5");
        }
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
