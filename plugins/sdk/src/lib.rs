//! Write a weir plugin as one function per change document.
//!
//! ```
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
use std::cell::{OnceCell, RefCell};

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
///
/// The document is parsed lazily: reading it checks that it is valid JSON and notes where
/// each top-level field is, and a field's value is decoded when it is first asked for
/// (numbers and strings without escapes are read straight from the text). A plugin that
/// looks at a few columns pays for those only.
#[derive(Debug, Clone)]
pub struct Document {
    text: Box<str>,
    top: Members,
    meta: OnceCell<Option<Members>>,
    source: OnceCell<Option<Members>>,
    map: OnceCell<Map<String, Value>>,
    before: OnceCell<Option<Map<String, Value>>>,
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
        Document::from_string(json.to_string())
    }

    /// Parses a document, taking its text.
    pub fn from_string(json: String) -> Result<Document, String> {
        let text = json.into_boxed_str();
        let top = match Members::parse(&text, Span::all(&text)) {
            Ok(Some(top)) => top,
            Ok(None) => return Err("the document is not a JSON object".into()),
            Err(e) => return Err(format!("the document is not valid JSON: {e}")),
        };
        Ok(Document::of(text, top))
    }

    /// A document of `text` whose top-level members are `top`.
    fn of(text: Box<str>, top: Members) -> Document {
        Document {
            text,
            top,
            meta: OnceCell::new(),
            source: OnceCell::new(),
            map: OnceCell::new(),
            before: OnceCell::new(),
        }
    }

    /// A document from the host, which sends only JSON it has checked (documents it
    /// serialized, recorded lines it parsed): scanned rather than parsed again, unless
    /// the scan cannot take it (a name with escapes), when [`Document::from_string`]
    /// decides.
    fn from_host(json: String) -> Result<Document, String> {
        let text = json.into_boxed_str();
        let b = text.as_bytes();
        let mut inner = [None, None];
        match Members::scan_path(b, 0, &["_meta", "source"], &mut inner) {
            Some((top, end)) if b[end..].iter().all(u8::is_ascii_whitespace) => {
                let [meta, source] = inner;
                let mut doc = Document::of(text, top);
                // `_meta` and its `source` were found by the same scan.
                doc.source = OnceCell::from(meta.as_ref().and(source));
                doc.meta = OnceCell::from(meta);
                Ok(doc)
            }
            _ => Document::from_string(text.into_string()),
        }
    }

    /// The whole document (columns and `_meta`).
    pub fn as_map(&self) -> &Map<String, Value> {
        self.map
            .get_or_init(|| match serde_json::from_str(&self.text) {
                Ok(Value::Object(map)) => map,
                _ => Map::new(),
            })
    }

    /// A column's value.
    pub fn get(&self, column: &str) -> Option<&Value> {
        let i = self.top.find(&self.text, column)?;
        Some(self.top.value(&self.text, i))
    }

    /// A column's value as a string.
    pub fn get_str(&self, column: &str) -> Option<&str> {
        let i = self.top.find(&self.text, column)?;
        self.top.str_at(&self.text, i)
    }

    /// A column's value as a number: JSON numbers, and decimal strings (weir sends
    /// `numeric` columns as exact strings such as `"125.50"`).
    pub fn get_f64(&self, column: &str) -> Option<f64> {
        let i = self.top.find(&self.text, column)?;
        self.top.number_at(&self.text, i)
    }

    /// A column's value as an integer.
    pub fn get_i64(&self, column: &str) -> Option<i64> {
        let i = self.top.find(&self.text, column)?;
        self.top.number_at(&self.text, i)
    }

    fn meta(&self) -> Option<&Members> {
        self.meta
            .get_or_init(|| self.top.object_at(&self.text, "_meta"))
            .as_ref()
    }

    fn source(&self, field: &str) -> Option<&str> {
        let source = self
            .source
            .get_or_init(|| self.meta()?.object_at(&self.text, "source"))
            .as_ref()?;
        let i = source.find(&self.text, field)?;
        source.str_at(&self.text, i)
    }

    /// The operation.
    pub fn op(&self) -> Option<Op> {
        let meta = self.meta()?;
        let i = meta.find(&self.text, "op")?;
        Some(match meta.str_at(&self.text, i)? {
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
        self.source("table")
    }

    /// The source schema.
    pub fn schema(&self) -> Option<&str> {
        self.source("schema")
    }

    /// The commit LSN of the source transaction, as text.
    pub fn lsn(&self) -> Option<&str> {
        self.source("lsn")
    }

    /// The old row or key (`_meta.before`), when PostgreSQL sent it.
    pub fn before(&self) -> Option<&Map<String, Value>> {
        self.before
            .get_or_init(|| {
                let meta = self.meta()?;
                let i = meta.find(&self.text, "before")?;
                meta.value(&self.text, i).as_object().cloned()
            })
            .as_ref()
    }

    /// A key built from columns' values, joined with `|` (`"42"`, `"7|2024-01-01"`).
    pub fn key_of(&self, columns: &[&str]) -> String {
        let mut key = String::new();
        for (n, c) in columns.iter().enumerate() {
            if n > 0 {
                key.push('|');
            }
            let Some(i) = self.top.find(&self.text, c) else {
                continue;
            };
            match self.top.value(&self.text, i) {
                Value::String(s) => key.push_str(s),
                Value::Null => {}
                v => key.push_str(&v.to_string()),
            }
        }
        key
    }
}

/// A byte range of a document's text.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
}

