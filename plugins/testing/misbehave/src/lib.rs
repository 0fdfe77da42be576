//! Misbehaves on purpose, on documents that have `"poison": true`, in the way its config
//! says (`{"mode": "trap" | "spin" | "memory" | "bad-json" | "no-collection" | "huge" |
//! "wrong-count" | "escape"}`); echoes every other document to the `echo` collection. weir's tests use
//! it to prove that one bad document never stops the pipeline.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;

use weir_plugin_sdk::bindings::Guest;
use weir_plugin_sdk::bindings::weir::plugin::{host, types::Output};

thread_local! {
    static MODE: RefCell<String> = const { RefCell::new(String::new()) };
}

struct Misbehave;

fn echo(doc: &serde_json::Value) -> Output {
    Output {
        collection: "echo".into(),
        key: doc.get("id").map(|v| v.to_string()).unwrap_or_default(),
        document: doc.to_string(),
    }
}

impl Guest for Misbehave {
    fn init(config: String) -> Result<(), String> {
        let config: serde_json::Value = serde_json::from_str(&config).map_err(|e| e.to_string())?;
        let mode = config["mode"].as_str().unwrap_or("trap").to_string();
        MODE.with(|m| *m.borrow_mut() = mode);
        // Without it a panic's message goes to standard error (which the host discards).
        if config["report_panics"] == serde_json::Value::Bool(true) {
            weir_plugin_sdk::report_panics();
        }
        Ok(())
    }

    fn process(documents: Vec<String>) -> Vec<Result<Vec<Output>, String>> {
        let mode = MODE.with(|m| m.borrow().clone());
        let mut results = Vec::new();
        for json in &documents {
            let doc: serde_json::Value = match serde_json::from_str(json) {
                Ok(d) => d,
                Err(e) => {
                    results.push(Err(e.to_string()));
                    continue;
                }
            };
            // Count calls in state, so tests can see that a trapped batch's writes are undone.
            let seen = host::state_get("seen").map(|v| v.len()).unwrap_or(0);
            host::state_set("seen", &vec![0u8; seen + 1]);
            if doc["poison"] != serde_json::Value::Bool(true) {
                results.push(Ok(vec![echo(&doc)]));
                continue;
            }
            match mode.as_str() {
                "trap" => panic!("poisoned document {}", doc["id"]),
                "spin" => {
                    let mut x: u64 = 0;
                    loop {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                "memory" => {
                    let mut hoard: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hoard.push(vec![1u8; 1 << 20]);
                        std::hint::black_box(&hoard);
                    }
                }
                "bad-json" => results.push(Ok(vec![Output {
                    collection: "echo".into(),
                    key: "1".into(),
                    document: "{not json".into(),
                }])),
                "no-collection" => results.push(Ok(vec![Output {
                    collection: String::new(),
                    key: "1".into(),
                    document: "{}".into(),
                }])),
                "huge" => results.push(Ok(vec![Output {
                    collection: "echo".into(),
                    key: "1".into(),
                    document: format!("{{\"blob\": \"{}\"}}", "x".repeat(4 << 20)),
                }])),
                "wrong-count" => return Vec::new(),
                "escape" => {
                    // Try what the sandbox must deny, and report what came back.
                    let file = std::fs::read_to_string("/etc/hostname").map_err(|e| e.to_string());
                    let dir = std::fs::read_dir("/")
                        .map(|d| d.count())
                        .map_err(|e| e.to_string());
                    let net =
                        std::net::TcpStream::connect("127.0.0.1:5432").map_err(|e| e.to_string());
                    let time = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(u64::MAX);
                    let report = serde_json::json!({
                        "file_ok": file.is_ok(),
                        "dir_ok": dir.is_ok(),
                        "net_ok": net.is_ok(),
                        "env_vars": std::env::vars().count(),
                        "args": std::env::args().count(),
                        "unix_time": time,
                    });
                    results.push(Ok(vec![Output {
                        collection: "escape".into(),
                        key: "1".into(),
                        document: report.to_string(),
                    }]));
                }
                other => results.push(Err(format!("unknown mode {other}"))),
            }
        }
        results
    }
}

weir_plugin_sdk::bindings::export!(Misbehave with_types_in weir_plugin_sdk::bindings);
