//! The Delta log store weir opens its tables with: deltalake's own, with a lighter kernel
//! engine for reading the log.
//!
//! deltalake's default engine reads up to 1,000 log files at once, each through its own JSON
//! decoder sized for 1,000 rows of the log's full flattened schema (about 1.6 MB before a
//! row is read). Writing a checkpoint replays the commits since the last one: with our
//! part-sized commits that is ~100 decoders alive together, some 160 MB of heap per table
//! for a moment, twice when two tables checkpoint together, and glibc keeps much of it
//! (heaptrack on a 500,000-row transaction: 323 MB of its 369 MB heap peak). Commit files
//! hold a handful of actions, so a few files in flight and small batches lose nothing.

use std::num::NonZero;
use std::sync::Arc;

use bytes::Bytes;
use delta_kernel::Engine;
use delta_kernel_default_engine::DefaultEngineBuilder;
use delta_kernel_default_engine::executor::tokio::{
    TokioBackgroundExecutor, TokioMultiThreadExecutor,
};
use deltalake::datafusion::datasource::object_store::ObjectStoreUrl;
use deltalake::kernel::transaction::TransactionError;
use deltalake::logstore::{CommitOrBytes, LogStore, LogStoreConfig, LogStoreRef};
use deltalake::{DeltaResult, ObjectStore, Path};
use tokio::runtime::{Handle, RuntimeFlavor};
use url::Url;
use uuid::Uuid;

/// Log files read at once.
const LOG_FILES_IN_FLIGHT: usize = 4;
/// Log rows per decoded batch.
const LOG_BATCH_ROWS: usize = 64;

/// Wraps a log store so that log replays use the lighter engine.
pub fn lean(inner: LogStoreRef) -> LogStoreRef {
    Arc::new(LeanLogStore { inner })
}

#[derive(Debug)]
struct LeanLogStore {
    inner: LogStoreRef,
}

#[async_trait::async_trait]
impl LogStore for LeanLogStore {
    fn name(&self) -> String {
        self.inner.name()
    }

    async fn refresh(&self) -> DeltaResult<()> {
        self.inner.refresh().await
    }

    async fn read_commit_entry(&self, version: u64) -> DeltaResult<Option<Bytes>> {
        self.inner.read_commit_entry(version).await
    }

    async fn write_commit_entry(
        &self,
        version: u64,
        commit_or_bytes: CommitOrBytes,
        operation_id: Uuid,
    ) -> Result<(), TransactionError> {
        self.inner
            .write_commit_entry(version, commit_or_bytes, operation_id)
            .await
    }

    async fn abort_commit_entry(
        &self,
        version: u64,
        commit_or_bytes: CommitOrBytes,
        operation_id: Uuid,
    ) -> Result<(), TransactionError> {
        self.inner
            .abort_commit_entry(version, commit_or_bytes, operation_id)
            .await
    }

    async fn get_latest_version(&self, start_version: u64) -> DeltaResult<u64> {
        self.inner.get_latest_version(start_version).await
    }

    fn object_store(&self, operation_id: Option<Uuid>) -> Arc<dyn ObjectStore> {
        self.inner.object_store(operation_id)
    }

    fn root_object_store(&self, operation_id: Option<Uuid>) -> Arc<dyn ObjectStore> {
        self.inner.root_object_store(operation_id)
    }

    fn engine(&self, operation_id: Option<Uuid>) -> Arc<dyn Engine> {
        let builder = DefaultEngineBuilder::new(self.root_object_store(operation_id))
            .with_buffer_size(NonZero::new(LOG_FILES_IN_FLIGHT).expect("non-zero"))
            .with_batch_size(NonZero::new(LOG_BATCH_ROWS).expect("non-zero"));
        let handle = Handle::current();
        match handle.runtime_flavor() {
            RuntimeFlavor::CurrentThread => Arc::new(
                builder
                    .with_task_executor(Arc::new(TokioBackgroundExecutor::new()))
                    .build(),
            ),
            _ => Arc::new(
                builder
                    .with_task_executor(Arc::new(TokioMultiThreadExecutor::new(handle)))
                    .build(),
            ),
        }
    }

    fn to_uri(&self, location: &Path) -> String {
        self.inner.to_uri(location)
    }

    fn root_url(&self) -> &Url {
        self.inner.root_url()
    }

    fn log_path(&self) -> &Path {
        self.inner.log_path()
    }

    fn transaction_url(&self, operation_id: Option<Uuid>) -> DeltaResult<Url> {
        self.inner.transaction_url(operation_id)
    }

    async fn is_delta_table_location(&self) -> DeltaResult<bool> {
        self.inner.is_delta_table_location().await
    }

    fn config(&self) -> &LogStoreConfig {
        self.inner.config()
    }

    fn object_store_url(&self) -> ObjectStoreUrl {
        self.inner.object_store_url()
    }
}
