//! The replica of a source table: one row per key, kept current by MERGE.
//!
//! A batch of changes is first reduced to the last state of each key (MERGE rejects two
//! source rows for one target row): an insert or update is an upsert, a delete removes
//! (or marks) the key, an update that moves a row to a new key removes the old one.
//! Columns whose TOAST value PostgreSQL did not send keep the replica's stored value,
//! taken from an earlier change in the same batch when there is one, else left untouched
//! by the MERGE.

use std::borrow::Cow;
use std::collections::HashMap;

use deltalake::DeltaResult;
use deltalake::arrow::datatypes::{DataType, Field, SchemaRef, TimeUnit};
use deltalake::operations::merge::MergeBuilder;
use serde_json::{Map, Value};

use deltalake::arrow::error::ArrowError;
use deltalake::arrow::record_batch::RecordBatch;

use super::schema::{lost, project, record_batch, to_arrow_json_ref};
use super::{COMMIT_TS, DELETED, LSN, RAW};
use crate::config::DeleteMode;
use crate::document::{ChangeDocument, Op};
use crate::relation::Relation;

/// Marks a source row of a merge: `u` upsert, `d` delete.
pub const OP: &str = "__weir_op";
/// Prefix of the per-column "TOAST value not sent" flags of a merge source.
pub const UNCHANGED_PREFIX: &str = "__weir_unchanged_";

/// The last state of one key within a batch.
#[derive(Debug)]
struct Pending {
    delete: bool,
    row: Map<String, Value>,
    /// Columns whose value is not known (unchanged TOAST with no earlier value in the batch).
    unchanged: Vec<String>,
    /// For a row whose update moved it from another key: that key's row (its key columns),
    /// where the unchanged columns' stored values are.
    moved_from: Option<Map<String, Value>>,
    /// Values read back from the table, already in Arrow's JSON form.
    stored: Map<String, Value>,
    lsn: u64,
    ts_ms: i64,
}

/// Changes of one table reduced to one state per key.
#[derive(Debug, Default)]
pub struct Reduced {
    /// A truncate happened (before `rows`).
    pub truncated: Option<(u64, i64)>,
    order: Vec<String>,
    rows: HashMap<String, Pending>,
}

