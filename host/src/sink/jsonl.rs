//! Change documents as JSON lines, exactly once across restarts.
//!
//! # Guarantee
//!
//! Next to the output file `F` the sink keeps `F.checkpoint`: the byte length of `F` that
//! holds only complete source transactions, and the stream position they reach. Data is
//! fsynced before the checkpoint is replaced (write, fsync, rename), and the position is
//! acknowledged to PostgreSQL only after that. On open, `F` is cut back to the checkpoint's
//! length and the capture resumes after its position: whatever happened to the process,
//! `F` holds every change once. Standard output has no checkpoint: each run starts over.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use crate::source::Resume;

/// Extension of the checkpoint file kept next to the output.
pub const CHECKPOINT_SUFFIX: &str = ".checkpoint";

/// The output could not be written or recovered.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// A file operation failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What we did.
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The files on disk do not fit together.
    #[error("{path}: {message}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Checkpoint {
    /// The slot the output was captured from.
    slot: String,
    /// Everything before this stream position is in the file (`None`: backfill not done).
    position: Option<Lsn>,
    /// Length of the file holding exactly that.
    offset: u64,
}

enum Output {
    File {
        file: BufWriter<File>,
        path: PathBuf,
    },
    Stdout(BufWriter<std::io::Stdout>),
}

/// Writes change documents as JSON lines; see the module doc for the guarantee.
pub struct JsonLinesSink {
    out: Output,
    slot: String,
    /// Bytes written so far.
    written: u64,
    /// End of the last complete transaction: (position, offset).
    complete: Option<(Lsn, u64)>,
    /// What the checkpoint file says.
    durable: Option<Lsn>,
    /// Serialization buffer, reused for every line.
    line: Vec<u8>,
}

impl JsonLinesSink {
    /// Opens (or recovers) the output; returns where the capture must resume.
    pub fn open(path: Option<&Path>, slot: &str) -> Result<(Self, Resume), SinkError> {
        let Some(path) = path else {
            let sink = JsonLinesSink {
                out: Output::Stdout(BufWriter::with_capacity(1 << 16, std::io::stdout())),
                slot: slot.to_string(),
                written: 0,
                complete: None,
                durable: None,
                line: Vec::new(),
            };
            return Ok((sink, Resume::Fresh));
        };
        let io = |action: &'static str, p: &Path| {
            let path = p.to_path_buf();
            move |source| SinkError::Io {
                action,
                path,
                source,
            }
        };
        let cp_path = checkpoint_path(path);
        let checkpoint = match std::fs::read_to_string(&cp_path) {
            Ok(text) => Some(serde_json::from_str::<Checkpoint>(&text).map_err(|e| {
                SinkError::Inconsistent {
                    path: cp_path.clone(),
                    message: format!(
                        "checkpoint is corrupt ({e}); delete it and the output to start over"
                    ),
                }
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io("reading", &cp_path)(e)),
        };
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("opening", path))?;
        let len = file.metadata().map_err(io("reading", path))?.len();
        let (offset, position) = match checkpoint {
            Some(cp) => {
                if cp.slot != slot {
                    return Err(SinkError::Inconsistent {
                        path: path.to_path_buf(),
                        message: format!(
                            "was captured from slot `{}`, not `{slot}`: use another --out file",
                            cp.slot
                        ),
                    });
                }
                if len < cp.offset {
                    return Err(SinkError::Inconsistent {
                        path: path.to_path_buf(),
                        message: format!(
                            "is shorter ({len} bytes) than its checkpoint says ({} bytes): it was \
                             changed by something else. Delete it and {} to capture again",
                            cp.offset,
                            cp_path.display()
                        ),
                    });
                }
                (cp.offset, cp.position)
            }
            None if len > 0 => {
                return Err(SinkError::Inconsistent {
                    path: path.to_path_buf(),
                    message: format!(
                        "exists and is not empty, but has no checkpoint ({}): weir will not \
                         overwrite a file it did not write. Move it away or pick another --out",
                        cp_path.display()
                    ),
                });
            }
            None => (0, None),
        };
        if len > offset {
            tracing::info!(
                path = %path.display(),
                dropped_bytes = len - offset,
                "cutting an unfinished transaction off the output; it will be captured again"
            );
        }
        file.set_len(offset).map_err(io("truncating", path))?;
        file.seek(SeekFrom::Start(offset))
            .map_err(io("seeking", path))?;
        let mut sink = JsonLinesSink {
            out: Output::File {
                file: BufWriter::with_capacity(1 << 16, file),
                path: path.to_path_buf(),
            },
            slot: slot.to_string(),
            written: offset,
            complete: position.map(|p| (p, offset)),
            durable: position,
            line: Vec::new(),
        };
        let resume = match position {
            Some(p) => Resume::After(p),
            None => {
                sink.write_checkpoint(None, 0)?;
                Resume::Fresh
            }
        };
        Ok((sink, resume))
    }

