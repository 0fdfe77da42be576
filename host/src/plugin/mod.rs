//! The plugin host: WebAssembly components (the `weir:plugin@0.1.0` world in `wit/`) run
//! sandboxed by wasmtime, one document batch per call.
//!
//! - The [`Engine`](wasmtime::Engine) is built once per process, with epoch interruption
//!   (a ticker thread advances the epoch every [`TICK`]) for CPU deadlines.
//! - Components are compiled once and cached on disk ([`cache`]), keyed by wasmtime's
//!   compatibility hash and the component's bytes; each plugin is pre-instantiated once.
//! - Every store has a memory limit and a deadline; a plugin has no files, network,
//!   environment, clock or randomness ([`store`]).
//! - A call that traps, runs out of time or memory fails the batch: the host rolls back the
//!   batch's state writes, replaces the instance, and retries the documents one by one, so
//!   that only the poison documents fail, each with the plugin's name and the error.

mod bindings;
pub mod cache;
mod chain;
mod state;
mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, Store};

use crate::json::JsonObject;
pub use chain::{Chain, ChainOutput};
pub use state::{PluginState, StateChanges};
use store::StoreState;

/// The contract version this host implements.
pub const WIT_PACKAGE: &str = "weir:plugin";
/// Its version.
pub const WIT_VERSION: &str = "0.1.0";

/// Epoch tick: the granularity of CPU deadlines.
pub const TICK: Duration = Duration::from_millis(5);
/// Default CPU time allowed for one call (one batch).
pub const DEFAULT_TIMEOUT_MS: u64 = 1_000;
/// Default linear memory limit per plugin instance.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// Default limit on the JSON bytes a plugin emits for one document.
pub const DEFAULT_MAX_OUTPUT_BYTES: u64 = 1 << 20;
/// Default documents per call.
pub const DEFAULT_BATCH: usize = 1_000;

/// Resource limits of one plugin.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Wall-clock CPU time one call may take, in milliseconds.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Linear memory of the instance, in MiB.
    #[serde(default = "default_memory_mb")]
    pub memory_mb: u64,
    /// JSON bytes the plugin may emit for one document.
    #[serde(default = "default_max_output_bytes")]
    pub max_output_bytes: u64,
    /// Documents per call.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Give the plugin the host's real wall and monotonic clocks (its outputs then depend
    /// on time, and a replay after a crash may differ).
    #[serde(default)]
    pub allow_clock: bool,
    /// Give the plugin real randomness (same caveat).
    #[serde(default)]
    pub allow_random: bool,
}

fn default_timeout_ms() -> u64 {
    DEFAULT_TIMEOUT_MS
}
fn default_memory_mb() -> u64 {
    DEFAULT_MEMORY_MB
}
fn default_max_output_bytes() -> u64 {
    DEFAULT_MAX_OUTPUT_BYTES
}
fn default_batch() -> usize {
    DEFAULT_BATCH
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout_ms: DEFAULT_TIMEOUT_MS,
            memory_mb: DEFAULT_MEMORY_MB,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            batch: DEFAULT_BATCH,
            allow_clock: false,
            allow_random: false,
        }
    }
}

/// A plugin could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("plugin `{plugin}`: cannot read {path}: {source}")]
    Read {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a usable component.
    #[error("plugin `{plugin}` ({path}) is not a valid WebAssembly component: {reason}")]
    Invalid {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// What wasmtime said.
        reason: String,
    },
    /// The component was built against another version of the contract.
    #[error(
        "plugin `{plugin}` ({path}) was built against {found}, but this weir provides \
         {WIT_PACKAGE}@{WIT_VERSION}: rebuild it against wit/weir-plugin.wit of this weir \
         (weir-plugin-sdk {WIT_VERSION})"
    )]
    Version {
        /// Plugin name.
        plugin: String,
        /// The file.
        path: PathBuf,
        /// What it imports or exports.
        found: String,
    },
    /// Its `init` refused the configuration or trapped.
    #[error("plugin `{plugin}` failed to initialize: {reason}")]
    Init {
        /// Plugin name.
        plugin: String,
        /// Its message or the trap.
        reason: String,
    },
}

/// Why a document failed in a plugin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The plugin returned an error for it.
    Rejected,
    /// The plugin trapped (panic, out-of-bounds access, unreachable).
    Trap,
    /// It ran past its CPU deadline.
    Timeout,
    /// It tried to grow memory past its limit.
    Memory,
    /// It returned something the contract does not allow (bad JSON, no collection, too big).
    InvalidOutput,
}

