//! A replica's columns follow the source table's through schema changes that Delta cannot
//! express as such: a renamed column (`RENAME COLUMN`) takes its values to the new name,
//! and a column added with a default (`ADD COLUMN ... DEFAULT x`) has `x` in the rows
//! that existed before, as in PostgreSQL.
//!
//! Columns are told apart by their number in the source table (`attnum`), which a rename
//! keeps and a drop and add does not. The replica records the numbers of the columns it
//! last followed in a table property, so that a change made while weir was stopped is
//! recognised too.

use std::borrow::Cow;
use std::collections::BTreeMap;

use deltalake::arrow::datatypes::{Field, Schema};
use deltalake::datafusion::prelude::{Expr, lit};
use deltalake::datafusion::scalar::ScalarValue;

use super::replica::column;
use super::schema::{self, record_batch, to_arrow_json};
use super::table::LakeTable;
use super::{DeltaError, RAW};
use crate::relation::Relation;

/// Table property: the source's column numbers and the replica column each one fills.
pub const COLUMNS_PROPERTY: &str = "weir.columns";

type Numbers = BTreeMap<i16, String>;

/// Table property: where the source table's rows were stored and its columns' types
/// (see [`rewritten`]).
pub const SHAPE_PROPERTY: &str = "weir.shape";

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Shape {
    storage: i64,
    /// Column number: type OID and modifier.
    types: BTreeMap<i16, (u32, i32)>,
}

fn shape(rel: &Relation) -> Option<Shape> {
    Some(Shape {
        storage: rel.storage?,
        types: rel
            .columns
            .iter()
            .filter_map(|c| Some((c.attnum?, (c.type_id, c.type_modifier))))
            .collect(),
    })
}

fn recorded_shape(lt: &LakeTable) -> Option<Shape> {
    serde_json::from_str(&lt.property(SHAPE_PROPERTY)?).ok()
}

/// Whether PostgreSQL rewrote the table's rows with values the stream did not carry
/// since the replica last recorded its shape: its storage changed (a table rewrite) along
/// with a column's type (`ALTER COLUMN ... TYPE ... USING`, whose values may be anything)
/// or with columns added (`ADD COLUMN ... DEFAULT` of a volatile expression such as
/// `gen_random_uuid()` or a `serial`, which gives every older row its own value). Returns
/// what happened, naming the columns. A rewrite that keeps the shape (`VACUUM FULL`,
/// `CLUSTER`, a `TRUNCATE`, pg_repack) changes no value; one that keeps each column's
/// type (`ALTER COLUMN a TYPE int USING a + 1` on an int) cannot be told from those.
pub fn rewritten(lt: &LakeTable, rel: &Relation) -> Option<String> {
    let now = shape(rel)?;
    let before = recorded_shape(lt)?;
    if before.storage == now.storage {
        return None;
    }
    let changed: Vec<String> = rel
        .columns
        .iter()
        .filter(|c| {
            c.attnum.is_some_and(|n| match before.types.get(&n) {
                // Retyped: its values may be anything (USING).
                Some(&was) => was != (c.type_id, c.type_modifier),
                // Added: older rows get its default, which the stream does not carry
                // (without a default they are NULL, as in the replica: PostgreSQL also
                // rewrites to add a column of a domain with constraints).
                None => c.has_default,
            })
        })
        .map(|c| c.name.to_string())
        .collect();
    (!changed.is_empty()).then(|| {
        format!(
            "PostgreSQL rewrote the table with new or retyped columns {changed:?} (ALTER COLUMN \
             ... TYPE, or ADD COLUMN with a volatile default): the rows it rewrote are not in \
             the stream"
        )
    })
}

/// Records the table's shape (see [`rewritten`]) when it is known and differs from the
/// recorded one.
pub async fn record_shape(lt: &mut LakeTable, rel: &Relation) -> Result<(), DeltaError> {
    let Some(now) = shape(rel) else {
        return Ok(());
    };
    if !lt.exists() || recorded_shape(lt).as_ref() == Some(&now) {
        return Ok(());
    }
    lt.set_property(
        SHAPE_PROPERTY,
        serde_json::to_string(&now).expect("a shape"),
    )
    .await
}

fn numbers(rel: &Relation) -> Numbers {
    rel.columns
        .iter()
        .filter_map(|c| Some((c.attnum?, c.name.to_string())))
        .collect()
}

