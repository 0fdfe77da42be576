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
//! write stops with an error rather than go on. With soft deletes a deleted row stays,
//! marked `_deleted`, and is no longer matched.

use deltalake::arrow::array::{Array, BooleanArray};
use deltalake::arrow::compute::filter_record_batch;
use deltalake::arrow::datatypes::{DataType, SchemaRef};
use deltalake::arrow::record_batch::RecordBatch;
use deltalake::datafusion::common::ScalarValue;
use serde_json::{Map, Value};

use super::replica::quote;
use super::schema::record_batch;
use super::table::LakeTable;
use super::{COMMIT_TS, DELETED, DeltaError, LSN, RAW, convert_columns};
use crate::config::DeleteMode;
use crate::document::{ChangeDocument, Op};
use crate::lsn::Lsn;
use crate::relation::Relation;

/// A row to remove from the table, and how many of its twins: `changed` by updates,
/// `gone` by deletes (with each delete's `_lsn` and `_commit_ts`, for a soft delete's
/// tombstone).
struct Removal {
    row: Map<String, Value>,
    changed: usize,
    gone: Vec<(i64, i64)>,
}

impl Removal {
    fn count(&self) -> usize {
        self.changed + self.gone.len()
    }
}

/// Applies `docs` (changes of `rel`, in source order) to its multiset replica `lt`, whose
/// Arrow schema is `target`, recording `position`. With soft deletes a deleted row stays,
/// with `_deleted = true` and its delete's `_lsn` (a row updated is replaced); the rows
/// with `_deleted = false` are the source's multiset.
pub async fn write(
    lt: &mut LakeTable,
    rel: &Relation,
    target: &SchemaRef,
    docs: &[&ChangeDocument],
    position: Option<Lsn>,
    delete: DeleteMode,
) -> Result<(), DeltaError> {
    let soft = delete == DeleteMode::Soft;
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
    let mut truncated: Option<Lsn> = None;
    let mut adds: Vec<Map<String, Value>> = Vec::new();
    // Rows added and deleted within the batch, kept as deleted (soft deletes).
    let mut tombstones: Vec<Map<String, Value>> = Vec::new();
    let mut removals: Vec<Removal> = Vec::new();
    for d in docs {
        let stamp = (d.source.lsn.0 as i64, d.source.ts_ms * 1000);
        let old = match d.op {
            Op::Truncate => {
                truncated = Some(d.source.lsn);
                adds.clear();
                tombstones.clear();
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
            let gone = d.op == Op::Delete;
            if let Some(i) = adds.iter().rposition(|a| same(a, old)) {
                let mut row = adds.remove(i);
                if gone && soft {
                    row.insert(DELETED.into(), Value::Bool(true));
                    row.insert(LSN.into(), Value::from(stamp.0));
                    row.insert(COMMIT_TS.into(), Value::from(stamp.1));
                    tombstones.push(row);
                }
            } else {
                let r = match removals.iter().position(|r| same(&r.row, old)) {
                    Some(i) => &mut removals[i],
                    None => {
                        removals.push(Removal {
                            row: old.clone(),
                            changed: 0,
                            gone: Vec::new(),
                        });
                        removals.last_mut().expect("just pushed")
                    }
                };
                if gone {
                    r.gone.push(stamp);
                } else {
                    r.changed += 1;
                }
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
            row.insert(LSN.into(), Value::from(stamp.0));
            row.insert(COMMIT_TS.into(), Value::from(stamp.1));
            if soft {
                row.insert(DELETED.into(), Value::Bool(false));
            }
            adds.push(row);
        }
    }
    let name = lt.name.clone();
    let arrow_err = |source| DeltaError::Arrow {
        table: name.clone(),
        source,
    };
    adds.append(&mut tombstones);
    if let Some(lsn) = truncated {
        let pos = if adds.is_empty() { position } else { None };
        if soft {
            lt.mark_all_deleted(pos, lsn).await?;
        } else {
            lt.delete_all(pos).await?;
        }
    }
    let added = record_batch(target.clone(), &adds).map_err(arrow_err)?;
    if removals.is_empty() {
        if !adds.is_empty() || truncated.is_none() {
            lt.append(added, position).await?;
        }
        return Ok(());
    }
    let (predicate, removed) = removal_predicate(&removals, target, rel)?;
    let removed = record_batch(target.clone(), &removed).map_err(arrow_err)?;
    let mut left: Vec<usize> = removals.iter().map(Removal::count).collect();
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
        let deleted = batch
            .column_by_name(DELETED)
            .and_then(|c| c.as_any().downcast_ref::<BooleanArray>().cloned());
        let mut keep = Vec::with_capacity(batch.num_rows());
        let mut buried = Vec::new();
        for r in 0..batch.num_rows() {
            // A row deleted before is no longer the source's.
            if deleted
                .as_ref()
                .is_some_and(|d| d.is_valid(r) && d.value(r))
            {
                keep.push(true);
                continue;
            }
            let hit = (0..removals.len())
                .find(|&g| left[g] > 0 && row_equals(&batch, r, &removed, g, &columns));
            if let Some(g) = hit {
                left[g] -= 1;
                // Deletes first, then updates: which twin is which does not matter.
                if soft && left[g] >= removals[g].changed {
                    buried.push((r, removals[g].gone[left[g] - removals[g].changed]));
                }
            }
            keep.push(hit.is_none());
        }
        kept.push(filter_record_batch(&batch, &BooleanArray::from(keep)).map_err(arrow_err)?);
        if !buried.is_empty() {
            kept.push(bury(&batch, &buried, target).map_err(arrow_err)?);
        }
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

/// Rows `buried` of `batch` (row, its delete's `_lsn` and `_commit_ts`) marked deleted.
fn bury(
    batch: &RecordBatch,
    buried: &[(usize, (i64, i64))],
    target: &SchemaRef,
) -> Result<RecordBatch, deltalake::arrow::error::ArrowError> {
    use deltalake::arrow::array::{Int64Array, TimestampMicrosecondArray, UInt32Array};
    let rows = UInt32Array::from_iter_values(buried.iter().map(|(r, _)| *r as u32));
    let columns =
        target
            .fields()
            .iter()
            .zip(batch.columns())
            .map(
                |(f, c)| -> Result<
                    deltalake::arrow::array::ArrayRef,
                    deltalake::arrow::error::ArrowError,
                > {
                    Ok(match f.name().as_str() {
                        DELETED => {
                            std::sync::Arc::new(BooleanArray::from(vec![true; buried.len()]))
                        }
                        LSN => std::sync::Arc::new(Int64Array::from_iter_values(
                            buried.iter().map(|(_, (lsn, _))| *lsn),
                        )),
                        COMMIT_TS => deltalake::arrow::compute::cast(
                            &TimestampMicrosecondArray::from_iter_values(
                                buried.iter().map(|(_, (_, ts))| *ts),
                            ),
                            f.data_type(),
                        )?,
                        _ => deltalake::arrow::compute::take(c, &rows, None)?,
                    })
                },
            )
            .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(target.clone(), columns)
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
