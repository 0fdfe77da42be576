//! The change document: one row change as the stages after the source see it.
//!
//! Serialized as a JSON object: the row's columns at top level, in table order, plus
//! `_meta` (see the README's "Change documents" section for every field and type form).

use std::sync::Arc;

use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::Value;

use crate::lsn::Lsn;

/// Name of the metadata field added to every change document.
pub const META_FIELD: &str = "_meta";

/// What happened to the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Op {
    /// A row inserted (`c` for create).
    #[serde(rename = "c")]
    Insert,
    /// A row updated.
    #[serde(rename = "u")]
    Update,
    /// A row deleted; the top level holds the old key (or the old row with
    /// `REPLICA IDENTITY FULL`).
    #[serde(rename = "d")]
    Delete,
    /// A row read by the initial backfill.
    #[serde(rename = "r")]
    Read,
    /// The table was truncated; the document has no columns.
    #[serde(rename = "t")]
    Truncate,
}

/// Where and when a change happened in the source database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// OID of the table (the identity the sinks route by; not part of the JSON form, 0 in
    /// a document read back from JSON).
    pub oid: u32,
    /// Schema of the table.
    pub schema: Arc<str>,
    /// Table name.
    pub table: Arc<str>,
    /// Commit LSN of the source transaction (for backfill reads: the slot's consistent point).
    pub lsn: Lsn,
    /// Transaction id (`None` for backfill reads).
    pub txid: Option<u32>,
    /// Commit time in milliseconds since the Unix epoch (backfill: when the copy started).
    pub ts_ms: i64,
    /// Position of the change inside its transaction (backfill: row number in its table).
    pub seq: u64,
    /// True for rows read by the backfill.
    pub snapshot: bool,
}

/// Column names and values in table order.
pub type Row = Vec<(Arc<str>, Value)>;

/// One change to one row, ready to be written as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeDocument {
    /// What happened.
    pub op: Op,
    /// The row's columns. Columns whose unchanged TOAST value PostgreSQL did not send are
    /// absent here and named in `unchanged`.
    pub columns: Row,
    /// Where the change comes from.
    pub source: Source,
    /// The old row (or old key) of an update, when PostgreSQL sent it.
    pub before: Option<Row>,
    /// Columns whose (TOASTed) value did not change and was not sent.
    pub unchanged: Vec<Arc<str>>,
    /// json/jsonb values whose parsed form does not hold every number digit for digit:
    /// their exact text, serialized in place of the value and stored in the lake as it
    /// is. Nearly always empty.
    pub exact: Vec<ExactJson>,
}

/// The exact text of one json/jsonb value (see [`ChangeDocument::exact`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ExactJson {
    /// Of the old row (`before`) rather than the columns.
    pub before: bool,
    pub column: Arc<str>,
    /// Compact JSON text.
    pub text: Box<str>,
}

impl ChangeDocument {
    /// The exact JSON text of a column of the row (`before`: of the old row), if it has
    /// one.
    pub fn exact_text(&self, before: bool, column: &str) -> Option<&str> {
        self.exact
            .iter()
            .find(|e| e.before == before && *e.column == *column)
            .map(|e| &*e.text)
    }
}

impl ChangeDocument {
    /// The document as one line of JSON, without the newline.
    pub fn to_json(&self) -> String {
        // Sized for a typical row and its `_meta` at once: serde_json starts at 128 bytes
        // and would copy the document as it doubles.
        let mut out = Vec::with_capacity(384);
        serde_json::to_writer(&mut out, self).expect("a change document always serializes");
        // SAFETY: serde_json writes only valid UTF-8.
        unsafe { String::from_utf8_unchecked(out) }
    }

    /// Writes the document as JSON to `out`.
    pub fn write_json<W: std::io::Write>(&self, out: W) -> serde_json::Result<()> {
        serde_json::to_writer(out, self)
    }
}

struct RowRef<'a>(&'a Row, &'a ChangeDocument, bool);

impl Serialize for RowRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (name, value) in self.0 {
            map.serialize_entry(&**name, &ValueRef(self.1, self.2, name, value))?;
        }
        map.end()
    }
}

/// A value, or its exact JSON text where the document has one.
struct ValueRef<'a>(&'a ChangeDocument, bool, &'a str, &'a Value);