impl Span {
    fn all(text: &str) -> Span {
        Span {
            start: 0,
            end: text.len(),
        }
    }

    /// Where `part`, a slice of `text`, lies in it.
    fn of(text: &str, part: &str) -> Span {
        let start = part.as_ptr() as usize - text.as_ptr() as usize;
        Span {
            start,
            end: start + part.len(),
        }
    }

    fn get(self, text: &str) -> &str {
        &text[self.start..self.end]
    }
}

/// A member's name: where it is in the text, or unescaped when it has escapes.
#[derive(Debug, Clone)]
enum Name {
    At(Span),
    Unescaped(String),
}

/// The members of one JSON object of a document: names and where their values are, each
/// value decoded on first use.
#[derive(Debug, Clone)]
struct Members {
    names: Vec<Name>,
    values: Vec<Span>,
    /// Decoded values, allocated on the first decode (most reads take numbers and plain
    /// strings straight from the text).
    decoded: OnceCell<Box<[OnceCell<Value>]>>,
}

impl Members {
    /// The members of the object at `span` of `text` (`None`: valid JSON, not an object).
    fn parse(text: &str, span: Span) -> Result<Option<Members>, serde_json::Error> {
        use serde::Deserializer as _;
        let mut de = serde_json::Deserializer::from_str(span.get(text));
        let found = match de.deserialize_map(MembersVisitor { text }) {
            Ok(found) => found,
            Err(e) if e.classify() == serde_json::error::Category::Data => {
                // Not an object: still report a syntax error as one.
                serde_json::from_str::<serde::de::IgnoredAny>(span.get(text))?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        de.end()?;
        let (names, values): (Vec<Name>, Vec<Span>) = found.into_iter().unzip();
        Ok(Some(Members {
            names,
            values,
            decoded: OnceCell::new(),
        }))
    }

    /// The index of member `name` (the last one, when a name repeats, as a map keeps).
    fn find(&self, text: &str, name: &str) -> Option<usize> {
        self.names.iter().rposition(|n| match n {
            Name::At(span) => span.get(text) == name,
            Name::Unescaped(s) => s == name,
        })
    }

    fn raw<'a>(&self, text: &'a str, i: usize) -> &'a str {
        self.values[i].get(text)
    }

    fn value(&self, text: &str, i: usize) -> &Value {
        self.decoded
            .get_or_init(|| vec![OnceCell::new(); self.values.len()].into_boxed_slice())[i]
            .get_or_init(|| serde_json::from_str(self.raw(text, i)).unwrap_or(Value::Null))
    }

