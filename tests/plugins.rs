//! The plugin host with real components built from `plugins/`: the fraud rule, the
//! e-mail mask, plugins that misbehave on purpose, and `weir plugin test`.

use std::path::PathBuf;
use std::sync::Arc;

use serde_json::{Value, json};
use weir::plugin::{FailureKind, Limits, LoadError, LoadedPlugin, Outcome, PluginState};

fn wasm(name: &str) -> PathBuf {
    PathBuf::from(env!("WEIR_PLUGIN_DIR")).join(format!("{name}.wasm"))
}

fn load(name: &str, config: Value, limits: Limits) -> Arc<LoadedPlugin> {
    let cache = tempfile::tempdir().unwrap();
    Arc::new(LoadedPlugin::load(name, &wasm(name), &config, limits, Some(cache.path())).unwrap())
}

fn tx(op: &str, id: i64, user: i64, amount: &str, lsn: &str) -> String {
    json!({
        "transaction_id": id, "user_id": user, "transaction_date": "2026-11-29T10:00:00.000000Z",
        "amount": amount,
        "_meta": {"op": op, "source": {"schema": "public", "table": "transactions", "lsn": lsn,
                   "txid": 1, "ts_ms": 0, "seq": 0, "snapshot": op == "r"}}
    })
    .to_string()
}

fn doc_with(id: i64, poison: bool) -> String {
    json!({"id": id, "poison": poison, "_meta": {"op": "c", "source": {"schema": "public", "table": "t", "lsn": "0/1"}}})
        .to_string()
}

/// The error instantiating plugin `name` with `config` gives (its `init` refusing it).
fn init_error(name: &str, config: Value) -> String {
    LoadedPlugin::load(name, &wasm(name), &config, Limits::default(), None)
        .map(Arc::new)
        .unwrap()
        .instantiate(PluginState::default())
        .err()
        .unwrap()
        .to_string()
}

fn ok(o: &Outcome) -> &Vec<weir::plugin::Emitted> {
    o.as_ref().unwrap_or_else(|f| panic!("failed: {f:?}"))
}

#[test]
fn fraud_rule_flags_amounts_over_three_times_the_average() {
    // Every scored transaction is emitted, normal ones too.
    let plugin = load("fraud_rule", json!({"emit": "all"}), Limits::default());
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let docs = vec![
        tx("r", 1, 7, "10.00", "0/10"),
        tx("c", 2, 7, "20.00", "0/20"),
        tx("c", 3, 7, "90.01", "0/30"), // avg 15: 90.01 > 45 -> anomaly
        tx("c", 4, 8, "500.00", "0/40"), // first of user 8: no history, never an anomaly
        tx("c", 5, 7, "50.00", "0/50"), // avg (10+20+90.01)/3 = 40.00: 50 < 120
    ];
    let out = inst.process(&docs);
    let alerts: Vec<Value> = out.iter().map(|o| ok(o)[0].document.to_value()).collect();
    assert_eq!(ok(&out[2])[0].collection, "fraud_alerts");
    assert_eq!(ok(&out[2])[0].key, "3");
    assert_eq!(
        alerts
            .iter()
            .map(|a| a["is_anomaly"].as_bool().unwrap())
            .collect::<Vec<_>>(),
        [false, false, true, false, false]
    );
    assert_eq!(alerts[2]["user_avg"], json!(15.0));
    assert_eq!(alerts[2]["amount_diff"], json!(75.01));
    assert_eq!(alerts[2]["amount"], json!("90.01"));
    assert_eq!(alerts[2]["rule"], json!("fraud-rule"));
    assert_eq!(alerts[2]["lsn"], json!("0/30"));
    assert_eq!(alerts[4]["user_avg"], json!(40.0));

    // An update moves the amount in the statistics (no before-image needed); a delete
    // removes it and retracts its alert.
    let out = inst.process(&[
        tx("u", 3, 7, "20.00", "0/60"),
        json!({"transaction_id": 3, "_meta": {"op": "d", "source": {"table": "transactions", "lsn": "0/70"}}}).to_string(),
        tx("c", 6, 7, "100.00", "0/80"),
    ]);
    // After the update, user 7 has 10, 20, 50 (avg 26.67) besides tx 3 itself.
    assert_eq!(ok(&out[0])[0].document.to_value()["user_avg"], json!(26.67));
    assert_eq!(
        ok(&out[1])[0].document.to_value(),
        json!({"transaction_id": 3, "_deleted": true, "lsn": "0/70"})
    );
    // After the delete: 10, 20, 50 -> avg 26.67; 100 > 80 -> anomaly.
    assert_eq!(
        ok(&out[2])[0].document.to_value()["is_anomaly"],
        json!(true)
    );

    // Other tables pass without output; a broken document fails alone, with the reason.
    let out = inst.process(&[
        json!({"id": 1, "_meta": {"op": "c", "source": {"table": "users"}}}).to_string(),
        json!({"transaction_id": 9, "user_id": 7, "_meta": {"op": "c", "source": {"table": "transactions"}}}).to_string(),
    ]);
    assert!(ok(&out[0]).is_empty());
    let f = out[1].as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Rejected);
    assert!(f.error.contains("amount"), "{f:?}");
}