impl Serialize for ValueRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !self.0.exact.is_empty()
            && let Some(text) = self.0.exact_text(self.1, self.2)
        {
            use serde::ser::Error as _;
            let raw = serde_json::value::RawValue::from_string(text.to_string())
                .map_err(S::Error::custom)?;
            return raw.serialize(s);
        }
        self.3.serialize(s)
    }
}

struct SourceRef<'a>(&'a Source);

impl Serialize for SourceRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let src = self.0;
        let mut map = s.serialize_map(Some(7))?;
        map.serialize_entry("schema", &*src.schema)?;
        map.serialize_entry("table", &*src.table)?;
        map.serialize_entry("lsn", &src.lsn)?;
        map.serialize_entry("txid", &src.txid)?;
        map.serialize_entry("ts_ms", &src.ts_ms)?;
        map.serialize_entry("seq", &src.seq)?;
        map.serialize_entry("snapshot", &src.snapshot)?;
        map.end()
    }
}

struct MetaRef<'a>(&'a ChangeDocument);

impl Serialize for MetaRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let doc = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("op", &doc.op)?;
        map.serialize_entry("source", &SourceRef(&doc.source))?;
        if let Some(before) = &doc.before {
            map.serialize_entry("before", &RowRef(before, doc, true))?;
        }
        if !doc.unchanged.is_empty() {
            let names: Vec<&str> = doc.unchanged.iter().map(|n| &**n).collect();
            map.serialize_entry("unchanged", &names)?;
        }
        map.end()
    }
}

impl Serialize for ChangeDocument {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.columns.len() + 1))?;
        for (name, value) in &self.columns {
            // A source column that happens to be called `_meta` would make the object
            // ambiguous; the metadata wins and the column is reachable as `__meta`.
            let value = ValueRef(self, false, name, value);
            if &**name == META_FIELD {
                map.serialize_entry("__meta", &value)?;
            } else {
                map.serialize_entry(&**name, &value)?;
            }
        }
        map.serialize_entry(META_FIELD, &MetaRef(self))?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn serializes_columns_then_meta() {
        let doc = ChangeDocument {
            op: Op::Update,
            columns: vec![("id".into(), json!(1)), ("amount".into(), json!("10.50"))],
            source: Source {
                oid: 0,
                schema: "public".into(),
                table: "transactions".into(),
                lsn: Lsn(0x16B3748),
                txid: Some(731),
                ts_ms: 1_700_000_000_000,
                seq: 2,
                snapshot: false,
            },
            before: Some(vec![("id".into(), json!(1))]),
            unchanged: vec!["note".into()],
            exact: Vec::new(),
        };
        assert_eq!(
            doc.to_json(),
            r#"{"id":1,"amount":"10.50","_meta":{"op":"u","source":{"schema":"public","table":"transactions","lsn":"0/16B3748","txid":731,"ts_ms":1700000000000,"seq":2,"snapshot":false},"before":{"id":1},"unchanged":["note"]}}"#
        );
    }

    #[test]
    fn an_exact_json_text_is_written_in_place_of_the_value() {
        let mut doc = ChangeDocument {
            op: Op::Insert,
            columns: vec![("id".into(), json!(1)), ("j".into(), json!({"n": 1.0}))],
            source: Source {
                oid: 0,
                schema: "public".into(),
                table: "t".into(),
                lsn: Lsn(1),
                txid: None,
                ts_ms: 0,
                seq: 0,
                snapshot: false,
            },
            before: Some(vec![("j".into(), json!(2.0))]),
            unchanged: Vec::new(),
            exact: Vec::new(),
        };
        doc.exact.push(ExactJson {
            before: false,
            column: "j".into(),
            text: r#"{"n":1.00000000000000000001}"#.into(),
        });
        doc.exact.push(ExactJson {
            before: true,
            column: "j".into(),
            text: "1e400".into(),
        });
        let text = doc.to_json();
        assert!(
            text.starts_with(r#"{"id":1,"j":{"n":1.00000000000000000001},"_meta""#),
            "{text}"
        );
        assert!(text.contains(r#""before":{"j":1e400}"#), "{text}");
    }
}