/// Makes the replica's columns `fields` (the relation's, then weir's) follow `rel`: adds
/// the new ones, carries renamed columns' values over and fills added columns' defaults
/// into the older rows. Run before a write with `rel`, and again after a crash in the
/// middle: each step is safe to repeat.
pub async fn follow(
    lt: &mut LakeTable,
    rel: &Relation,
    fields: &[Field],
) -> Result<(), DeltaError> {
    // A table created now, or one from before weir recorded numbers: nothing to follow.
    let before: Option<Numbers> = lt
        .property(COLUMNS_PROPERTY)
        .and_then(|text| serde_json::from_str(&text).ok());
    lt.ensure_fields(fields).await?;
    let mut now = numbers(rel);
    let Some(before) = before else {
        if lt.exists() && !now.is_empty() {
            lt.set_property(
                COLUMNS_PROPERTY,
                serde_json::to_string(&now).expect("a map"),
            )
            .await?;
        }
        return Ok(());
    };
    // A column without a number (renamed or dropped again since) tells nothing new:
    // what was known of the others stays.
    for (n, name) in &before {
        now.entry(*n).or_insert_with(|| name.clone());
    }
    if before == now {
        return Ok(());
    }
    let existing: Vec<String> = lt
        .arrow_schema()
        .map(|s| s.fields().iter().map(|f| f.name().clone()).collect())
        .unwrap_or_default();
    let mut sets: Vec<(String, Expr)> = Vec::new();
    let mut raw = serde_json::Map::new();
    for c in &rel.columns {
        let Some(n) = c.attnum else { continue };
        match before.get(&n) {
            // Renamed: the older rows' values are under the old name (which stays, as a
            // dropped column does, NULL from now on).
            Some(old) if **old != *c.name && existing.contains(old) => {
                tracing::warn!(
                    table = %lt.name,
                    from = %old,
                    to = %c.name,
                    "a source column was renamed: its values are copied to the new name (table rewritten)"
                );
                sets.push((c.name.to_string(), Expr::Column(column(old))));
            }
            Some(_) => {}
            // Added since: rows from before have the default PostgreSQL keeps for them.
            None => {
                let Some(missing) = c
                    .missing
                    .as_ref()
                    .filter(|m| !m.value.is_null() || m.exact.is_some())
                else {
                    continue;
                };
                let Some(field) = fields.iter().find(|f| **f.name() == *c.name) else {
                    continue;
                };
                let value = if schema::holds_json(&c.kind) {
                    match &missing.exact {
                        Some(exact) => schema::exact_json_as_text(&c.kind, exact),
                        None => schema::json_as_text(&c.kind, &missing.value),
                    }
                } else {
                    missing.value.clone()
                };
                // A default its Delta column cannot hold (a timestamp `infinity`, a BC
                // date): NULL there and the value in `_raw`, as in a written row.
                if schema::lost(&value, &to_arrow_json(value.clone(), field.data_type())) {
                    raw.insert(c.name.to_string(), value.clone());
                }
                match literal(field, &value) {
                    Some(l) => {
                        tracing::info!(
                            table = %lt.name,
                            column = %c.name,
                            "a source column was added with a default: older rows get it (table rewritten)"
                        );
                        sets.push((c.name.to_string(), l));
                    }
                    None if raw.contains_key(&*c.name) => tracing::info!(
                        table = %lt.name,
                        column = %c.name,
                        %value,
                        "a source column was added with a default its Delta type cannot hold: \
                         older rows have it in _raw (table rewritten)"
                    ),
                    None => {
                        return Err(DeltaError::Unplaceable {
                            table: lt.name.clone(),
                            reason: format!(
                                "the default {value} of the added column {:?} does not convert \
                                 to its Delta type {}, and the rows older than the column would \
                                 show NULL instead; please report this",
                                c.name,
                                field.data_type()
                            ),
                        });
                    }
                }
            }
        }
    }
    if !raw.is_empty() && existing.iter().any(|f| f == RAW) {
        sets.push((RAW.to_string(), with_raw(raw)));
    }
    lt.update_every_row(sets).await?;
    lt.set_property(
        COLUMNS_PROPERTY,
        serde_json::to_string(&now).expect("a map"),
    )
    .await
}

/// `_raw` with the values of `more` added: their object where it was NULL, else its
/// object with theirs appended (unless it holds the first already: an update repeated
/// after a crash).
fn with_raw(more: serde_json::Map<String, serde_json::Value>) -> Expr {
    use deltalake::arrow::datatypes::DataType;
    use deltalake::datafusion::functions::expr_fn::{character_length, concat, strpos, substring};
    use deltalake::datafusion::prelude::cast;
    use deltalake::datafusion::prelude::when;
    let object = serde_json::Value::Object(more).to_string();
    let first_key = {
        let inner = &object[1..];
        let end = inner.find("\":").map_or(0, |i| i + 2);
        inner[..end].to_string()
    };
    let raw = || Expr::Column(column(RAW));
    let length = cast(character_length(raw()), DataType::Int64);
    let appended = concat(vec![
        substring(raw(), lit(1i64), length - lit(1i64)),
        lit(format!(",{}", &object[1..])),
    ]);
    when(raw().is_null(), lit(object.clone()))
        .when(strpos(raw(), lit(first_key)).gt(lit(0i32)), raw())
        .otherwise(appended)
        .expect("a case expression")
}

/// `value` as a literal of `field`'s type, converted as a written row's value is.
fn literal(field: &Field, value: &serde_json::Value) -> Option<Expr> {
    let json = to_arrow_json(value.clone(), field.data_type());
    let schema = std::sync::Arc::new(Schema::new(vec![field.clone().with_nullable(true)]));
    let batch = record_batch(schema, &[vec![Cow::Owned(json)]]).ok()?;
    let scalar = ScalarValue::try_from_array(batch.column(0), 0).ok()?;
    (!scalar.is_null()).then(|| lit(scalar))
}
