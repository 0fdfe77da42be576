//! Write a weir plugin as one function per change document.
//!
//! ```ignore
//! use weir_plugin_sdk::{Document, Output, Plugin};
//!
//! struct Upper;
//!
//! impl Plugin for Upper {
//!     fn init(_config: serde_json::Value) -> Result<Self, String> {
//!         Ok(Upper)
//!     }
//!     fn process(&mut self, doc: &Document) -> Result<Vec<Output>, String> {
//!         let name = doc.get_str("name").unwrap_or_default().to_uppercase();
//!         Ok(vec![Output::new("upper_names", doc.key_of(&["id"]), serde_json::json!({ "name": name }))])
//!     }
//! }
//!
//! weir_plugin_sdk::export_plugin!(Upper);
//! ```
//!
//! Build with `cargo build --release --target wasm32-wasip2`: the `.wasm` file is a
//! component weir loads. The contract is `wit/weir-plugin.wit` (package
//! `weir:plugin@0.1.0`).

use std::any::Any;
use std::cell::RefCell;

use serde_json::{Map, Value};

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "../../wit",
        world: "plugin",
        pub_export_macro: true,
        default_bindings_module: "weir_plugin_sdk::bindings",
    });
}

#[cfg(target_arch = "wasm32")]
use bindings::weir::plugin::host;

/// The host's functions when the plugin is compiled natively (benchmarks): state in a
/// thread-local map, logs to standard error.
#[cfg(not(target_arch = "wasm32"))]
mod host {
    use std::cell::RefCell;
    use std::collections::HashMap;

    thread_local! {
        static STATE: RefCell<HashMap<String, Vec<u8>>> = RefCell::new(HashMap::new());
    }

    /// Log levels, as in the WIT contract.
    #[derive(Debug, Clone, Copy)]
    pub enum Level {
        Debug,
        Info,
        Warn,
        Error,
    }

    pub fn log(level: Level, message: &str) {
        eprintln!("{level:?}: {message}");
    }
    pub fn state_get(key: &str) -> Option<Vec<u8>> {
        STATE.with(|s| s.borrow().get(key).cloned())
    }
    pub fn state_set(key: &str, value: &[u8]) {
        STATE.with(|s| s.borrow_mut().insert(key.to_string(), value.to_vec()));
    }
    pub fn state_delete(key: &str) {
        STATE.with(|s| s.borrow_mut().remove(key));
    }
}

/// A plugin: built once from its configuration, then called once per document.
pub trait Plugin: Sized + 'static {
    /// Builds the plugin from its configuration (a JSON object, `{}` when none).
    fn init(config: Value) -> Result<Self, String>;

    /// Processes one change document: returns what to emit, or an error (the document then
    /// goes to the dead-letter table; the pipeline goes on).
    fn process(&mut self, doc: &Document) -> Result<Vec<Output>, String>;
}

/// A change document: the row's columns at top level, plus `_meta`.
#[derive(Debug, Clone)]
pub struct Document {
    value: Map<String, Value>,
}

/// What happened to the row (`_meta.op`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Inserted.
    Insert,
    /// Updated.
    Update,
    /// Deleted.
    Delete,
    /// Read by the backfill.
    Read,
    /// Table truncated.
    Truncate,
}

impl Document {
    /// Parses a document.
    pub fn parse(json: &str) -> Result<Document, String> {
        match serde_json::from_str(json) {
            Ok(Value::Object(value)) => Ok(Document { value }),
            Ok(_) => Err("the document is not a JSON object".into()),
            Err(e) => Err(format!("the document is not valid JSON: {e}")),
        }
    }

    /// The whole document (columns and `_meta`).
    pub fn as_map(&self) -> &Map<String, Value> {
        &self.value
    }