    /// A string member, read from the text when it has no escapes.
    fn str_at<'a>(&'a self, text: &'a str, i: usize) -> Option<&'a str> {
        let raw = self.raw(text, i);
        if raw.starts_with('"') && !raw.contains('\\') {
            return Some(&raw[1..raw.len() - 1]);
        }
        self.value(text, i).as_str()
    }

    /// A number member, or a string member holding one.
    fn number_at<T: std::str::FromStr>(&self, text: &str, i: usize) -> Option<T> {
        let raw = self.raw(text, i);
        match raw.as_bytes().first()? {
            b'"' => self.str_at(text, i)?.parse().ok(),
            b'-' | b'0'..=b'9' => raw.parse().ok(),
            _ => None,
        }
    }

    /// The members of member `name`, when it is an object.
    fn object_at(&self, text: &str, name: &str) -> Option<Members> {
        let i = self.find(text, name)?;
        let span = self.values[i];
        Members::scan(text, span).or_else(|| Members::parse(text, span).ok().flatten())
    }

    /// [`Members::parse`] of an object inside text that parse has already checked: a plain
    /// scan for where names and values are, several times cheaper than a validating parse
    /// (`_meta` and `_meta.source` are read this way for every document). `None` for
    /// anything but an object, or a name with escapes (left to `parse`).
    fn scan(text: &str, span: Span) -> Option<Members> {
        let b = text.as_bytes().get(..span.end)?;
        Members::scan_path(b, span.start, &[], &mut []).map(|(members, _)| members)
    }

    /// [`Members::scan`] of the object starting at `start` (after any whitespace), which
    /// also scans, on the way, the object under the member path `path` (`["_meta",
    /// "source"]`: `inner[0]` gets `_meta`'s members, `inner[1]` its `source`'s; `None`
    /// where the member is absent or not an object; the last one where a name repeats).
    /// So a document is read once, not once per level. Returns the members and where
    /// the object ends.
    fn scan_path(
        b: &[u8],
        start: usize,
        path: &[&str],
        inner: &mut [Option<Members>],
    ) -> Option<(Members, usize)> {
        let skip_ws = |mut i: usize| {
            while b.get(i).is_some_and(|c| c.is_ascii_whitespace()) {
                i += 1;
            }
            i
        };
        let mut i = skip_ws(start);
        if b.get(i) != Some(&b'{') {
            return None;
        }
        i += 1;
        let mut names = Vec::with_capacity(8);
        let mut values = Vec::with_capacity(8);
        loop {
            i = skip_ws(i);
            match b.get(i)? {
                b'}' => break,
                b',' => i = skip_ws(i + 1),
                _ => {}
            }
            if b.get(i) != Some(&b'"') {
                return None;
            }
            let (close, escaped) = string_end(b, i)?;
            if escaped {
                return None;
            }
            let name = Span {
                start: i + 1,
                end: close,
            };
            names.push(Name::At(name));
            i = skip_ws(close + 1);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(i + 1);
            i = match path.first() {
                Some(&on_path) if &b[name.start..name.end] == on_path.as_bytes() => {
                    // A later member of that name replaces what an earlier one found.
                    inner.iter_mut().for_each(|m| *m = None);
                    if b.get(start) == Some(&b'{') {
                        let (found, end) =
                            Members::scan_path(b, start, &path[1..], &mut inner[1..])?;
                        inner[0] = Some(found);
                        end
                    } else {
                        value_end(b, start)?
                    }
                }
                _ => value_end(b, start)?,
            };
            values.push(Span { start, end: i });
        }
        Some((
            Members {
                names,
                values,
                decoded: OnceCell::new(),
            },
            i + 1,
        ))
    }
}

/// The index of the quote closing the string that opens at `open`, and whether the string
/// has escapes.
fn string_end(b: &[u8], open: usize) -> Option<(usize, bool)> {
    let mut escaped = false;
    let mut j = open + 1;
    loop {
        match b.get(j)? {
            b'"' => return Some((j, escaped)),
            b'\\' => {
                escaped = true;
                j += 2;
            }
            _ => j += 1,
        }
    }
}