    /// Appends a document.
    pub fn write(&mut self, doc: &ChangeDocument) -> Result<(), SinkError> {
        // Serialize into a reused buffer, then hand the line over in one call: far cheaper
        // than many small writes through the buffered file.
        self.line.clear();
        doc.write_json(&mut self.line)
            .expect("serializing into memory cannot fail");
        self.line.push(b'\n');
        let result = match &mut self.out {
            Output::File { file, .. } => file.write_all(&self.line),
            Output::Stdout(s) => s.write_all(&self.line),
        };
        result.map_err(|source| SinkError::Io {
            action: "writing",
            path: match &self.out {
                Output::File { path, .. } => path.clone(),
                Output::Stdout(_) => "standard output".into(),
            },
            source,
        })?;
        self.written += self.line.len() as u64;
        Ok(())
    }

    /// Marks the end of a complete transaction (or of the backfill) at `position`.
    pub fn end_transaction(&mut self, position: Lsn) {
        self.complete = Some((position, self.written));
    }

    /// Makes everything up to the last complete transaction durable; returns the position
    /// that may now be acknowledged.
    pub fn flush(&mut self) -> Result<Option<Lsn>, SinkError> {
        let Some((position, offset)) = self.complete else {
            return Ok(None);
        };
        match &mut self.out {
            Output::Stdout(s) => {
                s.flush().map_err(|source| SinkError::Io {
                    action: "writing",
                    path: "standard output".into(),
                    source,
                })?;
            }
            Output::File { file, path } => {
                if self.durable == Some(position) {
                    return Ok(Some(position));
                }
                let path = path.clone();
                file.flush()
                    .and_then(|_| file.get_ref().sync_data())
                    .map_err(|source| SinkError::Io {
                        action: "syncing",
                        path,
                        source,
                    })?;
                self.write_checkpoint(Some(position), offset)?;
            }
        }
        self.durable = Some(position);
        Ok(Some(position))
    }

    /// Flushes, then cuts off a transaction that was only partly written.
    pub fn close(mut self) -> Result<Option<Lsn>, SinkError> {
        let position = self.flush()?;
        if let Output::File { file, path } = &mut self.out {
            let keep = self.complete.map(|(_, o)| o).unwrap_or(0);
            file.flush()
                .and_then(|_| file.get_ref().set_len(keep))
                .and_then(|_| file.get_ref().sync_all())
                .map_err(|source| SinkError::Io {
                    action: "closing",
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(position)
    }

    fn write_checkpoint(&mut self, position: Option<Lsn>, offset: u64) -> Result<(), SinkError> {
        let Output::File { path, .. } = &self.out else {
            return Ok(());
        };
        let cp = Checkpoint {
            slot: self.slot.clone(),
            position,
            offset,
        };
        let cp_path = checkpoint_path(path);
        let tmp = cp_path.with_extension("checkpoint.tmp");
        let io = |source| SinkError::Io {
            action: "writing checkpoint",
            path: cp_path.clone(),
            source,
        };
        let mut f = File::create(&tmp).map_err(io)?;
        f.write_all(serde_json::to_string(&cp).unwrap_or_default().as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &cp_path).map_err(io)?;
        // The rename is durable once the folder is synced.
        if let Some(Ok(d)) = cp_path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .map(File::open)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// `F.checkpoint` for output file `F`.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(CHECKPOINT_SUFFIX);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::document::{Op, Source};

    fn doc(i: i64) -> ChangeDocument {
        ChangeDocument {
            op: Op::Insert,
            columns: vec![("id".into(), serde_json::json!(i))],
            source: Source {
                oid: 0,
                schema: "public".into(),
                table: "t".into(),
                lsn: Lsn(i as u64),
                txid: Some(1),
                ts_ms: 0,
                seq: 0,
                snapshot: false,
            },
            before: None,
            unchanged: vec![],
            exact: Vec::new(),
        }
    }

    #[test]
    fn a_partial_transaction_is_cut_off_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let (mut sink, resume) = JsonLinesSink::open(Some(&path), "s").unwrap();
        assert_eq!(resume, Resume::Fresh);
        sink.write(&doc(1)).unwrap();
        sink.end_transaction(Lsn(10));
        assert_eq!(sink.flush().unwrap(), Some(Lsn(10)));
        sink.write(&doc(2)).unwrap();
        // Simulate a crash: the buffer reaches the file but no checkpoint is written.
        if let Output::File { file, .. } = &mut sink.out {
            file.flush().unwrap();
        }
        drop(sink);
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);

        let (sink, resume) = JsonLinesSink::open(Some(&path), "s").unwrap();
        assert_eq!(resume, Resume::After(Lsn(10)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        drop(sink);
        let err = JsonLinesSink::open(Some(&path), "other")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("slot `s`"), "{err}");
    }

    #[test]
    fn refuses_a_foreign_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jsonl");
        std::fs::write(&path, "precious\n").unwrap();
        let err = JsonLinesSink::open(Some(&path), "s")
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("no checkpoint"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious\n");
    }
}