impl FailureKind {
    /// A short name for tables and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Rejected => "rejected",
            FailureKind::Trap => "trap",
            FailureKind::Timeout => "timeout",
            FailureKind::Memory => "memory",
            FailureKind::InvalidOutput => "invalid_output",
        }
    }
}

/// A document a plugin failed on: what a dead-letter row holds.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    /// The plugin.
    pub plugin: String,
    /// What kind of failure.
    pub kind: FailureKind,
    /// The message.
    pub error: String,
    /// The failed document's `_meta.source.lsn`, when it has one.
    pub lsn: Option<String>,
}

/// A document a plugin emitted.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted {
    /// Target collection.
    pub collection: String,
    /// Key in the collection.
    pub key: String,
    /// The document (a JSON object).
    pub document: JsonObject,
}

/// The result for one input document.
pub type Outcome = Result<Vec<Emitted>, Failure>;

struct EngineShared {
    engine: Engine,
    linker: Linker<StoreState>,
}

static ENGINE: OnceLock<Result<Arc<EngineShared>, String>> = OnceLock::new();

fn engine() -> Result<Arc<EngineShared>, String> {
    ENGINE
        .get_or_init(|| {
            let mut config = Config::new();
            config.wasm_component_model(true);
            config.epoch_interruption(true);
            // Repeated synchronous calls are much slower with it on (wasmtime issue 12836).
            config.concurrency_support(false);
            let engine = Engine::new(&config)
                .map_err(|e| format!("creating the WebAssembly engine: {e}"))?;
            let mut linker = Linker::new(&engine);
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker).map_err(|e| e.to_string())?;
            bindings::Plugin::add_to_linker::<StoreState, HasSelf<StoreState>>(&mut linker, |s| s)
                .map_err(|e| e.to_string())?;
            let ticker = engine.weak();
            std::thread::Builder::new()
                .name("weir-epoch".into())
                .spawn(move || {
                    while let Some(engine) = ticker.upgrade() {
                        engine.increment_epoch();
                        drop(engine);
                        std::thread::sleep(TICK);
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(Arc::new(EngineShared { engine, linker }))
        })
        .clone()
}

/// A loaded plugin: compiled, version-checked and pre-instantiated; make running instances
/// with [`LoadedPlugin::instantiate`].
pub struct LoadedPlugin {
    name: Arc<str>,
    config: String,
    limits: Limits,
    pre: bindings::PluginPre<StoreState>,
    shared: Arc<EngineShared>,
}

/// Runs guest code where WASI may block: wasmtime-wasi's synchronous bindings call
/// `Handle::block_on` for stream operations, which panics on a tokio worker thread, so a
/// guest writing to its stderr (as a panicking Rust guest does) would bring the host
/// down. On a multi-threaded runtime the call moves off the worker for its duration.
fn outside_async<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl LoadedPlugin {
    /// Loads the component at `path` (compiling it, or reading the compiled form from the
    /// cache in `cache_dir`), checks its contract version and pre-instantiates it.
    pub fn load(
        name: &str,
        path: &Path,
        config: &Value,
        limits: Limits,
        cache_dir: Option<&Path>,
    ) -> Result<LoadedPlugin, LoadError> {
        let shared = engine().map_err(|reason| LoadError::Invalid {
            plugin: name.to_string(),
            path: path.to_path_buf(),
            reason,
        })?;
        let bytes = std::fs::read(path).map_err(|source| LoadError::Read {
            plugin: name.to_string(),
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |reason: String| LoadError::Invalid {
            plugin: name.to_string(),
            path: path.to_path_buf(),
            reason,
        };
        let component = cache::compile(&shared.engine, &bytes, cache_dir)
            .map_err(|e| invalid(format!("{e:#}")))?;
        check_version(&shared.engine, &component).map_err(|found| LoadError::Version {
            plugin: name.to_string(),
            path: path.to_path_buf(),
            found,
        })?;
        let instance_pre = shared
            .linker
            .instantiate_pre(&component)
            .map_err(|e| invalid(format!("{e:#}")))?;
        let pre = bindings::PluginPre::new(instance_pre).map_err(|e| invalid(format!("{e:#}")))?;
        Ok(LoadedPlugin {
            name: name.into(),
            config: config.to_string(),
            limits,
            pre,
            shared,
        })
    }

    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A running instance with `state`, initialized with the plugin's configuration.
    pub fn instantiate(self: &Arc<Self>, state: PluginState) -> Result<PluginInstance, LoadError> {
        let mut instance = PluginInstance {
            plugin: self.clone(),
            store: self.new_store(state),
            bindings: None,
        };
        outside_async(|| instance.start()).map_err(|reason| LoadError::Init {
            plugin: self.name.to_string(),
            reason,
        })?;
        Ok(instance)
    }

    fn new_store(&self, state: PluginState) -> Store<StoreState> {
        let memory = (self.limits.memory_mb.max(1) * 1024 * 1024) as usize;
        let data = StoreState::new(self.name.clone(), memory, state, &self.limits);
        let mut store = Store::new(&self.shared.engine, data);
        store.limiter(|s| &mut s.limits);
        store
    }
}

/// Compares the contract the component was built against with ours.
fn check_version(engine: &Engine, component: &Component) -> Result<(), String> {
    let ty = component.component_type();
    let prefix = format!("{WIT_PACKAGE}/");
    let ours_major = WIT_VERSION.split('.').take(2).collect::<Vec<_>>().join(".");
    for (name, _) in ty.imports(engine) {
        if let Some(rest) = name.strip_prefix(&prefix) {
            let version = rest
                .split_once('@')
                .map(|(_, v)| v)
                .unwrap_or("(no version)");
            // 0.x versions are compatible within a minor version, as in semver.
            let theirs = version.split('.').take(2).collect::<Vec<_>>().join(".");
            if theirs != ours_major {
                return Err(format!("{WIT_PACKAGE}@{version}"));
            }
        }
    }
    let exports: Vec<String> = ty.exports(engine).map(|(n, _)| n.to_string()).collect();
    if !exports.iter().any(|e| e == "process") || !exports.iter().any(|e| e == "init") {
        return Err(format!(
            "a world exporting [{}] instead of init and process",
            exports.join(", ")
        ));
    }
    Ok(())
}

/// A running plugin instance.
pub struct PluginInstance {
    plugin: Arc<LoadedPlugin>,
    store: Store<StoreState>,
    bindings: Option<bindings::Plugin>,
}

impl PluginInstance {
    /// The plugin's name.
    pub fn name(&self) -> &str {
        &self.plugin.name
    }

    /// The committed state.
    pub fn state(&self) -> &PluginState {
        &self.store.data().state
    }

    /// The state keys committed since the last call (`None`: deleted), to checkpoint.
    pub fn take_state_changes(&mut self) -> StateChanges {
        self.store.data_mut().state.take_changes()
    }

    fn arm_deadline(&mut self) {
        let ticks = self
            .plugin
            .limits
            .timeout_ms
            .max(1)
            .div_ceil(TICK.as_millis() as u64);
        self.store.set_epoch_deadline(ticks);
        self.store.epoch_deadline_trap();
    }

    fn start(&mut self) -> Result<(), String> {
        self.arm_deadline();
        let bindings = self
            .plugin
            .pre
            .instantiate(&mut self.store)
            .map_err(|e| describe_trap(&e).1)?;
        let init = bindings.call_init(&mut self.store, &self.plugin.config);
        match init {
            Ok(Ok(())) => {
                self.store.data_mut().state.commit();
                self.bindings = Some(bindings);
                Ok(())
            }
            Ok(Err(message)) => Err(message),
            Err(trap) => Err(describe_trap(&trap).1),
        }
    }

    /// Replaces the instance after a trap (the committed state carries over).
    fn restart(&mut self) -> Result<(), String> {
        let mut state = std::mem::take(&mut self.store.data_mut().state);
        state.rollback();
        self.store = self.plugin.new_store(state);
        self.bindings = None;
        self.start()
    }

    /// Processes documents (JSON texts); returns one outcome per document, in order. Never
    /// fails as a whole: a trap, timeout or memory violation is isolated to the documents
    /// that cause it.
    pub fn process(&mut self, documents: &[String]) -> Vec<Outcome> {
        let mut out = outside_async(|| self.process_unlabelled(documents));
        // Failures are rare: only then is the document read again for its LSN.
        for (outcome, doc) in out.iter_mut().zip(documents) {
            if let Err(f) = outcome {
                f.lsn = source_field(doc, "lsn");
            }
        }
        out
    }

    fn process_unlabelled(&mut self, documents: &[String]) -> Vec<Outcome> {
        let mut out = Vec::with_capacity(documents.len());
        for chunk in documents.chunks(self.plugin.limits.batch.max(1)) {
            match self.call(chunk) {
                Ok(results) => out.extend(results),
                Err(_) if chunk.len() > 1 => {
                    // Isolate the poison: one document at a time, each with a fresh budget.
                    for doc in chunk {
                        match self.call(std::slice::from_ref(doc)) {
                            Ok(mut r) => out.push(r.pop().unwrap_or_else(|| {
                                Err(self.failure(
                                    FailureKind::InvalidOutput,
                                    "returned no result".into(),
                                ))
                            })),
                            Err(failure) => out.push(Err(failure)),
                        }
                    }
                }
                Err(failure) => out.push(Err(failure)),
            }
        }
        out
    }

    fn failure(&self, kind: FailureKind, error: String) -> Failure {
        Failure {
            plugin: self.plugin.name.to_string(),
            kind,
            error,
            lsn: None,
        }
    }

    /// One call. `Err` when the call as a whole failed (the instance is then replaced and
    /// the batch's state writes are undone).
    fn call(&mut self, docs: &[String]) -> Result<Vec<Outcome>, Failure> {
        if self.bindings.is_none() {
            self.restart().map_err(|e| {
                self.failure(
                    FailureKind::Trap,
                    format!("restarting after a trap failed: {e}"),
                )
            })?;
        }
        let Some(bindings) = self.bindings.take() else {
            return Err(self.failure(FailureKind::Trap, "no instance".into()));
        };
        self.arm_deadline();
        self.store.data_mut().last_error = None;
        let called = bindings.call_process(&mut self.store, docs);
        if called.is_ok() {
            self.bindings = Some(bindings);
        }
        match called {
            Ok(results) if results.len() == docs.len() => {
                self.store.data_mut().state.commit();
                Ok(results.into_iter().map(|r| self.check(r)).collect())
            }
            Ok(results) => {
                self.store.data_mut().state.rollback();
                Err(self.failure(
                    FailureKind::InvalidOutput,
                    format!(
                        "returned {} results for {} documents",
                        results.len(),
                        docs.len()
                    ),
                ))
            }
            Err(trap) => {
                let (kind, mut message) = describe_trap(&trap);
                if let Some(said) = self.store.data_mut().last_error.take() {
                    message = format!("{message}; the plugin logged: {said}");
                }
                let failure = self.failure(kind, message);
                // A trapped instance may be corrupt: it is replaced on the next call.
                self.store.data_mut().state.rollback();
                Err(failure)
            }
        }
    }

    fn check(&self, result: Result<Vec<bindings::Output>, String>) -> Outcome {
        // (`bindings::Output` is the WIT record; it stays inside this module.)
        let outputs = result.map_err(|e| self.failure(FailureKind::Rejected, e))?;
        let total: usize = outputs.iter().map(|o| o.document.len() + o.key.len()).sum();
        if total as u64 > self.plugin.limits.max_output_bytes {
            return Err(self.failure(
                FailureKind::InvalidOutput,
                format!(
                    "emitted {total} bytes for one document, over the limit of {} (limits.max_output_bytes)",
                    self.plugin.limits.max_output_bytes
                ),
            ));
        }
        outputs
            .into_iter()
            .map(|o| {
                if o.collection.is_empty()
                    || !o
                        .collection
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
                {
                    return Err(self.failure(
                        FailureKind::InvalidOutput,
                        format!(
                            "output collection `{}` is not a name (letters, digits, _ and -)",
                            o.collection
                        ),
                    ));
                }
                let document = JsonObject::parse(o.document).map_err(|e| {
                    self.failure(
                        FailureKind::InvalidOutput,
                        format!("output for `{}` {e}", o.collection),
                    )
                })?;
                Ok(Emitted {
                    collection: o.collection,
                    key: o.key,
                    document,
                })
            })
            .collect()
    }
}

/// A text field of a document's `_meta.source` (`lsn`, `table`), if it has one.
fn source_field(doc: &str, field: &str) -> Option<String> {
    let v: Value = serde_json::from_str(doc).ok()?;
    let text = v.get("_meta")?.get("source")?.get(field)?.as_str()?;
    Some(text.to_string())
}

/// Names the kind of a trap and a message a person can act on.
fn describe_trap(e: &wasmtime::Error) -> (FailureKind, String) {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        return match trap {
            wasmtime::Trap::Interrupt => (
                FailureKind::Timeout,
                "ran past its CPU time limit (limits.timeout_ms)".to_string(),
            ),
            wasmtime::Trap::OutOfFuel => (FailureKind::Timeout, "ran out of fuel".to_string()),
            wasmtime::Trap::UnreachableCodeReached => (
                FailureKind::Trap,
                format!("trapped: {} (a panic in the plugin?)", trap),
            ),
            other => (FailureKind::Trap, format!("trapped: {other}")),
        };
    }
    let text = format!("{e:#}");
    if text.contains("memory") && (text.contains("limit") || text.contains("grow")) {
        return (
            FailureKind::Memory,
            format!("exceeded its memory limit (limits.memory_mb): {text}"),
        );
    }
    (FailureKind::Trap, format!("trapped: {text}"))
}