/// Where the (valid) JSON value starting at `start` ends.
fn value_end(b: &[u8], start: usize) -> Option<usize> {
    match b.get(start)? {
        b'"' => string_end(b, start).map(|(close, _)| close + 1),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = start;
            loop {
                match b.get(j)? {
                    b'"' => j = string_end(b, j)?.0,
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = start;
            while b
                .get(j)
                .is_some_and(|c| !matches!(c, b',' | b'}' | b']') && !c.is_ascii_whitespace())
            {
                j += 1;
            }
            (j > start).then_some(j)
        }
    }
}

/// Collects an object's member names and value positions, borrowing from the text.
struct MembersVisitor<'a> {
    text: &'a str,
}

impl<'de> serde::de::Visitor<'de> for MembersVisitor<'de> {
    type Value = Vec<(Name, Span)>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::with_capacity(map.size_hint().unwrap_or(8));
        while let Some(key) = map.next_key::<Key<'de>>()? {
            let value: &'de serde_json::value::RawValue = map.next_value()?;
            let name = match key {
                Key::Borrowed(s) => Name::At(Span::of(self.text, s)),
                Key::Owned(s) => Name::Unescaped(s),
            };
            out.push((name, Span::of(self.text, value.get())));
        }
        Ok(out)
    }
}

/// A member name: borrowed from the text unless it had escapes.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(s))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s.to_string()))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key::Owned(s))
            }
        }
        d.deserialize_str(V)
    }
}

/// A document to emit: a JSON value, or JSON text already serialized (see
/// [`Output::serialize`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    /// A value.
    Value(Value),
    /// Serialized text.
    Text(String),
}

impl Json {
    /// The document as JSON text.
    pub fn into_text(self) -> String {
        match self {
            Json::Value(v) => v.to_string(),
            Json::Text(t) => t,
        }
    }

    /// The document as a value.
    pub fn to_value(&self) -> Value {
        match self {
            Json::Value(v) => v.clone(),
            Json::Text(t) => serde_json::from_str(t).unwrap_or(Value::Null),
        }
    }
}

impl From<Value> for Json {
    fn from(v: Value) -> Json {
        Json::Value(v)
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
    pub document: Json,
}

impl Output {
    /// An output for `collection` under `key`.
    pub fn new(
        collection: impl Into<String>,
        key: impl Into<String>,
        document: impl Into<Json>,
    ) -> Output {
        Output {
            collection: collection.into(),
            key: key.into(),
            document: document.into(),
        }
    }