#[test]
fn fraud_rule_by_default_emits_anomalies_and_withdraws_alerts_that_no_longer_hold() {
    let plugin = load("fraud_rule", json!({}), Limits::default());
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let docs = [
        tx("r", 1, 7, "10.00", "0/10"),
        tx("c", 2, 7, "20.00", "0/20"),
        tx("c", 3, 7, "90.01", "0/30"), // avg 15 -> anomaly
        tx("c", 4, 7, "50.00", "0/40"), // avg 40 -> normal
        tx("c", 5, 7, "200.00", "0/50"), // avg 42.5 -> anomaly
        tx("u", 3, 7, "20.00", "0/60"), // no longer an anomaly: its alert is withdrawn
        tx("u", 4, 7, "51.00", "0/70"), // normal, had no alert: nothing
        tx("u", 2, 7, "500.00", "0/80"), // becomes an anomaly
        // Deleted: tx 5 had an alert (withdrawn), tx 1 none (nothing).
        json!({"transaction_id": 5, "_meta": {"op": "d", "source": {"table": "transactions", "lsn": "0/90"}}}).to_string(),
        json!({"transaction_id": 1, "_meta": {"op": "d", "source": {"table": "transactions", "lsn": "0/A0"}}}).to_string(),
    ];
    let out = inst.process(&docs);
    let emitted: Vec<(usize, String, Value)> = out
        .iter()
        .enumerate()
        .flat_map(|(i, o)| {
            ok(o)
                .iter()
                .map(move |e| (i, e.key.clone(), e.document.to_value()))
        })
        .collect();
    let summary: Vec<(usize, &str, Option<bool>)> = emitted
        .iter()
        .map(|(i, k, d)| (*i, k.as_str(), d["is_anomaly"].as_bool()))
        .collect();
    assert_eq!(
        summary,
        [
            (2, "3", Some(true)),
            (4, "5", Some(true)),
            (5, "3", None),
            (7, "2", Some(true)),
            (8, "5", None),
        ]
    );
    assert_eq!(
        emitted[2].2,
        json!({"transaction_id": 3, "_deleted": true, "lsn": "0/60"})
    );
    assert_eq!(
        emitted[4].2,
        json!({"transaction_id": 5, "_deleted": true, "lsn": "0/90"})
    );
    assert_eq!(emitted[0].2["user_avg"], json!(15.0));
    // The state remembers the live alerts only (tx 2), besides users and transactions.
    let alerts: Vec<String> = inst
        .take_state_changes()
        .into_iter()
        .filter(|(k, v)| k.starts_with("alert:") && v.is_some())
        .map(|(k, _)| k)
        .collect();
    assert_eq!(alerts, ["alert:2"]);
    // The same alerts as `emit = "all"` flags.
    let all = load("fraud_rule", json!({"emit": "all"}), Limits::default());
    let mut all = all.instantiate(PluginState::default()).unwrap();
    let flagged: Vec<(usize, String)> = all
        .process(&docs)
        .iter()
        .enumerate()
        .flat_map(|(i, o)| {
            ok(o)
                .iter()
                .filter(|e| e.document.to_value()["is_anomaly"] == json!(true))
                .map(move |e| (i, e.key.clone()))
        })
        .collect();
    assert_eq!(
        flagged,
        emitted
            .iter()
            .filter(|e| e.2["is_anomaly"] == json!(true))
            .map(|(i, k, _)| (*i, k.clone()))
            .collect::<Vec<_>>()
    );
    let bad = init_error("fraud_rule", json!({"emit": "some"}));
    assert!(bad.contains("emit") || bad.contains("some"), "{bad}");
}