    /// A column's value.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.value.get(column)
    }

    /// A column's value as a string.
    pub fn get_str(&self, column: &str) -> Option<&str> {
        self.get(column)?.as_str()
    }

    /// A column's value as a number: JSON numbers, and decimal strings (weir sends
    /// `numeric` columns as exact strings such as `"125.50"`).
    pub fn get_f64(&self, column: &str) -> Option<f64> {
        match self.get(column)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    /// A column's value as an integer.
    pub fn get_i64(&self, column: &str) -> Option<i64> {
        match self.get(column)? {
            Value::Number(n) => n.as_i64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        }
    }

    fn meta(&self) -> Option<&Map<String, Value>> {
        self.value.get("_meta")?.as_object()
    }

    fn source(&self, field: &str) -> Option<&Value> {
        self.meta()?.get("source")?.as_object()?.get(field)
    }

    /// The operation.
    pub fn op(&self) -> Option<Op> {
        Some(match self.meta()?.get("op")?.as_str()? {
            "c" => Op::Insert,
            "u" => Op::Update,
            "d" => Op::Delete,
            "r" => Op::Read,
            "t" => Op::Truncate,
            _ => return None,
        })
    }

    /// The source table's name (without schema).
    pub fn table(&self) -> Option<&str> {
        self.source("table")?.as_str()
    }

    /// The source schema.
    pub fn schema(&self) -> Option<&str> {
        self.source("schema")?.as_str()
    }

    /// The commit LSN of the source transaction, as text.
    pub fn lsn(&self) -> Option<&str> {
        self.source("lsn")?.as_str()
    }

    /// The old row or key (`_meta.before`), when PostgreSQL sent it.
    pub fn before(&self) -> Option<&Map<String, Value>> {
        self.meta()?.get("before")?.as_object()
    }

    /// A key built from columns' values, joined with `|` (`"42"`, `"7|2024-01-01"`).
    pub fn key_of(&self, columns: &[&str]) -> String {
        columns
            .iter()
            .map(|c| match self.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
            .collect::<Vec<_>>()
            .join("|")
    }
}

/// A document to emit.
#[derive(Debug, Clone, PartialEq)]
pub struct Output {
    /// The collection (Delta table) it goes to.
    pub collection: String,
    /// Its key there.
    pub key: String,
    /// The document (a JSON object).
    pub document: Value,
}

impl Output {
    /// An output for `collection` under `key`.
    pub fn new(collection: impl Into<String>, key: impl Into<String>, document: Value) -> Output {
        Output {
            collection: collection.into(),
            key: key.into(),
            document,
        }
    }
}

/// Logging through the host (lines appear in weir's log, tagged with the plugin's name).
pub mod log {
    use super::host::{self, Level};

    /// Logs at info level.
    pub fn info(message: &str) {
        host::log(Level::Info, message);
    }
    /// Logs at warn level.
    pub fn warn(message: &str) {
        host::log(Level::Warn, message);
    }
    /// Logs at debug level.
    pub fn debug(message: &str) {
        host::log(Level::Debug, message);
    }
    /// Logs at error level.
    pub fn error(message: &str) {
        host::log(Level::Error, message);
    }
}

/// Sends a panic's message and place to the host as an error log instead of standard
/// error (which the sandbox discards): weir then adds it to the trap's dead letter. The
/// SDK's plugins get this at `init`; plugins written on the raw bindings can call it.
pub fn report_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        log::error(&format!("panicked{place}: {message}"));
    }));
}

/// The plugin's key-value state, kept by the host and checkpointed with the stream.
pub mod state {
    use super::host;

    /// Reads raw bytes.
    pub fn get(key: &str) -> Option<Vec<u8>> {
        host::state_get(key)
    }
    /// Writes raw bytes.
    pub fn set(key: &str, value: &[u8]) {
        host::state_set(key, value);
    }
    /// Deletes a key.
    pub fn delete(key: &str) {
        host::state_delete(key);
    }
    /// Reads a JSON value (absent or unreadable: `None`).
    pub fn get_json<T: serde::de::DeserializeOwned>(key: &str) -> Option<T> {
        serde_json::from_slice(&get(key)?).ok()
    }
    /// Writes a JSON value.
    pub fn set_json<T: serde::Serialize>(key: &str, value: &T) {
        if let Ok(bytes) = serde_json::to_vec(value) {
            set(key, &bytes);
        }
    }
}

thread_local! {
    static INSTANCE: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

#[doc(hidden)]
pub fn __init<P: Plugin>(config: String) -> Result<(), String> {
    report_panics();
    let config: Value = if config.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(&config)
            .map_err(|e| format!("plugin config is not valid JSON: {e}"))?
    };
    let plugin = P::init(config)?;
    INSTANCE.with(|i| *i.borrow_mut() = Some(Box::new(plugin)));
    Ok(())
}

/// Runs a plugin on one document natively, as the host would through WebAssembly: parse,
/// process, serialize each output. For benchmarks against the WebAssembly build.
pub fn run_native<P: Plugin>(
    plugin: &mut P,
    json: &str,
) -> Result<Vec<(String, String, String)>, String> {
    let doc = Document::parse(json)?;
    Ok(plugin
        .process(&doc)?
        .into_iter()
        .map(|o| (o.collection, o.key, o.document.to_string()))
        .collect())
}

#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub fn __process<P: Plugin>(
    documents: Vec<String>,
) -> Vec<Result<Vec<bindings::weir::plugin::types::Output>, String>> {
    INSTANCE.with(|i| {
        let mut slot = i.borrow_mut();
        let Some(plugin) = slot.as_mut().and_then(|b| b.downcast_mut::<P>()) else {
            return documents
                .iter()
                .map(|_| Err("plugin was not initialized".to_string()))
                .collect();
        };
        documents
            .iter()
            .map(|json| {
                let doc = Document::parse(json)?;
                let outputs = plugin.process(&doc)?;
                Ok(outputs
                    .into_iter()
                    .map(|o| bindings::weir::plugin::types::Output {
                        collection: o.collection,
                        key: o.key,
                        document: o.document.to_string(),
                    })
                    .collect())
            })
            .collect()
    })
}

/// Exports a [`Plugin`] implementation as the component's `init` and `process`.
#[macro_export]
macro_rules! export_plugin {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        struct __WeirPluginExport;

        #[cfg(target_arch = "wasm32")]
        impl $crate::bindings::Guest for __WeirPluginExport {
            fn init(config: String) -> Result<(), String> {
                $crate::__init::<$plugin>(config)
            }
            fn process(
                documents: Vec<String>,
            ) -> Vec<Result<Vec<$crate::bindings::weir::plugin::types::Output>, String>> {
                $crate::__process::<$plugin>(documents)
            }
        }

        #[cfg(target_arch = "wasm32")]
        $crate::bindings::export!(__WeirPluginExport with_types_in $crate::bindings);
    };
}
