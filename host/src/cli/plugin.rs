//! `weir plugin test`: run a plugin on recorded change documents, no database needed.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use weir::plugin::{Limits, LoadedPlugin, PluginState, cache};

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Run a plugin on a file of change documents (JSON lines, as `weir capture` writes
    /// them) and print what it emits; compare with expected outputs.
    Test(TestArgs),
}

#[derive(Debug, Args)]
pub struct TestArgs {
    /// The plugin component (`.wasm`).
    plugin: PathBuf,
    /// Change documents, one JSON object per line.
    #[arg(long, short)]
    input: PathBuf,
    /// The plugin's configuration: a JSON file, or inline JSON (`'{"multiplier": 2}'`).
    #[arg(long, short)]
    config: Option<String>,
    /// Expected outputs, one `{"collection", "key", "document"}` object per line, in order:
    /// exit status 1 when the plugin emits anything else or fails on a document.
    #[arg(long, short)]
    expect: Option<PathBuf>,
    /// CPU time one call may take, in milliseconds.
    #[arg(long, default_value_t = weir::plugin::DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Memory limit of the instance, in MiB.
    #[arg(long, default_value_t = weir::plugin::DEFAULT_MEMORY_MB)]
    memory_mb: u64,
}

pub fn run(cmd: PluginCommand) -> Result<ExitCode> {
    match cmd {
        PluginCommand::Test(args) => test(args),
    }
}

fn test(args: TestArgs) -> Result<ExitCode> {
    let config: Value = match &args.config {
        None => json!({}),
        Some(text) if text.trim_start().starts_with('{') => {
            serde_json::from_str(text).context("--config is not valid JSON")?
        }
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --config {path}"))?;
            serde_json::from_str(&text)
                .with_context(|| format!("--config {path} is not valid JSON"))?
        }
    };
    let name = args
        .plugin
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin".into());
    let limits = Limits {
        timeout_ms: args.timeout_ms,
        memory_mb: args.memory_mb,
        ..Limits::default()
    };
    let loaded = Arc::new(LoadedPlugin::load(
        &name,
        &args.plugin,
        &config,
        limits,
        cache::default_dir().as_deref(),
    )?);
    let mut instance = loaded.instantiate(PluginState::default())?;

    let input = std::fs::read_to_string(&args.input)
        .with_context(|| format!("reading --input {}", args.input.display()))?;
    let mut docs = Vec::new();
    let mut lines = Vec::new();
    let mut unreadable = 0usize;
    for (i, line) in input.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(_)) => {
                docs.push(line.to_string());
                lines.push(i + 1);
            }
            Ok(_) => {
                unreadable += 1;
                eprintln!(
                    "{}:{}: not a JSON object; skipped",
                    args.input.display(),
                    i + 1
                );
            }
            Err(e) => {
                unreadable += 1;
                eprintln!(
                    "{}:{}: not valid JSON ({e}); skipped",
                    args.input.display(),
                    i + 1
                );
            }
        }
    }

    let mut failures = unreadable;
    let outcomes = instance.process(&docs);
    let mut emitted = Vec::new();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    for ((outcome, line), doc) in outcomes.into_iter().zip(&lines).zip(&docs) {
        match outcome {
            Ok(outputs) => {
                for o in outputs {
                    let v = json!({"collection": o.collection, "key": o.key, "document": o.document.to_value()});
                    writeln!(out, "{v}")?;
                    emitted.push(v);
                }
            }
            Err(f) => {
                failures += 1;
                let lsn = serde_json::from_str::<Value>(doc)
                    .ok()
                    .and_then(|v| v["_meta"]["source"]["lsn"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "-".into());
                eprintln!(
                    "{}:{line}: plugin `{}` failed ({}) at LSN {lsn}: {}",
                    args.input.display(),
                    f.plugin,
                    f.kind.as_str(),
                    f.error
                );
            }
        }
    }
    out.flush()?;
    eprintln!(
        "{} documents, {} outputs, {} failed",
        docs.len() + unreadable,
        emitted.len(),
        failures
    );

    let Some(expect) = &args.expect else {
        return Ok(ExitCode::SUCCESS);
    };
    let text = std::fs::read_to_string(expect)
        .with_context(|| format!("reading --expect {}", expect.display()))?;
    let expected: Vec<Value> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{}:{}: not valid JSON", expect.display(), i + 1))
        })
        .collect::<Result<_>>()?;
    let mut mismatches = 0;
    for i in 0..expected.len().max(emitted.len()) {
        match (expected.get(i), emitted.get(i)) {
            (Some(e), Some(g)) if e == g => {}
            (e, g) => {
                mismatches += 1;
                if mismatches <= 5 {
                    eprintln!(
                        "output {}:\n  expected {}\n  got      {}",
                        i + 1,
                        show(e),
                        show(g)
                    );
                }
            }
        }
    }
    if mismatches == 0 && failures == 0 {
        eprintln!("ok: {} outputs as expected", emitted.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!(
            "FAILED: {mismatches} outputs differ from {}, {failures} documents failed",
            expect.display()
        );
        Ok(ExitCode::FAILURE)
    }
}

fn show(v: Option<&Value>) -> String {
    v.map(Value::to_string)
        .unwrap_or_else(|| "(nothing)".into())
}
