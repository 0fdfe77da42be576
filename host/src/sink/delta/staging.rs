//! Staging: a source transaction too large to hold in memory is written in parts, and its
//! parts must not be visible before its end. While a table stages, its commits go to a log
//! of its own beside the table's (`<table>/_weir_staging/_delta_log/`), which starts as the
//! table's log at the version staging began (`base`) and shares the table's data files:
//! appends, merges and deletes work on the staged state as they would on the table, and
//! the files they write are in the table's folder but in no version of its log. At the
//! transaction's end, the staged commits' actions, netted (a file added then removed
//! again is neither), become one commit of the table ([`net_commits`]), with the
//! transaction's position: readers see all of it or nothing.
//!
//! [`StagedLog`] is the object store that does this: paths in a `_delta_log` folder are
//! read from and written to the staging folder, and read from the table's own log for the
//! versions up to `base` that staging does not have.

use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use deltalake::logstore::object_store::path::{Path, PathPart};
use deltalake::logstore::object_store::{
    self, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use futures_util::stream::{BoxStream, StreamExt, TryStreamExt};

/// The folder beside `_delta_log` that holds a staged log (Delta readers skip folders
/// whose names start with `_`).
pub const STAGING_DIR: &str = "_weir_staging";
const LOG_DIR: &str = "_delta_log";

/// An object store whose `_delta_log` folders are staged (see the module's text).
#[derive(Debug)]
pub struct StagedLog {
    inner: Arc<dyn ObjectStore>,
    /// The table's last version when staging began (`None`: the table did not exist).
    base: Option<u64>,
}

impl StagedLog {
    pub fn new(inner: Arc<dyn ObjectStore>, base: Option<u64>) -> StagedLog {
        StagedLog { inner, base }
    }
}

/// Whether the table's own log file at `path` is part of a staged log begun at `base`:
/// its versions up to `base` (and the checkpoint hint, which points at one of them).
fn in_base(path: &Path, base: Option<u64>) -> bool {
    let Some(base) = base else {
        return false;
    };
    match path.filename() {
        Some("_last_checkpoint") => true,
        Some(name) => log_version(name).is_some_and(|v| v <= base),
        None => false,
    }
}

/// The version a log file's name starts with (`00000000000000000012.json`).
pub fn log_version(name: &str) -> Option<u64> {
    let digits = name.get(..20)?;
    digits
        .bytes()
        .all(|b| b.is_ascii_digit())
        .then(|| digits.parse().ok())
        .flatten()
}

impl StagedLog {
    /// A listing (after `offset`) where the staged files take the place of the table's
    /// log files of the same name, and the table's log shows its versions up to `base`.
    fn list_staged(
        &self,
        prefix: Option<&Path>,
        offset: Option<&Path>,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        let listing =
            |store: &Arc<dyn ObjectStore>, prefix: Option<&Path>, offset: Option<&Path>| {
                match offset {
                    Some(offset) => store.list_with_offset(prefix, offset),
                    None => store.list(prefix),
                }
            };
        let Some(staged) = prefix.and_then(staged_path) else {
            return listing(&self.inner, prefix, offset);
        };
        let own = listing(&self.inner, prefix, offset);
        let staged_offset = offset.map(|o| staged_path(o).unwrap_or_else(|| o.clone()));
        let theirs = listing(&self.inner, Some(&staged), staged_offset.as_ref());
        let base = self.base;
        futures_util::stream::once(async move {
            // Log folders past an offset are small: both listings are read whole.
            let mut out: BTreeMap<Path, ObjectMeta> = BTreeMap::new();
            let own: Vec<ObjectMeta> = own.try_collect().await?;
            for m in own {
                if in_base(&m.location, base) {
                    out.insert(m.location.clone(), m);
                }
            }
            let theirs: Vec<ObjectMeta> = theirs.try_collect().await?;
            for mut m in theirs {
                m.location = unstaged_path(&m.location);
                out.insert(m.location.clone(), m);
            }
            Ok::<_, object_store::Error>(futures_util::stream::iter(out.into_values().map(Ok)))
        })
        .try_flatten()
        .boxed()
    }
}

/// `path` in the staging folder, when it is in (or is) a `_delta_log` folder.
pub fn staged_path(path: &Path) -> Option<Path> {
    let parts: Vec<PathPart<'_>> = path.parts().collect();
    let at = parts.iter().position(|p| p.as_ref() == LOG_DIR)?;
    Some(
        parts[..at]
            .iter()
            .cloned()
            .chain([PathPart::from(STAGING_DIR)])
            .chain(parts[at..].iter().cloned())
            .collect(),
    )
}

/// The table's path of a path in the staging folder.
fn unstaged_path(path: &Path) -> Path {
    let parts: Vec<PathPart<'_>> = path.parts().collect();
    let staged = parts
        .windows(2)
        .position(|w| w[0].as_ref() == STAGING_DIR && w[1].as_ref() == LOG_DIR);
    parts
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != staged)
        .map(|(_, p)| p.clone())
        .collect()
}

