//! Masks e-mail addresses before they are materialized: `alice@example.com` becomes
//! `a****@example.com`. The masked document replaces the original (it is emitted to the
//! source table's own collection), so the replica never holds the clear address.
//!
//! Config (optional): `{"table": "users", "column": "email"}`.

use serde::Deserialize;
use serde_json::Value;
use weir_plugin_sdk::{Document, Output, Plugin};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_table")]
    table: String,
    #[serde(default = "default_column")]
    column: String,
}

fn default_table() -> String {
    "users".into()
}
fn default_column() -> String {
    "email".into()
}

/// The plugin.
pub struct MaskEmail {
    config: Config,
}

/// Keeps the first character of the local part and the domain.
pub fn mask(address: &str) -> String {
    match address.split_once('@') {
        Some((local, domain)) => {
            let first: String = local.chars().take(1).collect();
            format!(
                "{first}{}@{domain}",
                "*".repeat(local.chars().count().saturating_sub(1).max(1))
            )
        }
        None => "*".repeat(address.chars().count()),
    }
}

impl Plugin for MaskEmail {
    fn init(config: Value) -> Result<Self, String> {
        let config =
            serde_json::from_value(config).map_err(|e| format!("mask-email config: {e}"))?;
        Ok(MaskEmail { config })
    }

    fn process(&mut self, doc: &Document) -> Result<Vec<Output>, String> {
        if doc.table() != Some(self.config.table.as_str()) {
            return Ok(Vec::new());
        }
        let mut masked = doc.as_map().clone();
        if let Some(Value::String(email)) = masked.get(&self.config.column) {
            let m = mask(email);
            masked.insert(self.config.column.clone(), Value::String(m));
        }
        let before = masked
            .get_mut("_meta")
            .and_then(|m| m.get_mut("before"))
            .and_then(Value::as_object_mut);
        if let Some(before) = before
            && let Some(Value::String(email)) = before.get(&self.config.column)
        {
            let m = mask(email);
            before.insert(self.config.column.clone(), Value::String(m));
        }
        Ok(vec![Output::new(
            self.config.table.clone(),
            doc.key_of(&["user_id"]),
            Value::Object(masked),
        )])
    }
}

weir_plugin_sdk::export_plugin!(MaskEmail);
