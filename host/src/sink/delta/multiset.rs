//! The replica of a table whose rows have no key but all their values (`REPLICA IDENTITY
//! FULL` without a primary key): the source is a multiset, rows may hold NULLs, and twins
//! (rows equal in every column) are legal. The replica holds the same multiset.
//!
//! A batch's changes are applied in order: an insert adds one row; a delete removes one
//! row equal to its old row (NULLs equal NULLs); an update does both. A row added earlier
//! in the batch is removed there; the rest are removed from the table: the rows that may
//! match are read, as many as were deleted taken out, and the others written back with
//! the batch's new rows in one commit (a Delta "replace where") that also records the
//! position. A removal the replica cannot match means it no longer equals the source: the
//! write stops with an error rather than go on.

use deltalake::arrow::array::{Array, BooleanArray};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::common::ScalarValue;
use serde_json::{Map, Value};

use super::replica::quote;
use super::schema::record_batch;
use super::table::LakeTable;
use super::{COMMIT_TS, DeltaError, LSN, RAW, convert_columns};
use crate::document::{ChangeDocument, Op};
use crate::lsn::Lsn;
use crate::relation::Relation;

/// A row to remove from the table, and how many of its twins.
struct Removal {
    row: Map<String, Value>,
    count: usize,
}

/// Applies `docs` (changes of `rel`, in source order) to its multiset replica `lt`, whose
/// Arrow schema is `target`, recording `position`.
pub async fn write(
    lt: &mut LakeTable,
    rel: &Relation,
    target: &SchemaRef,
    docs: &[&ChangeDocument],
    position: Option<Lsn>,
) -> Result<(), DeltaError> {
    // A row's values, and the exact values its columns hold as NULL: twins only if both
    // are the same.
    let mut columns: Vec<&str> = rel.columns.iter().map(|c| &*c.name).collect();
    if target.field_with_name(RAW).is_ok() {
        columns.push(RAW);
    }
    let same = |a: &Map<String, Value>, b: &Map<String, Value>| {
        columns
            .iter()
            .all(|c| a.get(*c).unwrap_or(&Value::Null) == b.get(*c).unwrap_or(&Value::Null))
    };
    let mut truncated = false;
    let mut adds: Vec<Map<String, Value>> = Vec::new();
    let mut removals: Vec<Removal> = Vec::new();
    for d in docs {
        let old = match d.op {
            Op::Truncate => {
                truncated = true;
                adds.clear();
                removals.clear();
                continue;
            }
            Op::Insert | Op::Read => None,
            Op::Delete => Some(convert_columns(&d.columns, target)),
            Op::Update => {
                let before = d.before.as_ref().ok_or_else(|| DeltaError::Unplaceable {
                    table: format!("{}.{}", rel.schema, rel.table),
                    reason: format!(
                        "an update at {} came without its old row, which a table without a key \
                         needs (REPLICA IDENTITY FULL sends it)",
                        d.source.lsn
                    ),
                })?;
                Some(convert_columns(before, target))
            }
        };
        if let Some(old) = &old {
            if let Some(i) = adds.iter().rposition(|a| same(a, old)) {
                adds.remove(i);
            } else if let Some(r) = removals.iter_mut().find(|r| same(&r.row, old)) {
                r.count += 1;
            } else {
                removals.push(Removal {
                    row: old.clone(),
                    count: 1,
                });
            }
        }
        if d.op != Op::Delete {
            let mut row = convert_columns(&d.columns, target);
            // Unchanged TOAST values: the old row has them.
            if let Some(old) = &old {
                for u in &d.unchanged {
                    if let Some(v) = old.get(&**u) {
                        row.insert(u.to_string(), v.clone());
                    }
                }
            }
            row.insert(LSN.into(), Value::from(d.source.lsn.0 as i64));
            row.insert(COMMIT_TS.into(), Value::from(d.source.ts_ms * 1000));
            adds.push(row);
        }
    }
    let name = lt.name.clone();
    let arrow_err = |source| DeltaError::Arrow {
        table: name.clone(),
        source,
    };
    if truncated {
        let pos = if adds.is_empty() { position } else { None };
        lt.delete_all(pos).await?;
    }
    let added = record_batch(target.clone(), &adds).map_err(arrow_err)?;
    if removals.is_empty() {
        if !adds.is_empty() || !truncated {
            lt.append(added, position).await?;
        }
        return Ok(());
    }
    let (predicate, removed) = removal_predicate(&removals, target, rel)?;
    let removed = record_batch(target.clone(), &removed).map_err(arrow_err)?;
    let mut left: Vec<usize> = removals.iter().map(|r| r.count).collect();
    // The new rows must match the predicate too: they are the only ones at or past their
    // first commit LSN (earlier parts of their transaction, read back, are kept).
    let predicate = match adds.iter().filter_map(|a| a.get(LSN)?.as_i64()).min() {
        Some(first) => format!("({predicate}) OR {} >= {first}", quote(LSN)),
        None => predicate,
    };
    let mut kept = Vec::new();
    for batch in lt.batches_where(&predicate).await? {
        // In the table's own types (a scan may hand strings over as views), to compare
        // with the removals and to write back.
        let batch = conform(batch, target).map_err(arrow_err)?;
        let mut keep = Vec::with_capacity(batch.num_rows());
        for r in 0..batch.num_rows() {
            let hit = (0..removals.len())
                .find(|&g| left[g] > 0 && row_equals(&batch, r, &removed, g, &columns));
            if let Some(g) = hit {
                left[g] -= 1;
            }
            keep.push(hit.is_none());
        }
        kept.push(filter_record_batch(&batch, &BooleanArray::from(keep)).map_err(arrow_err)?);
    }
    if let Some(g) = left.iter().position(|&n| n > 0) {
        return Err(DeltaError::Unplaceable {
            table: format!("{}.{}", rel.schema, rel.table),
            reason: format!(
                "the source removed a row the replica `{}` does not hold ({}): the replica no \
                 longer equals the source. Delete the replica and start weir again to backfill it",
                name,
                Value::Object(removals[g].row.clone())
            ),
        });
    }
    kept.push(added);
    lt.replace_where(&predicate, kept, position).await
}

