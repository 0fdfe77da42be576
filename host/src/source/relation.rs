//! Tables as the capture knows them: from the catalog at start, from Relation messages
//! while streaming.

use std::sync::Arc;

use crate::decode::TypeKind;

/// A configured table, as found in the catalog.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table OID.
    pub oid: u32,
    /// Schema.
    pub schema: Arc<str>,
    /// Name.
    pub name: Arc<str>,
    /// `relreplident`: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Whether a primary key exists.
    pub has_primary_key: bool,
    /// The primary key's columns, in key order (empty without one).
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

    /// `"schema"."table"`, quoted for SQL.
    pub fn qualified(&self) -> String {
        format!(
            "\"{}\".\"{}\"",
            self.schema.replace('"', "\"\""),
            self.name.replace('"', "\"\"")
        )
    }
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
}

/// The current shape of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    /// Schema.
    pub schema: Arc<str>,
    /// Name.
    pub table: Arc<str>,
    /// Columns in table order.
    pub columns: Vec<ColumnInfo>,
}