impl Reduced {
    /// Whether there is no row to merge.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Folds `doc` (a change of the table `rel` describes) into the reduction.
    pub fn push(&mut self, rel: &Relation, doc: &ChangeDocument) {
        let lsn = doc.source.lsn.0;
        let ts_ms = doc.source.ts_ms;
        match doc.op {
            Op::Truncate => {
                self.rows.clear();
                self.order.clear();
                self.truncated = Some((lsn, ts_ms));
            }
            Op::Delete => {
                let row: Map<String, Value> = doc
                    .columns
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                let key = key_of(rel, &row);
                self.set(
                    key,
                    Pending {
                        delete: true,
                        row,
                        unchanged: Vec::new(),
                        moved_from: None,
                        stored: Map::new(),
                        lsn,
                        ts_ms,
                    },
                );
            }
            Op::Insert | Op::Update | Op::Read => {
                let mut row: Map<String, Value> = doc
                    .columns
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect();
                let key = key_of(rel, &row);
                // An update that moved the row: the old key goes, and the row's earlier
                // state (and stored values) are the old key's.
                let old = doc.before.as_ref().and_then(|before| {
                    let old: Map<String, Value> = before
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.clone()))
                        .collect();
                    let old_key = key_of(rel, &old);
                    (old_key != key).then_some((old_key, old))
                });
                let source_key = old.as_ref().map_or(&key, |(k, _)| k);
                let previous = self
                    .rows
                    .get(source_key)
                    .filter(|p| !p.delete)
                    .map(|p| (p.row.clone(), p.unchanged.clone(), p.moved_from.clone()));
                let mut moved_from = previous.as_ref().and_then(|p| p.2.clone());
                if let Some((old_key, old_row)) = old {
                    moved_from = moved_from.or_else(|| Some(old_row.clone()));
                    self.set(
                        old_key,
                        Pending {
                            delete: true,
                            row: old_row,
                            unchanged: Vec::new(),
                            moved_from: None,
                            stored: Map::new(),
                            lsn,
                            ts_ms,
                        },
                    );
                }
                let (row_before, unchanged_before, _) = previous.unwrap_or_default();
                self.fill_unchanged(&mut row, doc, &row_before, &unchanged_before);
                let unchanged = doc
                    .unchanged
                    .iter()
                    .filter(|u| !row.contains_key(&***u))
                    .map(|u| u.to_string())
                    .collect();
                self.set(
                    key,
                    Pending {
                        delete: false,
                        row,
                        unchanged,
                        moved_from,
                        stored: Map::new(),
                        lsn,
                        ts_ms,
                    },
                );
            }
        }
    }

    /// Copies the values of `doc`'s unchanged columns from the same row's earlier state.
    fn fill_unchanged(
        &self,
        row: &mut Map<String, Value>,
        doc: &ChangeDocument,
        earlier: &Map<String, Value>,
        earlier_unknown: &[String],
    ) {
        for name in &doc.unchanged {
            if earlier_unknown.iter().any(|u| **u == **name) {
                continue;
            }
            if let Some(v) = earlier.get(&**name) {
                row.insert(name.to_string(), v.clone());
            }
        }
    }

    /// Rows moved to a new key whose unchanged values must be read from the table:
    /// (new key, old key's row, columns).
    pub fn needs_stored_values(&self) -> Vec<(String, Map<String, Value>, Vec<String>)> {
        self.order
            .iter()
            .filter_map(|k| {
                let p = self.rows.get(k)?;
                let from = p.moved_from.as_ref()?;
                (!p.delete && !p.unchanged.is_empty())
                    .then(|| (k.clone(), from.clone(), p.unchanged.clone()))
            })
            .collect()
    }

    /// Supplies values read from the table (in Arrow's JSON form) for a moved row.
    pub fn set_stored_values(&mut self, key: &str, values: Map<String, Value>) {
        if let Some(p) = self.rows.get_mut(key) {
            p.unchanged.retain(|u| !values.contains_key(u));
            p.stored.extend(values);
        }
    }

    fn set(&mut self, key: String, p: Pending) {
        if self.rows.insert(key.clone(), p).is_none() {
            self.order.push(key);
        }
    }

    /// The merge source rows (JSON objects in Arrow's JSON form) and the plan for them.
    pub fn into_merge(
        self,
        rel: &Relation,
        target: &deltalake::arrow::datatypes::Schema,
        mode: DeleteMode,
    ) -> (SchemaRef, Vec<Map<String, Value>>, MergePlan) {
        let mut toast: Vec<String> = Vec::new();
        for p in self.rows.values() {
            for u in &p.unchanged {
                if !toast.contains(u) {
                    toast.push(u.clone());
                }
            }
        }
        let columns: Vec<(&str, DataType)> = rel
            .columns
            .iter()
            .filter_map(|c| {
                let f = target.field_with_name(&c.name).ok()?;
                Some((&*c.name, f.data_type().clone()))
            })
            .collect();
        let with_raw = target.field_with_name(RAW).is_ok();
        let mut rows = Vec::with_capacity(self.rows.len());
        let mut all = self.rows;
        for key in &self.order {
            let Some(p) = all.remove(key) else { continue };
            let mut out = Map::with_capacity(columns.len() + 5);
            let mut src = p.row;
            let mut raw = Map::new();
            for (name, ty) in &columns {
                if let Some(v) = src.remove(*name) {
                    // Most values go as they are (moved, not copied); only a converted
                    // one can have lost something.
                    let changed = match to_arrow_json_ref(&v, ty) {
                        Cow::Borrowed(_) => None,
                        Cow::Owned(c) => Some(c),
                    };
                    let converted = match changed {
                        None => v,
                        Some(c) => {
                            if lost(&v, &c) {
                                raw.insert(name.to_string(), v);
                            }
                            c
                        }
                    };
                    out.insert(name.to_string(), converted);
                } else if let Some(v) = p.stored.get(*name) {
                    out.insert(name.to_string(), v.clone());
                }
            }
            if !raw.is_empty() {
                out.insert(RAW.into(), Value::String(Value::Object(raw).to_string()));
            }
            out.insert(OP.into(), Value::from(if p.delete { "d" } else { "u" }));
            out.insert(LSN.into(), Value::from(p.lsn as i64));
            out.insert(COMMIT_TS.into(), Value::from(p.ts_ms * 1000));
            for t in &toast {
                out.insert(
                    format!("{UNCHANGED_PREFIX}{t}"),
                    Value::Bool(p.unchanged.contains(t)),
                );
            }
            rows.push(out);
        }
        let mut extra = source_fields();
        for t in &toast {
            extra.push(Field::new(
                format!("{UNCHANGED_PREFIX}{t}"),
                DataType::Boolean,
                true,
            ));
        }
        let mut names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
        if with_raw {
            names.push(RAW);
        }
        let schema = project(target, &names, extra);
        let plan = MergePlan::new(rel, &names, toast, mode);
        (schema, rows, plan)
    }
}