impl std::fmt::Display for StagedLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StagedLog({})", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for StagedLog {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        mut opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        match staged_path(location) {
            Some(staged) => {
                // The staged log has one writer, this pipeline: a version is never
                // contended (and conditional writes need not be supported for it).
                if matches!(opts.mode, PutMode::Create) {
                    opts.mode = PutMode::Overwrite;
                }
                self.inner.put_opts(&staged, payload, opts).await
            }
            None => self.inner.put_opts(location, payload, opts).await,
        }
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        let location = staged_path(location).unwrap_or_else(|| location.clone());
        self.inner.put_multipart_opts(&location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        let Some(staged) = staged_path(location) else {
            return self.inner.get_opts(location, options).await;
        };
        match self.inner.get_opts(&staged, options.clone()).await {
            Ok(mut got) => {
                got.meta.location = location.clone();
                Ok(got)
            }
            Err(object_store::Error::NotFound { .. }) if in_base(location, self.base) => {
                self.inner.get_opts(location, options).await
            }
            Err(e) => Err(e),
        }
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        if staged_path(location).is_none() {
            // Data files: the store's own (coalescing) reads.
            return self.inner.get_ranges(location, ranges).await;
        }
        let mut out = Vec::with_capacity(ranges.len());
        for r in ranges {
            let got = self
                .get_opts(
                    location,
                    GetOptions {
                        range: Some(r.clone().into()),
                        ..Default::default()
                    },
                )
                .await?;
            out.push(got.bytes().await?);
        }
        Ok(out)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let mapped = locations.map_ok(|p| staged_path(&p).unwrap_or(p)).boxed();
        // The table's own log files are not the staged log's to delete (a log clean-up
        // after a staged checkpoint would): taken as done.
        self.inner
            .delete_stream(mapped)
            .map(|r| match r {
                Ok(p) => Ok(unstaged_path(&p)),
                Err(object_store::Error::NotFound { path, .. }) => {
                    Ok(unstaged_path(&Path::from(path)))
                }
                Err(e) => Err(e),
            })
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_staged(prefix, None)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.list_staged(prefix, Some(offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        if prefix.and_then(staged_path).is_none() {
            return self.inner.list_with_delimiter(prefix).await;
        }
        let depth = prefix.map_or(0, |p| p.parts_count()) + 1;
        let objects: Vec<ObjectMeta> = self
            .list(prefix)
            .try_filter(|m| futures_util::future::ready(m.location.parts_count() == depth))
            .try_collect()
            .await?;
        Ok(ListResult {
            common_prefixes: Vec::new(),
            objects,
        })
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        let from = staged_path(from).unwrap_or_else(|| from.clone());
        let to = staged_path(to).unwrap_or_else(|| to.clone());
        self.inner.copy_opts(&from, &to, options).await
    }
}

/// The actions of a log's commits, netted into one commit: files added and removed again
/// are in neither list (their paths are returned, to delete the files), the last
/// `metaData`, `protocol` and each application's last `txn` are kept, and a commit
/// information of its own opens it.
pub struct Netted {
    /// The commit's lines (newline-delimited JSON, as a log file holds them).
    pub bytes: Vec<u8>,
    /// Files the staged commits wrote and removed again: in no version of the table.
    pub orphans: Vec<String>,
    /// Files the commit adds.
    pub adds: usize,
    /// Files it removes.
    pub removes: usize,
}

/// Nets `commits` (the staged log files after the base, in version order); see
/// [`Netted`]. Fails on an action it does not know how to carry over.
pub fn net_commits(commits: &[Bytes], operation: &str) -> Result<Netted, String> {
    use serde_json::Value;
    let mut adds: BTreeMap<String, Value> = BTreeMap::new();
    let mut removes: BTreeMap<String, Value> = BTreeMap::new();
    let mut orphans = Vec::new();
    let mut metadata = None;
    let mut protocol = None;
    let mut txns: BTreeMap<String, Value> = BTreeMap::new();
    let mut domains: BTreeMap<String, Value> = BTreeMap::new();
    let mut cdc = Vec::new();
    for commit in commits {
        for line in commit.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let action: Value =
                serde_json::from_slice(line).map_err(|e| format!("a staged commit: {e}"))?;
            let Some((kind, body)) = action.as_object().and_then(|o| o.iter().next()) else {
                return Err("a staged commit holds an empty action".into());
            };
            let path = || body.get("path").and_then(Value::as_str).map(str::to_string);
            match kind.as_str() {
                "add" => {
                    let p = path().ok_or("an add without a path")?;
                    adds.insert(p, action.clone());
                }
                "remove" => {
                    let p = path().ok_or("a remove without a path")?;
                    if adds.remove(&p).is_some() {
                        orphans.push(p);
                    } else {
                        removes.insert(p, action.clone());
                    }
                }
                "metaData" => metadata = Some(action.clone()),
                "protocol" => protocol = Some(action.clone()),
                "txn" => {
                    let app = body
                        .get("appId")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    txns.insert(app, action.clone());
                }
                "domainMetadata" => {
                    let domain = body
                        .get("domain")
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_string();
                    domains.insert(domain, action.clone());
                }
                "cdc" => cdc.push(action.clone()),
                "commitInfo" => {}
                other => return Err(format!("a staged commit holds a `{other}` action")),
            }
        }
    }
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let info = serde_json::json!({"commitInfo": {
        "timestamp": timestamp,
        "operation": operation,
        "operationParameters": {"stagedCommits": commits.len()},
        "clientVersion": concat!("weir-", env!("CARGO_PKG_VERSION")),
    }});
    let (n_adds, n_removes) = (adds.len(), removes.len());
    let mut bytes = Vec::new();
    for action in std::iter::once(info)
        .chain(protocol)
        .chain(metadata)
        .chain(domains.into_values())
        .chain(txns.into_values())
        .chain(removes.into_values())
        .chain(adds.into_values())
        .chain(cdc)
    {
        serde_json::to_writer(&mut bytes, &action).map_err(|e| e.to_string())?;
        bytes.push(b'\n');
    }
    Ok(Netted {
        bytes,
        orphans,
        adds: n_adds,
        removes: n_removes,
    })
}

