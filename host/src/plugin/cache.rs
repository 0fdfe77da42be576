//! Compiled components on disk: compiling a component with Cranelift takes much longer than
//! loading its compiled form, so each component is compiled once per wasmtime version and
//! configuration.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};

use wasmtime::component::Component;
use wasmtime::{Engine, Result};

/// The default cache folder: `$XDG_CACHE_HOME/weir/components` or
/// `~/.cache/weir/components`.
pub fn default_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("weir").join("components"))
}

/// The cache key: wasmtime's compatibility hash (version and settings) and the bytes.
fn key(engine: &Engine, bytes: &[u8]) -> String {
    let mut h = DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut h);
    let compat = h.finish();
    let mut h = DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{compat:016x}-{:016x}-{}", h.finish(), bytes.len())
}

/// Compiles `bytes`, or loads the compiled form cached in `dir`.
pub fn compile(engine: &Engine, bytes: &[u8], dir: Option<&Path>) -> Result<Component> {
    let Some(dir) = dir else {
        return Component::new(engine, bytes);
    };
    let path = dir.join(format!("{}.cwasm", key(engine, bytes)));
    if let Ok(compiled) = std::fs::read(&path) {
        // SAFETY: the file is one we wrote from `precompile_component` under a key that
        // includes wasmtime's compatibility hash; a damaged file fails to deserialize and
        // is recompiled below.
        match unsafe { Component::deserialize(engine, &compiled) } {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring a damaged cached component")
            }
        }
    }
    let compiled = engine.precompile_component(bytes)?;
    // SAFETY: produced just now by this engine.
    let component = unsafe { Component::deserialize(engine, &compiled) }?;
    if std::fs::create_dir_all(dir).is_ok() {
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &compiled).is_ok() {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
    Ok(component)
}
