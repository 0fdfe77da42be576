//! `weir bench plugin`: the fraud rule through wasmtime against the same Rust code
//! compiled into weir, on the same documents, in the same run.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use fraud_rule::FraudRule;
use serde_json::{Value, json};
use weir::plugin::{Limits, LoadedPlugin, PluginState};
use weir_plugin_sdk::Plugin;

/// `count` insert documents for 1,000 users with varied amounts.
fn documents(count: usize) -> Vec<String> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..count)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let amount = (state % 50_000) as f64 / 100.0;
            json!({
                "transaction_id": i + 1,
                "user_id": state % 1000 + 1,
                "transaction_date": "2026-11-29T10:00:00.000000Z",
                "amount": format!("{amount:.2}"),
                "_meta": {"op": "c", "source": {"schema": "public", "table": "transactions",
                          "lsn": format!("0/{:X}", 0x1000 + i), "txid": 1000 + i, "ts_ms": 1_795_940_000_000u64,
                          "seq": 0, "snapshot": false}}
            })
            .to_string()
        })
        .collect()
}

pub fn run(count: usize, wasm: &Path) -> Result<()> {
    let docs = documents(count);
    println!("plugin benchmark: fraud rule on {count} documents");

    // Native: the same work the host does around a WebAssembly call (parse the document,
    // run the rule, serialize the outputs, read them back as JSON).
    let mut native = <FraudRule as Plugin>::init(json!({})).map_err(anyhow::Error::msg)?;
    let start = Instant::now();
    let mut anomalies_native = 0usize;
    for doc in &docs {
        let outputs = weir_plugin_sdk::run_native(&mut native, doc).map_err(anyhow::Error::msg)?;
        for (_, _, document) in outputs {
            let v: Value = serde_json::from_str(&document)?;
            anomalies_native += usize::from(v["is_anomaly"] == Value::Bool(true));
        }
    }
    let native_ns = start.elapsed().as_nanos() as f64 / count as f64;
    println!("  native (compiled into weir)  : {native_ns:>8.0} ns/doc");

    let mut wasm_ns_1000 = 0.0;
    for batch in [1000usize, 100, 1] {
        // Batch size 1 is slow by design: measure it on fewer documents.
        let n = if batch == 1 {
            count.min(100_000)
        } else {
            count
        };
        let plugin = Arc::new(LoadedPlugin::load(
            "fraud_rule",
            wasm,
            &json!({}),
            Limits {
                batch,
                timeout_ms: 60_000,
                ..Limits::default()
            },
            weir::plugin::cache::default_dir().as_deref(),
        )?);
        let mut instance = plugin.instantiate(PluginState::default())?;
        let start = Instant::now();
        let mut anomalies = 0usize;
        for chunk in docs[..n].chunks(batch) {
            for outcome in instance.process(chunk) {
                for e in outcome.map_err(|f| anyhow::anyhow!("{}: {}", f.plugin, f.error))? {
                    anomalies += usize::from(e.document["is_anomaly"] == Value::Bool(true));
                }
            }
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        if batch == 1000 {
            wasm_ns_1000 = ns;
            anyhow::ensure!(
                anomalies == anomalies_native,
                "WebAssembly flagged {anomalies} anomalies, native {anomalies_native}"
            );
            println!(
                "  WebAssembly, batch {batch:>4}     : {ns:>8.0} ns/doc  ratio to native {:.2}x (target <= 1.5x); {anomalies} anomalies, same as native",
                ns / native_ns
            );
        } else {
            println!(
                "  WebAssembly, batch {batch:>4}     : {ns:>8.0} ns/doc  per-call overhead ~{:.0} ns over batch 1000",
                (ns - wasm_ns_1000) * batch as f64
            );
        }
    }
    Ok(())
}
