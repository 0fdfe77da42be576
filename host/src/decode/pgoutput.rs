//! The pgoutput logical replication protocol (version 1), decoded without copying values.
//!
//! Every function here returns an error on malformed input instead of panicking: the bytes
//! come from the network. `cargo fuzz run pgoutput` (in `host/fuzz`) checks that claim.

use std::fmt;

use crate::lsn::Lsn;

/// A pgoutput message. Byte slices borrow from the buffer that was decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// Start of a transaction.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// LSN of the commit record.
        lsn: Lsn,
        /// LSN just past the commit record: the position to acknowledge.
        end_lsn: Lsn,
        /// Commit time, microseconds since 2000-01-01 UTC.
        commit_time: i64,
    },
    /// The transaction came from another node (replication origin).
    Origin {
        /// Commit LSN on the origin server.
        lsn: Lsn,
        /// Origin name.
        name: &'a str,
    },
    /// The shape of a table; sent before its first change and again after it changes.
    Relation {
        /// Table OID.
        id: u32,
        /// Schema name.
        namespace: &'a str,
        /// Table name.
        name: &'a str,
        /// Replica identity: `d` default (primary key), `n` nothing, `f` full, `i` index.
        replica_identity: u8,
        /// The columns, in table order.
        columns: Vec<RelationColumn<'a>>,
    },
    /// A non-builtin data type used by a following Relation.
    Type {
        /// Type OID.
        id: u32,
        /// Schema name.
        namespace: &'a str,
        /// Type name.
        name: &'a str,
    },
    /// A new row.
    Insert {
        /// Table OID.
        relation: u32,
        /// The new row.
        new: Vec<TupleValue<'a>>,
    },
    /// A changed row.
    Update {
        /// Table OID.
        relation: u32,
        /// Old key (`K`) or old row (`O`), when the replica identity makes PostgreSQL send it.
        old: Option<(OldKind, Vec<TupleValue<'a>>)>,
        /// The new row.
        new: Vec<TupleValue<'a>>,
    },
    /// A deleted row.
    Delete {
        /// Table OID.
        relation: u32,
        /// Old key (`K`) or old row (`O`).
        old: (OldKind, Vec<TupleValue<'a>>),
    },
    /// Tables emptied by TRUNCATE.
    Truncate {
        /// `CASCADE` was given.
        cascade: bool,
        /// `RESTART IDENTITY` was given.
        restart_identity: bool,
        /// The truncated tables' OIDs.
        relations: Vec<u32>,
    },
    /// A message from `pg_logical_emit_message`.
    LogicalMessage {
        /// Emitted inside a transaction.
        transactional: bool,
        /// LSN of the message.
        lsn: Lsn,
        /// Application-chosen prefix.
        prefix: &'a str,
        /// Payload.
        content: &'a [u8],
    },
}

/// What an old tuple holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity columns (`K`); the others are null.
    Key,
    /// The whole old row (`O`, with `REPLICA IDENTITY FULL`).
    Row,
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn<'a> {
    /// Part of the replica identity (key).
    pub key: bool,
    /// Column name.
    pub name: &'a str,
    /// Type OID.
    pub type_id: u32,
    /// Type modifier (for example precision and scale of a numeric).
    pub type_modifier: i32,
}

