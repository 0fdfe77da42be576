//! `weir bench plugin`: the fraud rule through wasmtime against the same Rust code
//! compiled into weir, on the same documents, in the same run.

use std::path::Path;
use std::sync::Arc;

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

/// CPU time of the calling thread, in nanoseconds. The benchmark measures CPU time, not
/// wall time: on a shared virtual machine, time stolen by neighbours is not the code's.
fn thread_cpu_ns() -> f64 {
    // SAFETY: clock_gettime writes the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Native run on a fresh thread (the native SDK keeps state in a thread-local map, so a
/// new thread starts from empty state as a new instance does). Returns ns/doc and the
/// anomalies found.
fn native_round(docs: Arc<Vec<String>>) -> Result<(f64, usize)> {
    std::thread::spawn(move || -> Result<(f64, usize)> {
        // The same work the host does around a WebAssembly call: parse the document, run
        // the rule, serialize the outputs, read them back as JSON.
        let mut rule = <FraudRule as Plugin>::init(json!({})).map_err(anyhow::Error::msg)?;
        let start = thread_cpu_ns();
        let mut anomalies = 0usize;
        for doc in docs.iter() {
            for (_, _, document) in
                weir_plugin_sdk::run_native(&mut rule, doc).map_err(anyhow::Error::msg)?
            {
                let v: Value = serde_json::from_str(&document)?;
                anomalies += usize::from(v["is_anomaly"] == Value::Bool(true));
            }
        }
        Ok(((thread_cpu_ns() - start) / docs.len() as f64, anomalies))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("native run panicked"))?
}

/// WebAssembly run with a fresh instance. Returns ns/doc and the anomalies found.
fn wasm_round(plugin: &Arc<LoadedPlugin>, docs: &[String], batch: usize) -> Result<(f64, usize)> {
    let mut instance = plugin.instantiate(PluginState::default())?;
    let start = thread_cpu_ns();
    let mut anomalies = 0usize;
    for chunk in docs.chunks(batch) {
        for outcome in instance.process(chunk) {
            for e in outcome.map_err(|f| anyhow::anyhow!("{}: {}", f.plugin, f.error))? {
                anomalies += usize::from(
                    e.document.get("is_anomaly").and_then(|v| v.as_bool()) == Some(true),
                );
            }
        }
    }
    Ok((
        (thread_cpu_ns() - start) / docs.len().max(1) as f64,
        anomalies,
    ))
}

fn load(wasm: &Path, batch: usize) -> Result<Arc<LoadedPlugin>> {
    Ok(Arc::new(LoadedPlugin::load(
        "fraud_rule",
        wasm,
        &json!({}),
        Limits {
            batch,
            timeout_ms: 60_000,
            ..Limits::default()
        },
        weir::plugin::cache::default_dir().as_deref(),
    )?))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(count: usize, wasm: &Path) -> Result<()> {
    const ROUNDS: usize = 5;
    let docs = Arc::new(documents(count));
    println!(
        "plugin benchmark: fraud rule on {count} documents, {ROUNDS} rounds (native and WebAssembly alternate; thread CPU time)"
    );
    let plugin = load(wasm, 1000)?;
    let (mut native, mut webassembly, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=ROUNDS {
        let (n, native_anomalies) = native_round(docs.clone())?;
        let (w, wasm_anomalies) = wasm_round(&plugin, &docs, 1000)?;
        anyhow::ensure!(
            native_anomalies == wasm_anomalies,
            "WebAssembly flagged {wasm_anomalies} anomalies, native {native_anomalies}"
        );
        println!(
            "  round {round}: native {n:>7.0} ns/doc, WebAssembly (batch 1000) {w:>7.0} ns/doc, ratio {:.2}x",
            w / n
        );
        native.push(n);
        webassembly.push(w);
        ratios.push(w / n);
    }
    println!(
        "  median: native {:.0} ns/doc, WebAssembly {:.0} ns/doc, ratio {:.2}x (target <= 1.5x)",
        median(native),
        median(webassembly),
        median(ratios)
    );

    // Call overhead: documents of another table, which the rule passes over at once, so
    // that what remains is the cost of getting documents in and results out.
    let skipped: Vec<String> = (0..100_000)
        .map(|i| {
            json!({"user_id": i, "_meta": {"op": "c", "source": {"table": "users", "lsn": "0/1"}}})
                .to_string()
        })
        .collect();
    let mut per_doc = Vec::new();
    for batch in [1000usize, 100, 1] {
        let plugin = load(wasm, batch)?;
        let (ns, _) = wasm_round(&plugin, &skipped, batch)?;
        per_doc.push((batch, ns));
    }
    let base = per_doc[0].1;
    for (batch, ns) in per_doc {
        println!(
            "  pass-through document, batch {batch:>4}: {ns:>6.0} ns/doc, ~{:>6.0} ns per call above batch 1000's share",
            (ns - base) * batch as f64
        );
    }
    Ok(())
}
