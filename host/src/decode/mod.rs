//! Decoding what PostgreSQL sends: pgoutput messages ([`pgoutput`]) and the text form of
//! column values ([`value`]).

pub mod pgoutput;
pub mod value;

pub use pgoutput::{Column, DecodeError, Message, RelationColumn, TupleValue, decode};
pub use value::{TypeKind, TypeRegistry};
