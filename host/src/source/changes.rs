//! From decoded pgoutput messages to change documents.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::decode::TypeRegistry;
use crate::decode::pgoutput::{Message, OldKind, TupleValue};
use crate::decode::value::to_json_exact;
use crate::document::{ChangeDocument, ExactJson, Op, Row, Source};
use crate::lsn::Lsn;
use crate::relation::{ColumnInfo, Relation};

/// Microseconds between 1970-01-01 and 2000-01-01, PostgreSQL's epoch.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// PostgreSQL timestamp (microseconds since 2000) to Unix milliseconds.
pub fn pg_time_to_unix_ms(pg_micros: i64) -> i64 {
    (pg_micros + PG_EPOCH_OFFSET_US).div_euclid(1000)
}

/// The transaction whose changes are being decoded.
#[derive(Debug, Clone, Copy)]
pub struct Transaction {
    /// Commit LSN.
    pub lsn: Lsn,
    /// Transaction id.
    pub xid: u32,
    /// Commit time, Unix milliseconds.
    pub ts_ms: i64,
    /// Next change's position in the transaction.
    pub seq: u64,
}

/// Keeps the relation cache and turns row messages into documents.
#[derive(Debug, Default)]
pub struct ChangeBuilder {
    relations: HashMap<u32, Arc<Relation>>,
    types: TypeRegistry,
    /// Primary key columns by OID of every configured table, from the catalog: with
    /// `REPLICA IDENTITY FULL` pgoutput flags every column as key, but the row's key is
    /// still the primary key. A relation whose OID is not here is not configured.
    primary_keys: HashMap<u32, Vec<Arc<str>>>,
    /// Relations of the publication that `source.tables` does not list, and how many of
    /// their changes were passed over: not wanted (reported once each).
    unconfigured: HashMap<u32, u64>,
    /// Accept relations of any table (tests and tools that configure none).
    any_table: bool,
}

/// What a decoded message means for the stream.
#[derive(Debug)]
pub enum Decoded {
    /// Documents to deliver (one per row; one per table for TRUNCATE).
    Documents(Vec<ChangeDocument>),
    /// A table's shape, new or changed (a Relation message).
    Schema(Arc<Relation>),
    /// Nothing to deliver (bookkeeping messages).
    Nothing,
}

impl ChangeBuilder {
    /// A builder that resolves custom types with `types`.
    pub fn new(types: TypeRegistry, primary_keys: HashMap<u32, Vec<Arc<str>>>) -> Self {
        ChangeBuilder {
            relations: HashMap::new(),
            types,
            primary_keys,
            unconfigured: HashMap::new(),
            any_table: false,
        }
    }

    /// The column types of a Relation message of a configured table that are neither
    /// builtin nor described yet (a type created after the capture started).
    pub fn unknown_types(&self, msg: &Message<'_>) -> Vec<u32> {
        match msg {
            Message::Relation { id, columns, .. }
                if self.any_table || self.primary_keys.contains_key(id) =>
            {
                columns
                    .iter()
                    .map(|c| c.type_id)
                    .filter(|t| !self.types.knows(*t))
                    .collect()
            }
            _ => Vec::new(),
        }
    }

    /// Records what the catalog says about more types.
    pub fn describe_types(&mut self, types: &[crate::decode::value::TypeDescription]) {
        self.types.describe(types);
    }

    /// Whether a change of relation `id` is one to deliver; counts those that are not.
    fn wanted(&mut self, id: u32) -> bool {
        if self.any_table || self.primary_keys.contains_key(&id) {
            return true;
        }
        *self.unconfigured.entry(id).or_default() += 1;
        false
    }