/// The merge source of a batch that only inserts (or reads, in a backfill) distinct keys,
/// every column sent: the documents' values go to Arrow as they are, without the
/// reduction by key of [`Reduced`] (the common case, and several times cheaper). `None`
/// when the batch holds anything else: an update, a delete, a truncate, a TOAST value not
/// sent, a key twice.
pub fn inserts_only(
    rel: &Relation,
    docs: &[&ChangeDocument],
    target: &deltalake::arrow::datatypes::Schema,
    mode: DeleteMode,
) -> Option<Result<(RecordBatch, MergePlan), ArrowError>> {
    if docs.is_empty()
        || !docs
            .iter()
            .all(|d| matches!(d.op, Op::Insert | Op::Read) && d.unchanged.is_empty())
    {
        return None;
    }
    let columns: Vec<(&str, &DataType)> = rel
        .columns
        .iter()
        .filter_map(|c| Some((&*c.name, target.field_with_name(&c.name).ok()?.data_type())))
        .collect();
    let keys = key_columns(rel);
    let with_raw = target.field_with_name(RAW).is_ok();
    // Distinct keys: integers in a set of integers, others as their JSON text.
    let mut ints = std::collections::HashSet::with_capacity(docs.len());
    let mut texts = std::collections::HashSet::new();
    let mut rows = Vec::with_capacity(docs.len());
    let upsert = Value::from("u");
    for d in docs {
        let value =
            |name: &str, hint: usize| match d.columns.get(hint).filter(|(n, _)| &**n == name) {
                Some((_, v)) => Some(v),
                None => d.columns.iter().find(|(n, _)| &**n == name).map(|(_, v)| v),
            };
        let int_key = match keys.as_slice() {
            [k] => value(k, 0).and_then(Value::as_i64),
            _ => None,
        };
        let distinct = match int_key {
            Some(id) => ints.insert(id),
            None => {
                let key: Vec<&Value> = keys
                    .iter()
                    .map(|k| value(k, 0).unwrap_or(&Value::Null))
                    .collect();
                texts.insert(serde_json::to_string(&key).unwrap_or_default())
            }
        };
        if !distinct {
            return None;
        }
        let mut row: Vec<Cow<'_, Value>> = Vec::with_capacity(columns.len() + 4);
        let mut raw: Option<Map<String, Value>> = None;
        for (i, (name, ty)) in columns.iter().enumerate() {
            let cell = value(name, i).map_or(Cow::Owned(Value::Null), |v| {
                let converted = to_arrow_json_ref(v, ty);
                if with_raw && lost(v, &converted) {
                    raw.get_or_insert_default()
                        .insert(name.to_string(), v.clone());
                }
                converted
            });
            row.push(cell);
        }
        if with_raw {
            row.push(Cow::Owned(raw.map_or(Value::Null, |r| {
                Value::String(Value::Object(r).to_string())
            })));
        }
        row.push(Cow::Borrowed(&upsert));
        row.push(Cow::Owned(Value::from(d.source.lsn.0 as i64)));
        row.push(Cow::Owned(Value::from(d.source.ts_ms * 1000)));
        rows.push(row);
    }
    let mut names: Vec<&str> = columns.iter().map(|(n, _)| *n).collect();
    if with_raw {
        names.push(RAW);
    }
    let schema = project(target, &names, source_fields());
    let plan = MergePlan::new(rel, &names, Vec::new(), mode);
    Some(record_batch(schema, &rows).map(|batch| (batch, plan)))
}