/// One value of a tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TupleValue<'a> {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent.
    UnchangedToast,
    /// The value in the type's text output form.
    Text(&'a [u8]),
    /// The value in the type's binary form (only when binary mode is requested).
    Binary(&'a [u8]),
}

/// Alias kept for readers who think of tuple entries as columns.
pub type Column<'a> = TupleValue<'a>;

/// The bytes were not a valid pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// Message tag, when there was one.
    pub tag: Option<u8>,
    /// Byte offset where decoding failed.
    pub offset: usize,
    /// What was wrong.
    pub reason: &'static str,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.tag {
            Some(tag) if tag.is_ascii_graphic() => write!(
                f,
                "malformed pgoutput message `{}` at byte {}: {}",
                tag as char, self.offset, self.reason
            ),
            Some(tag) => write!(
                f,
                "malformed pgoutput message (tag 0x{tag:02x}) at byte {}: {}",
                self.offset, self.reason
            ),
            None => write!(f, "empty pgoutput message"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let Some((&tag, _)) = buf.split_first() else {
        return Err(DecodeError {
            tag: None,
            offset: 0,
            reason: "no bytes",
        });
    };
    let mut r = Reader { buf, pos: 1, tag };
    let msg = match tag {
        b'B' => Message::Begin {
            final_lsn: Lsn(r.u64()?),
            commit_time: r.i64()?,
            xid: r.u32()?,
        },
        b'C' => {
            let _flags = r.u8()?;
            Message::Commit {
                lsn: Lsn(r.u64()?),
                end_lsn: Lsn(r.u64()?),
                commit_time: r.i64()?,
            }
        }
        b'O' => Message::Origin {
            lsn: Lsn(r.u64()?),
            name: r.cstr()?,
        },
        b'R' => {
            let id = r.u32()?;
            let namespace = r.cstr()?;
            let name = r.cstr()?;
            let replica_identity = r.u8()?;
            let count = r.count()?;
            // Each column needs at least 10 bytes: never trust the count for allocation.
            let mut columns = Vec::with_capacity(count.min(r.remaining() / 10));
            for _ in 0..count {
                columns.push(RelationColumn {
                    key: r.u8()? & 1 == 1,
                    name: r.cstr()?,
                    type_id: r.u32()?,
                    type_modifier: r.i32()?,
                });
            }
            Message::Relation {
                id,
                namespace,
                name,
                replica_identity,
                columns,
            }
        }
        b'Y' => Message::Type {
            id: r.u32()?,
            namespace: r.cstr()?,
            name: r.cstr()?,
        },
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N', "insert without a new tuple")?;
            Message::Insert {
                relation,
                new: r.tuple()?,
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'K' => {
                    let old = r.tuple()?;
                    r.expect(b'N', "update without a new tuple")?;
                    Some((OldKind::Key, old))
                }
                b'O' => {
                    let old = r.tuple()?;
                    r.expect(b'N', "update without a new tuple")?;
                    Some((OldKind::Row, old))
                }
                b'N' => None,
                _ => return Err(r.fail("update: expected K, O or N")),
            };
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = match r.u8()? {
                b'K' => OldKind::Key,
                b'O' => OldKind::Row,
                _ => return Err(r.fail("delete: expected K or O")),
            };
            Message::Delete {
                relation,
                old: (kind, r.tuple()?),
            }
        }
        b'T' => {
            let count = r.u32()? as usize;
            let options = r.u8()?;
            let mut relations = Vec::with_capacity(count.min(r.remaining() / 4));
            for _ in 0..count {
                relations.push(r.u32()?);
            }
            Message::Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relations,
            }
        }
        b'M' => {
            let flags = r.u8()?;
            let lsn = Lsn(r.u64()?);
            let prefix = r.cstr()?;
            let len = r.u32()? as usize;
            Message::LogicalMessage {
                transactional: flags & 1 != 0,
                lsn,
                prefix,
                content: r.bytes(len)?,
            }
        }
        _ => return Err(r.fail("unknown message tag")),
    };
    if r.pos != buf.len() {
        return Err(r.fail("trailing bytes after the message"));
    }
    Ok(msg)
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: u8,
}