    /// Applies a message in the context of `txn`.
    pub fn apply(&mut self, msg: Message<'_>, txn: &mut Transaction) -> Result<Decoded, String> {
        match msg {
            Message::Relation {
                id,
                namespace,
                name,
                columns,
                ..
            } => {
                if !self.any_table && !self.primary_keys.contains_key(&id) {
                    // In the publication but not in source.tables (a publication shared
                    // with other consumers, or a table added to it by hand): not wanted.
                    // Configured tables are known by OID, so a renamed one still
                    // matches, and partitions arrive as their root (the publication
                    // publishes via the partition root).
                    if let std::collections::hash_map::Entry::Vacant(e) =
                        self.unconfigured.entry(id)
                    {
                        tracing::warn!(
                            table = %format!("{namespace}.{name}"),
                            oid = id,
                            "the publication sends changes of a table that source.tables does not \
                             list: they are not captured. Add it to source.tables to capture it, \
                             or remove it from the publication"
                        );
                        e.insert(0);
                    }
                    return Ok(Decoded::Nothing);
                }
                if let Some(old) = self.relations.get(&id)
                    && (*old.schema != *namespace || *old.table != *name)
                {
                    tracing::warn!(
                        from = %format!("{}.{}", old.schema, old.table),
                        to = %format!("{namespace}.{name}"),
                        oid = id,
                        "a captured table was renamed: its changes keep going to the same Delta \
                         tables. Write the new name in source.tables before the next start"
                    );
                }
                let pk = self.primary_keys.get(&id).filter(|pk| !pk.is_empty());
                // REPLICA IDENTITY FULL flags every column; without a key of its own the
                // table is a multiset, identified by whole rows.
                let multiset = pk.is_none() && !columns.is_empty() && columns.iter().all(|c| c.key);
                let columns = columns
                    .iter()
                    .map(|c| ColumnInfo {
                        name: c.name.into(),
                        type_id: c.type_id,
                        type_modifier: c.type_modifier,
                        kind: self.types.kind(c.type_id),
                        key: match pk {
                            Some(pk) => pk.iter().any(|k| **k == *c.name),
                            None => c.key && !multiset,
                        },
                        // From the catalog, by the capture (see `Worker::describe_columns`).
                        attnum: None,
                        missing: None,
                        has_default: false,
                    })
                    .collect();
                let rel = Arc::new(Relation {
                    oid: id,
                    schema: namespace.into(),
                    table: name.into(),
                    columns,
                    multiset,
                    storage: None,
                });
                self.relations.insert(id, rel.clone());
                Ok(Decoded::Schema(rel))
            }
            Message::Insert { relation, .. }
            | Message::Update { relation, .. }
            | Message::Delete { relation, .. }
                if !self.wanted(relation) =>
            {
                Ok(Decoded::Nothing)
            }
            Message::Insert { relation, new } => {
                let rel = self.relation(relation)?;
                let (columns, unchanged, exact) = row(&rel, &new, false, false)?;
                Ok(Decoded::Documents(vec![doc(
                    &rel,
                    txn,
                    Op::Insert,
                    columns,
                    None,
                    unchanged,
                    exact,
                )]))
            }
            Message::Update { relation, old, new } => {
                let rel = self.relation(relation)?;
                let (columns, unchanged, mut exact) = row(&rel, &new, false, false)?;
                let before = match old {
                    Some((kind, old)) => {
                        let (before, _, old_exact) = row(&rel, &old, kind == OldKind::Key, true)?;
                        exact.extend(old_exact);
                        Some(before)
                    }
                    None => None,
                };
                Ok(Decoded::Documents(vec![doc(
                    &rel,
                    txn,
                    Op::Update,
                    columns,
                    before,
                    unchanged,
                    exact,
                )]))
            }
            Message::Delete {
                relation,
                old: (kind, old),
            } => {
                let rel = self.relation(relation)?;
                let (columns, unchanged, exact) = row(&rel, &old, kind == OldKind::Key, false)?;
                Ok(Decoded::Documents(vec![doc(
                    &rel,
                    txn,
                    Op::Delete,
                    columns,
                    None,
                    unchanged,
                    exact,
                )]))
            }
            Message::Truncate { relations, .. } => {
                let mut docs = Vec::with_capacity(relations.len());
                for id in relations {
                    if !self.wanted(id) {
                        continue;
                    }
                    let rel = self.relation(id)?;
                    docs.push(doc(
                        &rel,
                        txn,
                        Op::Truncate,
                        Vec::new(),
                        None,
                        Vec::new(),
                        Vec::new(),
                    ));
                }
                Ok(Decoded::Documents(docs))
            }
            Message::Type { .. }
            | Message::Origin { .. }
            | Message::LogicalMessage { .. }
            | Message::Begin { .. }
            | Message::Commit { .. } => Ok(Decoded::Nothing),
        }
    }

    fn relation(&self, id: u32) -> Result<Arc<Relation>, String> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or_else(|| format!("change for table OID {id} arrived before its Relation message"))
    }
}