/// The fields a merge source has after the table's columns (before any TOAST flags).
fn source_fields() -> Vec<Field> {
    vec![
        Field::new(OP, DataType::Utf8, false),
        Field::new(LSN, DataType::Int64, true),
        Field::new(
            COMMIT_TS,
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            true,
        ),
    ]
}

/// The MERGE statement for one batch of a replica.
#[derive(Debug, Clone)]
pub struct MergePlan {
    /// `target.k = source.k AND ...`
    pub predicate: String,
    /// Columns written.
    columns: Vec<String>,
    /// Columns that may carry "unchanged TOAST" flags.
    toast: Vec<String>,
    mode: DeleteMode,
}

impl MergePlan {
    fn new(rel: &Relation, columns: &[&str], toast: Vec<String>, mode: DeleteMode) -> MergePlan {
        MergePlan {
            predicate: key_columns(rel)
                .iter()
                .map(|k| format!("target.{q} = source.{q}", q = quote(k)))
                .collect::<Vec<_>>()
                .join(" AND "),
            columns: columns.iter().map(|n| n.to_string()).collect(),
            toast,
            mode,
        }
    }

    /// Adds the clauses: delete (or mark deleted) the `d` rows that match; update the `u`
    /// rows that match, keeping unchanged TOAST columns; insert the `u` rows that do not.
    pub fn apply(&self, builder: MergeBuilder) -> DeltaResult<MergeBuilder> {
        let is_delete = format!("source.{OP} = 'd'");
        let is_upsert = format!("source.{OP} = 'u'");
        let builder = match self.mode {
            DeleteMode::Hard => builder.when_matched_delete(|d| d.predicate(is_delete.clone()))?,
            DeleteMode::Soft => builder.when_matched_update(|u| {
                u.predicate(is_delete.clone())
                    .update(DELETED, "true")
                    .update(LSN, format!("source.{LSN}"))
                    .update(COMMIT_TS, format!("source.{COMMIT_TS}"))
            })?,
        };
        let builder = builder.when_matched_update(|mut u| {
            u = u.predicate(is_upsert.clone());
            for c in &self.columns {
                let q = quote(c);
                let value = if self.toast.contains(c) {
                    format!(
                        "CASE WHEN source.{flag} THEN target.{q} ELSE source.{q} END",
                        flag = quote(&format!("{UNCHANGED_PREFIX}{c}"))
                    )
                } else {
                    format!("source.{q}")
                };
                u = u.update(column(c), value);
            }
            u = u
                .update(LSN, format!("source.{LSN}"))
                .update(COMMIT_TS, format!("source.{COMMIT_TS}"));
            if self.mode == DeleteMode::Soft {
                u = u.update(DELETED, "false");
            }
            u
        })?;
        builder.when_not_matched_insert(|mut i| {
            i = i.predicate(is_upsert.clone());
            for c in &self.columns {
                i = i.set(column(c), format!("source.{}", quote(c)));
            }
            i = i
                .set(LSN, format!("source.{LSN}"))
                .set(COMMIT_TS, format!("source.{COMMIT_TS}"));
            if self.mode == DeleteMode::Soft {
                i = i.set(DELETED, "false");
            }
            i
        })
    }
}

/// A column name as a merge target (never split at dots, case kept).
pub fn column(name: &str) -> deltalake::datafusion::common::Column {
    deltalake::datafusion::common::Column::new_unqualified(name)
}

/// A SQL identifier, quoted.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The key of a row: its key columns' values, as JSON text.
pub fn key_of(rel: &Relation, row: &Map<String, Value>) -> String {
    let values: Vec<&Value> = rel
        .columns
        .iter()
        .filter(|c| c.key)
        .map(|c| row.get(&*c.name).unwrap_or(&Value::Null))
        .collect();
    serde_json::to_string(&values).unwrap_or_default()
}

/// Names of the key columns of `rel`.
pub fn key_columns(rel: &Relation) -> Vec<String> {
    rel.columns
        .iter()
        .filter(|c| c.key)
        .map(|c| c.name.to_string())
        .collect()
}

