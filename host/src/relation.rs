//! A source table's identity and shape, shared by the capture and the sinks: resolved once
//! from the catalog at start (oid, schema and name exactly as PostgreSQL has them), kept
//! current by Relation messages while streaming. No stage parses a table name itself:
//! changes are routed by the table's oid.

use std::sync::Arc;

use crate::decode::TypeKind;

/// A configured table, as found in the catalog.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table OID: the identity every stage routes by.
    pub oid: u32,
    /// Schema, exactly as the catalog has it.
    pub schema: Arc<str>,
    /// Name, exactly as the catalog has it.
    pub name: Arc<str>,
    /// The entry of `source.tables` it was resolved from (for per-table settings).
    pub configured: String,
    /// A partitioned table: captured through its root (every partition, also later ones).
    pub partitioned: bool,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Whether a primary key exists.
    pub has_primary_key: bool,
    /// The row's key columns, in key order: the replica identity index's with `REPLICA
    /// IDENTITY USING INDEX` (the old key PostgreSQL sends for updates and deletes, even
    /// when a primary key exists too), else the primary key's (empty without one).
    pub primary_key: Vec<Arc<str>>,
}

impl TableInfo {
    /// Whether PostgreSQL can identify this table's rows in updates and deletes.
    pub fn has_identity(&self) -> bool {
        match self.replica_identity {
            b'f' | b'i' => true,
            b'd' => self.has_primary_key,
            _ => false,
        }
    }

    /// Whether rows are identified by all their values (`REPLICA IDENTITY FULL` without a
    /// key): the replica is then a multiset.
    pub fn multiset(&self) -> bool {
        self.replica_identity == b'f' && self.primary_key.is_empty()
    }

    /// `"schema"."table"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        quote_qualified(&self.schema, &self.name)
    }

    /// `schema.table` as the catalog spells it, for messages.
    pub fn display(&self) -> String {
        format!("{}.{}", self.schema, self.name)
    }

    /// A table named in the configuration, resolved without a database: by PostgreSQL's
    /// rules for identifiers (unquoted names fold to lower case, `"..."` keeps them,
    /// `""` is a quote; no schema means `public`). For maintenance commands, which need
    /// the lake's tables but not the source; `oid` is only a placeholder then.
    pub fn offline(configured: &str, oid: u32) -> TableInfo {
        let parts = split_identifiers(configured);
        let (schema, name) = match parts.as_slice() {
            [name] => ("public".to_string(), name.clone()),
            [.., schema, name] => (schema.clone(), name.clone()),
            [] => ("public".to_string(), configured.to_string()),
        };
        TableInfo {
            oid,
            schema: schema.into(),
            name: name.into(),
            configured: configured.to_string(),
            partitioned: false,
            replica_identity: b'd',
            has_primary_key: false,
            primary_key: Vec::new(),
        }
    }
}

/// `"schema"."table"`, quoted for SQL.
pub fn quote_qualified(schema: &str, table: &str) -> String {
    format!(
        "\"{}\".\"{}\"",
        schema.replace('"', "\"\""),
        table.replace('"', "\"\"")
    )
}

/// Splits a (possibly qualified) SQL name into identifiers as PostgreSQL reads them.
fn split_identifiers(text: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut chars = text.trim().chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' => quoted = !quoted,
            '.' if !quoted => parts.push(std::mem::take(&mut cur)),
            c if quoted => cur.push(c),
            c if c.is_whitespace() => {}
            c => cur.extend(c.to_lowercase()),
        }
    }
    parts.push(cur);
    parts
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnInfo {
    /// Column name.
    pub name: Arc<str>,
    /// Type OID.
    pub type_id: u32,
    /// `atttypmod`: precision and scale of `numeric(p,s)`, length of `varchar(n)`; -1 when
    /// none.
    pub type_modifier: i32,
    /// How its text becomes JSON.
    pub kind: TypeKind,
    /// Part of the row's key: the primary key when the table has one, else the replica
    /// identity.
    pub key: bool,
    /// `attnum`: the column's number in its table, which a `RENAME COLUMN` keeps and a
    /// `DROP` + `ADD` does not (`None` when the catalog no longer has a column of that
    /// name: renamed or dropped again since).
    pub attnum: Option<i16>,
    /// The value rows that existed before `ADD COLUMN ... DEFAULT x` have for it
    /// (`attmissingval`), when PostgreSQL keeps one.
    pub missing: Option<Missing>,
    /// The column has a default (`atthasdef`): a table rewrite that adds it gives the
    /// older rows values the stream does not carry.
    pub has_default: bool,
}

/// What rows older than `ADD COLUMN ... DEFAULT x` hold for the column (see
/// [`ColumnInfo::missing`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Missing {
    /// `x` as a change document has it.
    pub value: serde_json::Value,
    /// Its exact JSON text, for a json value whose numbers `value` does not keep (see
    /// [`crate::document::ChangeDocument::exact`]).
    pub exact: Option<Box<str>>,
}

/// The current shape of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Table OID (the relation id of pgoutput's messages).
    pub oid: u32,
    /// Schema.
    pub schema: Arc<str>,
    /// Name.
    pub table: Arc<str>,
    /// Columns in table order.
    pub columns: Vec<ColumnInfo>,
    /// Rows are identified by all their values (`REPLICA IDENTITY FULL` without a key;
    /// no column is then a key column): the replica holds the table as a multiset.
    pub multiset: bool,
    /// Where the table's rows are stored (the sum of its partitions' `relfilenode`s), when
    /// the catalog was read for a shape equal to this one: a table rewrite (`ALTER
    /// COLUMN ... TYPE`, `ADD COLUMN ... DEFAULT` of a volatile expression, `VACUUM FULL`)
    /// changes it, and sends none of the rows it rewrote down the stream.
    pub storage: Option<i64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_names_resolve_offline_as_postgres_reads_them() {
        let t = TableInfo::offline("public.USERS", 1);
        assert_eq!((&*t.schema, &*t.name), ("public", "users"));
        let t = TableInfo::offline("\"Accounts\"", 1);
        assert_eq!((&*t.schema, &*t.name), ("public", "Accounts"));
        let t = TableInfo::offline("\"my.schema\".\"odd \"\"name\"\" x\"", 1);
        assert_eq!((&*t.schema, &*t.name), ("my.schema", "odd \"name\" x"));
        assert_eq!(t.qualified(), "\"my.schema\".\"odd \"\"name\"\" x\"");
    }
}