/// SQL matching (at least) every row equal to one of `removals`: per removal, its columns
/// of simple types compared NULL-safely (the others are compared exactly when the
/// matched rows are read back); and the removals' rows as Arrow JSON, for that
/// comparison.
fn removal_predicate(
    removals: &[Removal],
    target: &SchemaRef,
    rel: &Relation,
) -> Result<(String, Vec<Map<String, Value>>), DeltaError> {
    let mut any = Vec::with_capacity(removals.len());
    for r in removals {
        let mut all = Vec::new();
        for c in &rel.columns {
            let Ok(field) = target.field_with_name(&c.name) else {
                continue;
            };
            let value = r.row.get(&*c.name).unwrap_or(&Value::Null);
            let literal = match (field.data_type(), value) {
                (_, Value::Null) => {
                    all.push(format!("{} IS NULL", quote(&c.name)));
                    continue;
                }
                (
                    DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64,
                    Value::Number(n),
                ) => n.to_string(),
                (DataType::Boolean, Value::Bool(b)) => b.to_string(),
                (DataType::Utf8 | DataType::LargeUtf8, Value::String(s)) => {
                    format!("'{}'", s.replace('\'', "''"))
                }
                _ => continue,
            };
            all.push(format!("{} = {literal}", quote(&c.name)));
        }
        if all.is_empty() {
            // Nothing to narrow the search by: every row may match.
            return Ok((
                "TRUE".into(),
                removals.iter().map(|r| r.row.clone()).collect(),
            ));
        }
        any.push(format!("({})", all.join(" AND ")));
    }
    Ok((
        any.join(" OR "),
        removals.iter().map(|r| r.row.clone()).collect(),
    ))
}

/// Whether row `r` of `batch` equals row `g` of `removed` in every source column (NULL
/// equal to NULL).
fn row_equals(
    batch: &RecordBatch,
    r: usize,
    removed: &RecordBatch,
    g: usize,
    columns: &[&str],
) -> bool {
    columns.iter().all(|c| {
        let (Some(a), Some(b)) = (batch.column_by_name(c), removed.column_by_name(c)) else {
            return true;
        };
        if a.is_null(r) || b.is_null(g) {
            return a.is_null(r) && b.is_null(g);
        }
        match (
            ScalarValue::try_from_array(a, r),
            ScalarValue::try_from_array(b, g),
        ) {
            (Ok(x), Ok(y)) => x == y,
            _ => false,
        }
    })
}

/// `batch` (read back from the table) in the table's own schema.
fn conform(
    batch: RecordBatch,
    target: &SchemaRef,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    let columns = target
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(c) if c.data_type() == f.data_type() => Ok(c.clone()),
            Some(c) => deltalake::arrow::compute::cast(c, f.data_type()),
            None => Ok(deltalake::arrow::array::new_null_array(
                f.data_type(),
                batch.num_rows(),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(target.clone(), columns)
}