fn doc(
    rel: &Relation,
    txn: &mut Transaction,
    op: Op,
    columns: Row,
    before: Option<Row>,
    unchanged: Vec<Arc<str>>,
    exact: Vec<ExactJson>,
) -> ChangeDocument {
    let seq = txn.seq;
    txn.seq += 1;
    ChangeDocument {
        op,
        columns,
        source: Source {
            oid: rel.oid,
            schema: rel.schema.clone(),
            table: rel.table.clone(),
            lsn: txn.lsn,
            txid: Some(txn.xid),
            ts_ms: txn.ts_ms,
            seq,
            snapshot: false,
        },
        before,
        unchanged,
        exact,
    }
}

/// A tuple's columns, the names of those not sent (unchanged TOAST), the exact json texts.
type Converted = (Row, Vec<Arc<str>>, Vec<ExactJson>);

/// The columns of a tuple, those whose unchanged TOAST value was not sent, and the exact
/// text of json values (of the old row: `before`); with `key_only`, only replica
/// identity columns are kept.
fn row(
    rel: &Relation,
    values: &[TupleValue<'_>],
    key_only: bool,
    before: bool,
) -> Result<Converted, String> {
    if values.len() != rel.columns.len() {
        return Err(format!(
            "row of {}.{} has {} values but the table has {} columns",
            rel.schema,
            rel.table,
            values.len(),
            rel.columns.len()
        ));
    }
    let mut out = Vec::with_capacity(values.len());
    let mut unchanged = Vec::new();
    let mut exact = Vec::new();
    for (col, value) in rel.columns.iter().zip(values) {
        if key_only && !col.key {
            continue;
        }
        let json = match value {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => {
                unchanged.push(col.name.clone());
                continue;
            }
            TupleValue::Text(bytes) => {
                let (json, text) = to_json_exact(&col.kind, &String::from_utf8_lossy(bytes));
                if let Some(text) = text {
                    exact.push(ExactJson {
                        before,
                        column: col.name.clone(),
                        text,
                    });
                }
                json
            }
            TupleValue::Binary(bytes) => {
                use base64::Engine as _;
                Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            }
        };
        out.push((col.name.clone(), json));
    }
    Ok((out, unchanged, exact))
}

/// Builds a backfill row from COPY fields already unescaped (`None` is NULL), and the
/// exact text of its json values that need one.
pub fn backfill_row(columns: &[ColumnInfo], fields: &[Option<String>]) -> (Row, Vec<ExactJson>) {
    let mut exact = Vec::new();
    let row = columns
        .iter()
        .zip(fields)
        .map(|(c, f)| {
            let v = match f {
                None => Value::Null,
                Some(text) => {
                    let (v, text) = to_json_exact(&c.kind, text);
                    if let Some(text) = text {
                        exact.push(ExactJson {
                            before: false,
                            column: c.name.clone(),
                            text,
                        });
                    }
                    v
                }
            };
            (c.name.clone(), v)
        })
        .collect();
    (row, exact)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::pgoutput::decode;
    use crate::decode::pgoutput::tests::{Builder, relation, update_with_old_key};
    use serde_json::json;

    #[test]
    fn update_with_unchanged_toast_and_old_key() {
        let mut b = ChangeBuilder {
            any_table: true,
            ..Default::default()
        };
        let mut txn = Transaction {
            lsn: Lsn(0x10),
            xid: 5,
            ts_ms: 0,
            seq: 0,
        };
        b.apply(decode(&relation()).unwrap(), &mut txn).unwrap();
        let upd = update_with_old_key();
        let Decoded::Documents(docs) = b.apply(decode(&upd).unwrap(), &mut txn).unwrap() else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_str(&docs[0].to_json()).unwrap();
        assert_eq!(v["id"], json!(2));
        assert!(
            v.get("email").is_none(),
            "unchanged TOAST must not appear as a value"
        );
        assert_eq!(v["_meta"]["unchanged"], json!(["email"]));
        assert_eq!(v["_meta"]["before"], json!({"id": 1}));
        assert_eq!(v["_meta"]["op"], json!("u"));
        // A change for an unknown relation is an error, not a panic.
        let ins = Builder::tag(b'I').u32(99).u8(b'N').u16(0).0;
        assert!(b.apply(decode(&ins).unwrap(), &mut txn).is_err());
    }

    #[test]
    fn pg_epoch() {
        assert_eq!(pg_time_to_unix_ms(0), 946_684_800_000);
    }
}