/// Paths of the files the staged commits `commits` add (to delete those no version of
/// the table holds, when staging is abandoned).
pub fn added_paths(commits: &[Bytes]) -> HashSet<String> {
    let mut out = HashSet::new();
    for commit in commits {
        for line in commit.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(line)
                && let Some(p) = v.pointer("/add/path").and_then(|p| p.as_str())
            {
                out.insert(p.to_string());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_paths_move_to_the_staging_folder_and_back() {
        let p = Path::from("lake/t/_delta_log/00000000000000000003.json");
        let s = staged_path(&p).unwrap();
        assert_eq!(
            s.as_ref(),
            "lake/t/_weir_staging/_delta_log/00000000000000000003.json"
        );
        assert_eq!(unstaged_path(&s), p);
        assert_eq!(staged_path(&Path::from("lake/t/part-1.parquet")), None);
        assert_eq!(
            staged_path(&Path::from("_delta_log")).unwrap().as_ref(),
            "_weir_staging/_delta_log"
        );
        assert_eq!(
            log_version("00000000000000000012.checkpoint.parquet"),
            Some(12)
        );
        assert_eq!(log_version("_last_checkpoint"), None);
    }

    #[test]
    fn staged_commits_net_into_one() {
        let commits = [
            Bytes::from(
                "{\"commitInfo\":{\"operation\":\"WRITE\"}}\n{\"add\":{\"path\":\"a.parquet\"}}\n",
            ),
            Bytes::from(
                "{\"remove\":{\"path\":\"a.parquet\"}}\n{\"remove\":{\"path\":\"old.parquet\"}}\n\
                 {\"add\":{\"path\":\"b.parquet\"}}\n{\"txn\":{\"appId\":\"w\",\"version\":5}}\n",
            ),
            Bytes::from("{\"txn\":{\"appId\":\"w\",\"version\":9}}\n"),
        ];
        let n = net_commits(&commits, "WRITE").unwrap();
        let text = String::from_utf8(n.bytes).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(n.orphans, ["a.parquet"]);
        assert_eq!((n.adds, n.removes), (1, 1));
        assert!(lines[0].get("commitInfo").is_some());
        assert_eq!(lines[1]["txn"]["version"], 9);
        assert_eq!(lines[2]["remove"]["path"], "old.parquet");
        assert_eq!(lines[3]["add"]["path"], "b.parquet");
        assert_eq!(lines.len(), 4);
        assert!(net_commits(&[Bytes::from("{\"sidecar\":{}}\n")], "WRITE").is_err());
    }
}