    /// An output serialized straight from a struct (`#[derive(Serialize)]`), without
    /// building a JSON value first: the cheapest way to emit a document of fixed shape.
    pub fn serialize<T: serde::Serialize>(
        collection: impl Into<String>,
        key: impl Into<String>,
        document: &T,
    ) -> Result<Output, String> {
        let text = serde_json::to_string(document).map_err(|e| e.to_string())?;
        Ok(Output::new(collection, key, Json::Text(text)))
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
    let doc = Document::from_host(json.to_string())?;
    Ok(plugin
        .process(&doc)?
        .into_iter()
        .map(|o| (o.collection, o.key, o.document.into_text()))
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
            .into_iter()
            .map(|json| {
                let doc = Document::from_host(json)?;
                let outputs = plugin.process(&doc)?;
                Ok(outputs
                    .into_iter()
                    .map(|o| bindings::weir::plugin::types::Output {
                        collection: o.collection,
                        key: o.key,
                        document: o.document.into_text(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const INSERT: &str = r#"{"transaction_id": 42, "user_id": 7, "amount": "125.50",
        "note": "a \"quoted\" word", "ratio": -1.5e2, "flag": true, "gone": null,
        "nested": {"a": [1, 2]}, "dup": 1, "dup": 2, "caf\u00e9": "latte",
        "_meta": {"op": "u", "before": {"transaction_id": 42, "amount": "100.00"},
                  "source": {"schema": "public", "table": "transactions", "lsn": "0/16B3748"}}}"#;

    #[test]
    fn the_scan_of_a_checked_object_finds_what_the_parse_finds() {
        let texts = [
            r#"{"_meta": {"op": "u", "before": {"a": [1, {"b": "}]"}], "c": "x\"}y"}, "n": -1.5e2 ,"t":true,"f":false,"z":null, "s": {"schema": "public", "table": "t"}, "e": {}, "l": []}}"#,
            INSERT,
            "{ }",
            " {\n\"a\" :\t1 , \"b\":\"\\\\\"}",
        ];
        let names = |m: &Members, text: &str| -> Vec<String> {
            m.names
                .iter()
                .map(|n| match n {
                    Name::At(span) => span.get(text).to_string(),
                    Name::Unescaped(s) => s.clone(),
                })
                .collect()
        };
        let mut checked = 0;
        for text in texts {
            let top = Members::parse(text, Span::all(text)).unwrap().unwrap();
            let mut objects = vec![Span::all(text)];
            objects.extend(top.values.iter().copied());
            if let Some(i) = top.find(text, "_meta") {
                let meta = Members::parse(text, top.values[i]).unwrap().unwrap();
                objects.extend(meta.values.iter().copied());
            }
            for span in objects {
                let parsed = Members::parse(text, span).unwrap();
                let scanned = Members::scan(text, span);
                match (&parsed, &scanned) {
                    (Some(p), Some(s)) => {
                        assert_eq!(names(p, text), names(s, text), "{}", span.get(text));
                        let raw = |m: &Members| {
                            (0..m.values.len())
                                .map(|i| m.raw(text, i))
                                .collect::<Vec<_>>()
                        };
                        assert_eq!(raw(p), raw(s), "{}", span.get(text));
                        checked += 1;
                    }
                    // Not an object; or names with escapes, left to the parse.
                    (None, None) => {}
                    (Some(p), None) => assert!(
                        p.names.iter().any(|n| matches!(n, Name::Unescaped(_))),
                        "{}",
                        span.get(text)
                    ),
                    (None, Some(_)) => panic!("scanned a non-object: {}", span.get(text)),
                }
            }
        }
        assert!(checked >= 8, "{checked}");
    }

    #[test]
    fn a_host_document_reads_as_the_parsed_one() {
        let plain = r#"{"transaction_id":42,"amount":"125.50","note":"a \"q\"","_meta":{"op":"c","source":{"table":"transactions","lsn":"0/1"}}}"#;
        // `_meta` and `source` are found in the same pass as the top level: every shape
        // reads as the parse reads it (the last of a repeated name, not an object,
        // missing, names with escapes, nested objects and strings holding braces).
        let shapes = [
            r#"{"_meta":{"op":"c","source":{"table":"a"}},"_meta":{"op":"d","source":{"table":"b"}}}"#,
            r#"{"_meta":{"op":"c","source":{"table":"a"}},"_meta":{"op":"d"}}"#,
            r#"{"_meta":{"op":"c","source":{"table":"a"}},"_meta":7}"#,
            r#"{"_meta":{"op":"u","source":"t","before":{"source":{"table":"x"}}}}"#,
            r#"{"_meta":{"before":{"a":"}{"},"source":{"ta\u0062le":"t","table":"u"},"op":"r"}}"#,
            r#"{"x":{"_meta":{"op":"c"}},"_meta":{"source":{"lsn":"0/2","table":"t"},"op":"t"}} "#,
            r#"{"a":1}"#,
        ];
        for text in [plain, INSERT].into_iter().chain(shapes) {
            let scanned = Document::from_host(text.to_string()).unwrap();
            let parsed = Document::parse(text).unwrap();
            assert_eq!(scanned.as_map(), parsed.as_map());
            for name in parsed.as_map().keys() {
                assert_eq!(scanned.get(name), parsed.get(name), "{name}");
            }
            assert_eq!(scanned.table(), parsed.table(), "{text}");
            assert_eq!(scanned.op(), parsed.op(), "{text}");
            assert_eq!(scanned.lsn(), parsed.lsn(), "{text}");
            assert_eq!(scanned.before(), parsed.before(), "{text}");
        }
        let first = Document::from_host(shapes[0].to_string()).unwrap();
        assert_eq!((first.op(), first.table()), (Some(Op::Delete), Some("b")));
        let escaped = Document::from_host(shapes[4].to_string()).unwrap();
        assert_eq!(escaped.table(), Some("u"));
        assert!(Document::from_host("[1]".into()).is_err());
    }

    #[test]
    fn lazy_reads_equal_the_parsed_document() {
        let doc = Document::parse(INSERT).unwrap();
        let full: Map<String, Value> = serde_json::from_str(INSERT).unwrap();
        assert_eq!(doc.as_map(), &full);
        for (name, value) in &full {
            assert_eq!(doc.get(name), Some(value), "{name}");
            assert_eq!(doc.get_str(name), value.as_str(), "{name}");
        }
        assert_eq!(
            doc.get("dup"),
            Some(&json!(2)),
            "the last of a repeated name wins"
        );
        assert_eq!(doc.get_str("note"), Some("a \"quoted\" word"));
        assert_eq!(doc.get_str("café"), Some("latte"));
        assert_eq!(doc.get_f64("amount"), Some(125.5));
        assert_eq!(doc.get_f64("ratio"), Some(-150.0));
        assert_eq!(doc.get_i64("transaction_id"), Some(42));
        assert_eq!(doc.get_i64("ratio"), None);
        assert_eq!(doc.get_f64("flag"), None);
        assert_eq!(doc.get_f64("gone"), None);
        assert_eq!(doc.get("missing"), None);
        assert_eq!(doc.op(), Some(Op::Update));
        assert_eq!(doc.table(), Some("transactions"));
        assert_eq!(doc.schema(), Some("public"));
        assert_eq!(doc.lsn(), Some("0/16B3748"));
        assert_eq!(
            doc.before(),
            full["_meta"]["before"].as_object(),
            "before-image"
        );
        assert_eq!(
            doc.key_of(&["user_id", "amount", "gone", "nested"]),
            "7|125.50||{\"a\":[1,2]}"
        );
    }

    #[test]
    fn bad_documents_are_refused_with_the_reason() {
        let e = Document::parse("[1, 2]").unwrap_err();
        assert_eq!(e, "the document is not a JSON object");
        let e = Document::parse(r#"{"a": 1"#).unwrap_err();
        assert!(e.starts_with("the document is not valid JSON"), "{e}");
        let e = Document::parse(r#"{"a": [1, }"#).unwrap_err();
        assert!(e.starts_with("the document is not valid JSON"), "{e}");
        let e = Document::parse(r#"{"a": 1} x"#).unwrap_err();
        assert!(e.starts_with("the document is not valid JSON"), "{e}");
        let e = Document::parse("[1, ").unwrap_err();
        assert!(e.starts_with("the document is not valid JSON"), "{e}");
        // No `_meta`, or a `_meta` of another kind: no op, no table.
        let doc = Document::parse(r#"{"_meta": 3}"#).unwrap();
        assert_eq!((doc.op(), doc.table(), doc.before()), (None, None, None));
    }

    #[test]
    fn outputs_serialize_as_values_would() {
        #[derive(serde::Serialize)]
        struct Alert<'a> {
            amount: Option<&'a Value>,
            id: i64,
            ok: bool,
        }
        let amount = json!("1.50");
        let typed = Output::serialize(
            "alerts",
            "1",
            &Alert {
                amount: Some(&amount),
                id: 1,
                ok: true,
            },
        )
        .unwrap();
        let built = Output::new(
            "alerts",
            "1",
            json!({"amount": "1.50", "id": 1, "ok": true}),
        );
        assert_eq!(typed.document.to_value(), built.document.to_value());
        assert_eq!(typed.document.into_text(), built.document.into_text());
    }
}