/// Whether a replica of `rel` can be kept by key.
pub fn has_key(rel: &Relation) -> bool {
    rel.columns.iter().any(|c| c.key)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use deltalake::arrow::datatypes::Schema;
    use serde_json::json;

    use super::*;
    use crate::decode::TypeKind;
    use crate::document::Source;
    use crate::lsn::Lsn;
    use crate::relation::ColumnInfo;
    use crate::sink::delta::schema::arrow_field;

    fn relation() -> Relation {
        let col = |name: &str, type_id, type_modifier, kind, key| ColumnInfo {
            name: name.into(),
            type_id,
            type_modifier,
            kind,
            key,
            attnum: None,
            missing: None,
            has_default: false,
        };
        Relation {
            oid: 0,
            schema: "public".into(),
            table: "transactions".into(),
            columns: vec![
                col("transaction_id", 20, -1, TypeKind::Integer, true),
                col("user_id", 20, -1, TypeKind::Integer, false),
                col("transaction_date", 1184, -1, TypeKind::TimestampTz, false),
                col("amount", 1700, (12 << 16 | 2) + 4, TypeKind::Numeric, false),
            ],
            multiset: false,
            storage: None,
        }
    }

    fn doc(op: Op, id: i64, amount: &str, seq: u64) -> ChangeDocument {
        let columns = vec![
            (Arc::from("transaction_id"), json!(id)),
            (Arc::from("user_id"), json!(id % 7)),
            (
                Arc::from("transaction_date"),
                json!("2026-11-29T10:00:00.123456Z"),
            ),
            (Arc::from("amount"), json!(amount)),
        ];
        ChangeDocument {
            op,
            columns,
            source: Source {
                oid: 0,
                schema: "public".into(),
                table: "transactions".into(),
                lsn: Lsn(1000 + seq),
                txid: Some(7),
                ts_ms: 1_795_940_000_000 + seq as i64,
                seq,
                snapshot: false,
            },
            before: None,
            unchanged: Vec::new(),
            exact: Vec::new(),
        }
    }

    fn target(rel: &Relation) -> Schema {
        Schema::new(rel.columns.iter().map(arrow_field).collect::<Vec<_>>())
    }

    #[test]
    fn inserts_go_to_arrow_as_the_reduction_would_send_them() {
        let rel = relation();
        let target = target(&rel);
        let docs: Vec<ChangeDocument> = (1..=50)
            .map(|i| doc(Op::Insert, i, &format!("{i}.25"), i as u64))
            .collect();
        let refs: Vec<&ChangeDocument> = docs.iter().collect();
        let (fast, fast_plan) = inserts_only(&rel, &refs, &target, DeleteMode::Hard)
            .expect("inserts of distinct keys")
            .unwrap();
        let mut reduced = Reduced::default();
        for d in &docs {
            reduced.push(&rel, d);
        }
        let (schema, rows, plan) = reduced.into_merge(&rel, &target, DeleteMode::Hard);
        let slow = record_batch(schema, &rows).unwrap();
        assert_eq!(fast, slow);
        assert_eq!(fast_plan.predicate, plan.predicate);
        assert_eq!(fast_plan.columns, plan.columns);
        assert!(fast_plan.toast.is_empty() && plan.toast.is_empty());
    }

    #[test]
    fn anything_but_distinct_inserts_goes_through_the_reduction() {
        let rel = relation();
        let target = target(&rel);
        let fast = |docs: &[ChangeDocument]| {
            let refs: Vec<&ChangeDocument> = docs.iter().collect();
            inserts_only(&rel, &refs, &target, DeleteMode::Soft).is_some()
        };
        assert!(fast(&[
            doc(Op::Read, 1, "1", 1),
            doc(Op::Insert, 2, "2", 2)
        ]));
        assert!(!fast(&[]));
        assert!(!fast(&[
            doc(Op::Insert, 1, "1", 1),
            doc(Op::Insert, 1, "2", 2)
        ]));
        assert!(!fast(&[
            doc(Op::Insert, 1, "1", 1),
            doc(Op::Update, 2, "2", 2)
        ]));
        assert!(!fast(&[
            doc(Op::Insert, 1, "1", 1),
            doc(Op::Delete, 1, "1", 2)
        ]));
        let mut toast = doc(Op::Insert, 3, "3", 3);
        toast.unchanged.push("amount".into());
        assert!(!fast(&[toast]));
    }
}