impl<'a> Reader<'a> {
    fn fail(&self, reason: &'static str) -> DecodeError {
        DecodeError {
            tag: Some(self.tag),
            offset: self.pos,
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(self.fail("message ends early"));
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn i32(&mut self) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array()?))
    }

    /// A 16-bit count, which PostgreSQL sends as a signed number.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = i16::from_be_bytes(self.array()?);
        usize::try_from(n).map_err(|_| self.fail("negative count"))
    }

    fn expect(&mut self, want: u8, reason: &'static str) -> Result<(), DecodeError> {
        if self.u8()? == want {
            Ok(())
        } else {
            self.pos -= 1;
            Err(self.fail(reason))
        }
    }

    fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let rest = &self.buf[self.pos..];
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or_else(|| self.fail("string without a terminating zero byte"))?;
        let s = std::str::from_utf8(&rest[..end]).map_err(|_| self.fail("string is not UTF-8"))?;
        self.pos += end + 1;
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<TupleValue<'a>>, DecodeError> {
        let count = self.count()?;
        let mut values = Vec::with_capacity(count.min(self.remaining()));
        for _ in 0..count {
            values.push(match self.u8()? {
                b'n' => TupleValue::Null,
                b'u' => TupleValue::UnchangedToast,
                b't' => {
                    let len = self.u32()? as usize;
                    TupleValue::Text(self.bytes(len)?)
                }
                b'b' => {
                    let len = self.u32()? as usize;
                    TupleValue::Binary(self.bytes(len)?)
                }
                _ => {
                    self.pos -= 1;
                    return Err(self.fail("unknown tuple value kind"));
                }
            });
        }
        Ok(values)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput messages for tests.
    #[derive(Default)]
    pub(crate) struct Builder(pub Vec<u8>);

    impl Builder {
        pub fn tag(t: u8) -> Self {
            Builder(vec![t])
        }
        pub fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub fn text(self, s: &str) -> Self {
            let mut b = self.u8(b't').u32(s.len() as u32);
            b.0.extend_from_slice(s.as_bytes());
            b
        }
    }

    /// A Relation message: table OID 16384, `public.users (id int4 key, email text)`.
    pub(crate) fn relation() -> Vec<u8> {
        Builder::tag(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("users")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .cstr("id")
            .u32(23)
            .u32(u32::MAX)
            .u8(0)
            .cstr("email")
            .u32(25)
            .u32(u32::MAX)
            .0
    }

    /// An update of that table: old key 1, new key 2, `email` unchanged TOAST.
    pub(crate) fn update_with_old_key() -> Vec<u8> {
        Builder::tag(b'U')
            .u32(16384)
            .u8(b'K')
            .u16(2)
            .text("1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .text("2")
            .u8(b'u')
            .0
    }

    #[test]
    fn decodes_relation() {
        let bytes = relation();
        let Message::Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        } = decode(&bytes).unwrap()
        else {
            panic!("not a relation")
        };
        assert_eq!(
            (id, namespace, name, replica_identity),
            (16384, "public", "users", b'd')
        );
        assert_eq!(columns.len(), 2);
        assert!(columns[0].key && !columns[1].key);
        assert_eq!(columns[1].name, "email");
        assert_eq!(columns[0].type_modifier, -1);
    }

    #[test]
    fn decodes_update_with_old_key_and_unchanged_toast() {
        let bytes = update_with_old_key();
        assert_eq!(
            decode(&bytes).unwrap(),
            Message::Update {
                relation: 16384,
                old: Some((OldKind::Key, vec![TupleValue::Text(b"1"), TupleValue::Null])),
                new: vec![TupleValue::Text(b"2"), TupleValue::UnchangedToast],
            }
        );
    }

    #[test]
    fn decodes_begin_commit_truncate_origin_message_type() {
        let begin = Builder::tag(b'B').u64(0x100).u64(5).u32(700).0;
        assert_eq!(
            decode(&begin).unwrap(),
            Message::Begin {
                final_lsn: Lsn(0x100),
                commit_time: 5,
                xid: 700
            }
        );
        let commit = Builder::tag(b'C').u8(0).u64(0x100).u64(0x130).u64(5).0;
        assert_eq!(
            decode(&commit).unwrap(),
            Message::Commit {
                lsn: Lsn(0x100),
                end_lsn: Lsn(0x130),
                commit_time: 5
            }
        );
        let truncate = Builder::tag(b'T').u32(2).u8(3).u32(1).u32(2).0;
        assert_eq!(
            decode(&truncate).unwrap(),
            Message::Truncate {
                cascade: true,
                restart_identity: true,
                relations: vec![1, 2]
            }
        );
        let origin = Builder::tag(b'O').u64(9).cstr("node_a").0;
        assert_eq!(
            decode(&origin).unwrap(),
            Message::Origin {
                lsn: Lsn(9),
                name: "node_a"
            }
        );
        let mut message = Builder::tag(b'M').u8(1).u64(7).cstr("app").u32(2).0;
        message.extend_from_slice(b"hi");
        assert_eq!(
            decode(&message).unwrap(),
            Message::LogicalMessage {
                transactional: true,
                lsn: Lsn(7),
                prefix: "app",
                content: b"hi"
            }
        );
        let ty = Builder::tag(b'Y').u32(90000).cstr("public").cstr("mood").0;
        assert_eq!(
            decode(&ty).unwrap(),
            Message::Type {
                id: 90000,
                namespace: "public",
                name: "mood"
            }
        );
    }

    #[test]
    fn every_truncation_of_a_valid_message_is_an_error() {
        for msg in [relation(), update_with_old_key()] {
            for len in 0..msg.len() {
                assert!(
                    decode(&msg[..len]).is_err(),
                    "prefix of {len} bytes decoded"
                );
            }
            assert!(decode(&msg).is_ok());
        }
    }

    #[test]
    fn garbage_never_panics() {
        // A small deterministic generator: no dependency, same bytes on every run.
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let tags = b"BCORYIUDTMXZ";
        for _ in 0..20_000 {
            let len = (next() % 64) as usize;
            let mut msg: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(first) = msg.first_mut() {
                *first = tags[(next() % tags.len() as u64) as usize];
            }
            let _ = decode(&msg);
        }
        // Huge counts with no data behind them must not allocate or panic.
        let huge = Builder::tag(b'T').u32(u32::MAX).u8(0).0;
        assert!(decode(&huge).is_err());
        let huge_len = Builder::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX)
            .0;
        assert!(decode(&huge_len).is_err());
    }

    #[test]
    fn errors_name_the_message() {
        let err = decode(&[b'I', 0, 0]).unwrap_err();
        assert_eq!(err.tag, Some(b'I'));
        assert!(err.to_string().contains("`I`"), "{err}");
        assert!(decode(&[]).is_err());
    }
}