/// The rule keeps a user's figures in 16 bytes, and still reads the JSON object earlier
/// versions stored (a lake written by them resumes with the same averages).
#[test]
fn fraud_rule_reads_the_json_user_state_of_earlier_versions() {
    let plugin = load(
        "fraud_rule",
        json!({"before_images": true, "emit": "all"}),
        Limits::default(),
    );
    let old = PluginState::from_committed(
        [("user:7".to_string(), br#"{"count":2,"sum":30.0}"#.to_vec())].into(),
    );
    let mut inst = plugin.instantiate(old).unwrap();
    let docs = [
        tx("c", 3, 7, "90.01", "0/30"),
        tx("c", 4, 7, "10.00", "0/40"),
    ];
    let out: Vec<Value> = inst
        .process(&docs)
        .iter()
        .map(|o| ok(o)[0].document.to_value())
        .collect();
    assert_eq!(out[0]["user_avg"], json!(15.0));
    assert_eq!(out[0]["history"], json!(2));
    assert_eq!(out[0]["is_anomaly"], json!(true));
    // 30 + 90.01 over 3: the new form carries on from the old.
    assert_eq!(out[1]["user_avg"], json!(40.0));
    assert_eq!(out[1]["history"], json!(3));
    let changes = inst.take_state_changes();
    let stored = changes["user:7"].as_ref().unwrap();
    assert_eq!(stored.len(), 16);
    assert_eq!(u64::from_le_bytes(stored[..8].try_into().unwrap()), 4);
    assert!((f64::from_le_bytes(stored[8..].try_into().unwrap()) - 130.01).abs() < 1e-9);
}

/// A change of transaction `id` with the old row as its before-image (REPLICA IDENTITY
/// FULL).
fn tx_with_before(
    op: &str,
    id: i64,
    user: i64,
    amount: &str,
    old: (i64, &str),
    lsn: &str,
) -> String {
    let mut doc: Value = serde_json::from_str(&tx(op, id, user, amount, lsn)).unwrap();
    doc["_meta"]["before"] = json!({"transaction_id": id, "user_id": old.0, "amount": old.1,
                                    "transaction_date": "2026-11-29T10:00:00.000000Z"});
    doc.to_string()
}

#[test]
fn fraud_rule_with_before_images_keeps_only_the_users_in_its_state() {
    let docs = [
        tx("r", 1, 7, "10.00", "0/10"),
        tx("c", 2, 7, "20.00", "0/20"),
        tx("c", 3, 7, "90.01", "0/30"),
        tx("c", 5, 7, "50.00", "0/50"),
        tx_with_before("u", 3, 7, "20.00", (7, "90.01"), "0/60"),
        // A delete under REPLICA IDENTITY FULL: the old row is the document itself.
        tx("d", 2, 7, "20.00", "0/70"),
        tx("c", 6, 7, "100.00", "0/80"),
    ];
    // The same decisions as with per-transaction state...
    let run = |config: Value| {
        let plugin = load("fraud_rule", config, Limits::default());
        let mut inst = plugin.instantiate(PluginState::default()).unwrap();
        let out: Vec<Value> = inst
            .process(&docs)
            .iter()
            .map(|o| ok(o)[0].document.to_value())
            .collect();
        let mut keys: Vec<String> = inst.take_state_changes().into_keys().collect();
        keys.sort();
        (out, keys)
    };
    let (with_state, state_keys) = run(json!({"emit": "all"}));
    let (with_before, before_keys) = run(json!({"before_images": true, "emit": "all"}));
    assert_eq!(with_before, with_state);
    // (after the update and the delete: 10, 20, 50 -> avg 26.67; 100 > 80)
    assert_eq!(with_before[6]["user_avg"], json!(26.67));
    assert_eq!(with_before[6]["is_anomaly"], json!(true));
    // ...with only the user in the state.
    assert!(
        state_keys.iter().any(|k| k.starts_with("tx:")),
        "{state_keys:?}"
    );
    assert_eq!(before_keys, ["user:7"]);

    // Without a before-image the change is refused, saying how to fix the table.
    let plugin = load(
        "fraud_rule",
        json!({"before_images": true}),
        Limits::default(),
    );
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let out = inst.process(&[
        tx("c", 1, 7, "10.00", "0/10"),
        json!({"transaction_id": 1, "_meta": {"op": "d", "source": {"table": "transactions", "lsn": "0/20"}}}).to_string(),
    ]);
    let f = out[1].as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Rejected);
    assert!(
        f.error.contains("REPLICA IDENTITY FULL") && f.error.contains("transaction 1"),
        "{f:?}"
    );
}

#[test]
fn fraud_rule_config_is_checked_and_used() {
    let err = init_error("fraud_rule", json!({"multipler": 2}));
    assert!(
        err.contains("multipler") && err.contains("fraud_rule"),
        "{err}"
    );
    let plugin = load(
        "fraud_rule",
        json!({"multiplier": 1.5, "min_history": 2, "emit": "all"}),
        Limits::default(),
    );
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let out = inst.process(&[
        tx("c", 1, 1, "10", "0/1"),
        tx("c", 2, 1, "100", "0/2"),
        tx("c", 3, 1, "90", "0/3"),
    ]);
    // Second: only one earlier transaction (min_history 2): not an anomaly. Third: avg 55,
    // 90 > 82.5.
    let flags: Vec<bool> = out
        .iter()
        .map(|o| {
            ok(o)[0].document.to_value()["is_anomaly"]
                .as_bool()
                .unwrap()
        })
        .collect();
    assert_eq!(flags, [false, false, true]);
}

#[test]
fn mask_email_replaces_the_users_document() {
    let plugin = load("mask_email", json!({}), Limits::default());
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let doc = json!({"user_id": 4, "email": "alice@example.com",
                     "_meta": {"op": "c", "source": {"table": "users"}}});
    let out = inst.process(&[doc.to_string()]);
    let o = &ok(&out[0])[0];
    assert_eq!((o.collection.as_str(), o.key.as_str()), ("users", "4"));
    assert_eq!(o.document.to_value()["email"], json!("a****@example.com"));
    assert_eq!(o.document.to_value()["_meta"]["op"], json!("c"));
}

fn limits() -> Limits {
    Limits {
        timeout_ms: 200,
        memory_mb: 32,
        ..Limits::default()
    }
}

/// One poison document among good ones, for every kind of misbehaviour: only it fails,
/// with the right kind, and the plugin goes on.
#[test]
fn misbehaving_plugins_fail_only_the_poison_document() {
    for (mode, kind, words) in [
        ("trap", FailureKind::Trap, "trapped"),
        ("spin", FailureKind::Timeout, "CPU time"),
        ("memory", FailureKind::Memory, "memory"),
        ("bad-json", FailureKind::InvalidOutput, "not valid JSON"),
        ("no-collection", FailureKind::InvalidOutput, "collection"),
        ("huge", FailureKind::InvalidOutput, "max_output_bytes"),
        ("wrong-count", FailureKind::InvalidOutput, "results for"),
    ] {
        let plugin = load("misbehave", json!({ "mode": mode }), limits());
        let mut inst = plugin.instantiate(PluginState::default()).unwrap();
        let docs = [doc_with(1, false), doc_with(2, true), doc_with(3, false)];
        let out = inst.process(&docs);
        assert_eq!(out.len(), 3, "{mode}");
        assert_eq!(ok(&out[0])[0].document.to_value()["id"], json!(1), "{mode}");
        assert_eq!(ok(&out[2])[0].document.to_value()["id"], json!(3), "{mode}");
        let f = out[1]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{mode}: poison passed"));
        assert_eq!(f.kind, kind, "{mode}: {f:?}");
        assert_eq!(f.plugin, "misbehave");
        assert!(f.error.contains(words), "{mode}: {}", f.error);
        // The plugin keeps working after the failure.
        let again = inst.process(&[doc_with(4, false)]);
        assert_eq!(
            ok(&again[0])[0].document.to_value()["id"],
            json!(4),
            "{mode}"
        );
        if mode == "trap" {
            // Its panic message went to standard error, which the sandbox discards.
            assert!(!f.error.contains("poisoned"), "{}", f.error);
        }
        if matches!(mode, "trap" | "spin" | "memory") {
            // The trapped batch's state writes were undone: only the successful calls
            // (1 and 3 retried alone, then 4) counted.
            assert_eq!(inst.state().get("seen").map(|v| v.len()), Some(3), "{mode}");
        }
    }
}

#[test]
fn a_panic_reported_through_the_sdk_names_its_message_and_place() {
    let plugin = load(
        "misbehave",
        json!({ "mode": "trap", "report_panics": true }),
        limits(),
    );
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let out = inst.process(&[doc_with(1, false), doc_with(2, true)]);
    assert_eq!(ok(&out[0])[0].document.to_value()["id"], json!(1));
    let f = out[1].as_ref().unwrap_err();
    assert_eq!(f.kind, FailureKind::Trap);
    assert!(
        f.error.contains("the plugin logged: panicked at")
            && f.error.contains("src/lib.rs")
            && f.error.contains("poisoned document 2"),
        "{}",
        f.error
    );
    // A later successful call does not carry the old message.
    let again = inst.process(&[doc_with(3, true)]);
    let f = again[0].as_ref().unwrap_err();
    assert_eq!(
        f.error.matches("poisoned document").count(),
        1,
        "{}",
        f.error
    );
    assert!(f.error.contains("poisoned document 3"), "{}", f.error);
}

#[test]
fn the_sandbox_grants_no_files_network_environment_or_clock() {
    let plugin = load("misbehave", json!({ "mode": "escape" }), limits());
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    let out = inst.process(&[doc_with(1, true)]);
    let report = &ok(&out[0])[0].document.to_value();
    assert_eq!(
        report,
        &json!({"file_ok": false, "dir_ok": false, "net_ok": false, "env_vars": 0, "args": 0, "unix_time": 0})
    );
}

#[test]
fn incompatible_or_broken_components_are_refused_with_the_reason() {
    let err = LoadedPlugin::load(
        "old",
        &wasm("wrong_version"),
        &json!({}),
        Limits::default(),
        None,
    )
    .err()
    .unwrap();
    assert!(matches!(err, LoadError::Version { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("weir:plugin@9.0.0") && msg.contains("weir:plugin@0.1.0"),
        "{msg}"
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"\0asm not really").unwrap();
    let msg = LoadedPlugin::load("broken", &broken, &json!({}), Limits::default(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        msg.contains("broken.wasm") && msg.contains("not a valid WebAssembly component"),
        "{msg}"
    );

    let msg = LoadedPlugin::load(
        "gone",
        &dir.path().join("gone.wasm"),
        &json!({}),
        Limits::default(),
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(msg.contains("gone.wasm"), "{msg}");
}

fn weir() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_weir"))
}

#[test]
fn weir_plugin_test_prints_outputs_and_checks_expectations() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("changes.jsonl");
    std::fs::write(
        &input,
        [
            tx("c", 1, 1, "10.00", "0/1"),
            tx("c", 2, 1, "40.00", "0/2"),
            "{broken".to_string(),
        ]
        .join("\n"),
    )
    .unwrap();
    let out = weir()
        .args(["plugin", "test"])
        .arg(wasm("fraud_rule"))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // The first has no history: no alert. The second is over 3x the first.
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["document"]["is_anomaly"], json!(true));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("changes.jsonl:3: not valid JSON"),
        "{stderr}"
    );

    // Expectations: the same outputs pass (for the two good lines), a changed one fails.
    std::fs::write(
        &input,
        [tx("c", 1, 1, "10.00", "0/1"), tx("c", 2, 1, "40.00", "0/2")].join("\n"),
    )
    .unwrap();
    let expect = dir.path().join("expected.jsonl");
    std::fs::write(&expect, &stdout).unwrap();
    let status = weir()
        .args(["plugin", "test"])
        .arg(wasm("fraud_rule"))
        .arg("--input")
        .arg(&input)
        .arg("--expect")
        .arg(&expect)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let out = weir()
        .args(["plugin", "test"])
        .arg(wasm("fraud_rule"))
        .arg("--input")
        .arg(&input)
        .args(["--config", r#"{"multiplier": 10}"#])
        .arg("--expect")
        .arg(&expect)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(
        stderr.contains("output 1") && stderr.contains("FAILED"),
        "{stderr}"
    );
}

#[test]
fn plugins_chain_in_order_and_failures_carry_plugin_error_and_lsn() {
    use weir::plugin::Chain;
    let mask = load("mask_email", json!({}), Limits::default());
    let fraud = load("fraud_rule", json!({"emit": "all"}), Limits::default());
    let trap = load("misbehave", json!({"mode": "trap"}), limits());
    let mut chain = Chain::new(vec![
        mask.instantiate(PluginState::default()).unwrap(),
        trap.instantiate(PluginState::default()).unwrap(),
        fraud.instantiate(PluginState::default()).unwrap(),
    ]);
    let user = json!({"user_id": 1, "email": "bob@example.com", "poison": true,
                      "_meta": {"op": "c", "source": {"table": "users", "lsn": "0/AB"}}});
    let out = chain.process(
        vec![user.to_string(), tx("c", 1, 1, "10.00", "0/AC")],
        &["users", "transactions"],
    );
    // The masked user replaced the original on its way to the replica.
    let masked: Value = serde_json::from_str(&out.documents[0]).unwrap();
    assert_eq!(masked["email"], json!("b**@example.com"));
    assert_eq!(out.replaced, [true, false]);
    // The trap plugin failed on the poisoned user only; the failure names plugin and LSN.
    assert_eq!(out.failures.len(), 1);
    let (index, failure) = &out.failures[0];
    assert_eq!(
        (*index, failure.plugin.as_str(), failure.lsn.as_deref()),
        (0, "misbehave", Some("0/AB"))
    );
    // The transaction went through all three: echoed by misbehave, scored by the rule.
    let collections: Vec<(usize, &str)> = out
        .emitted
        .iter()
        .map(|(i, e)| (*i, e.collection.as_str()))
        .collect();
    assert_eq!(collections, [(1, "echo"), (1, "fraud_alerts")]);
}

#[test]
fn cache_is_keyed_by_the_component_and_state_survives_batches() {
    let cache = tempfile::tempdir().unwrap();
    for name in ["fraud_rule", "mask_email", "fraud_rule"] {
        LoadedPlugin::load(
            name,
            &wasm(name),
            &json!({}),
            Limits::default(),
            Some(cache.path()),
        )
        .unwrap();
    }
    assert_eq!(
        std::fs::read_dir(cache.path()).unwrap().count(),
        2,
        "a changed component compiles anew"
    );

    // State carries from one batch to the next, and into a new instance given the state.
    let plugin = load("fraud_rule", json!({}), Limits::default());
    let mut inst = plugin.instantiate(PluginState::default()).unwrap();
    inst.process(&[tx("c", 1, 5, "10.00", "0/1")]);
    inst.process(&[tx("c", 2, 5, "30.00", "0/2")]);
    let state = inst.state().clone();
    let mut next = plugin.instantiate(state).unwrap();
    let out = next.process(&[tx("c", 3, 5, "61.00", "0/3")]);
    assert_eq!(ok(&out[0])[0].document.to_value()["user_avg"], json!(20.0));
    assert_eq!(
        ok(&out[0])[0].document.to_value()["is_anomaly"],
        json!(true)
    );
}

/// The hand-checked fixture in `plugins/fraud-rule/fixtures` (see its README).
#[test]
fn fraud_rule_matches_its_hand_checked_fixture() {
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../plugins/fraud-rule/fixtures");
    let out = weir()
        .args(["plugin", "test"])
        .arg(wasm("fraud_rule"))
        .arg("--input")
        .arg(fixtures.join("changes.jsonl"))
        .arg("--expect")
        .arg(fixtures.join("expected.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ok: 4 outputs as expected"), "{stderr}");
    let out = weir()
        .args(["plugin", "test"])
        .arg(wasm("fraud_rule"))
        .arg("--input")
        .arg(fixtures.join("changes.jsonl"))
        .args(["--config", r#"{"emit": "all"}"#])
        .arg("--expect")
        .arg(fixtures.join("expected-all.jsonl"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("ok: 9 outputs as expected"), "{stderr}");
}
