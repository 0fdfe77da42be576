//! weir: a PostgreSQL database as a real-time, exactly-once feed of change documents, on
//! its way to Delta Lake through sandboxed WebAssembly plugins.
//!
//! The flow, and the modules that hold each step:
//!
//! ```text
//! PostgreSQL ──pgoutput──▶ source ──▶ decode ──▶ document ──▶ sink
//!  publication, slot        │ backfill (COPY in the slot's snapshot), streaming
//!                           └◀── acknowledge: only what the sink made durable
//! ```
//!
//! - [`source`]: connects, sets up publication and slot, backfills, streams, acknowledges.
//! - [`decode`]: pgoutput messages and the text form of values, never panicking on input.
//! - [`document`]: the change document every later stage sees.
//! - [`relation`]: a source table's identity (oid, schema, name) and shape, resolved once
//!   and shared by the capture and the sinks.
//! - [`plugin`]: the WASM plugin host (wasmtime, component model), sandboxed and limited.
//! - [`sink`]: where documents go: Delta tables (replica, change log) with the source
//!   position in every commit; JSON lines files for `weir capture`.
//! - [`pipeline`]: capture → plugins → sink with update delay, group commit and the
//!   checkpoint (plugin state included).
//! - [`query`]: SQL over the lake (DataFusion).
//! - [`config`]: the typed configuration.
//! - [`local_postgres`]: a private PostgreSQL cluster for tests, demos and benchmarks.
//! - [`datagen`]: the demo's bank data, with injected anomalies recorded as ground truth.

pub mod config;
pub mod datagen;
pub mod decode;
pub mod document;
pub mod json;
pub mod local_postgres;
pub mod lsn;
pub mod pipeline;
pub mod plugin;
pub mod query;
pub mod relation;
pub mod serve;
pub mod sink;
pub mod source;
pub mod telemetry;

pub use document::{ChangeDocument, Op};
pub use lsn::Lsn;
