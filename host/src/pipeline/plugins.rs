//! The plugin stage of the pipeline: every change document through the configured
//! plugins, their outputs and failures addressed to the lake's tables, their state
//! checkpointed with the batch.
//!
//! Exactly once: the plugins' state is written to the lake after everything else of a
//! batch, with the batch's position. On a restart the state is loaded back and changes
//! that committed before that position are not run again (their outputs are in the lake
//! already); later ones are, on the same state, so the same outputs come out (plugins are
//! deterministic) and each table keeps what it does not hold yet.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::config::PluginConfig;
use crate::document::ChangeDocument;
use crate::lsn::Lsn;
use crate::plugin::Chain;
use crate::plugin::{LoadError, LoadedPlugin, PluginState, cache};
use crate::sink::delta::collection::{DeadLetter, OutputRow, StateChanges};

/// What the plugins made of a batch.
#[derive(Debug, Default)]
pub struct PluginBatch {
    /// Outputs by collection.
    pub outputs: HashMap<String, Vec<OutputRow>>,
    /// Documents a plugin failed on.
    pub dead_letters: Vec<DeadLetter>,
    /// State changes by plugin (empty until the batch carries a position).
    pub state: Vec<(String, StateChanges)>,
    /// Documents run through the plugins.
    pub documents: usize,
    /// Per plugin: the time it took over the batch.
    pub timings: Vec<(String, std::time::Duration)>,
}

impl PluginBatch {
    /// Adds what the plugins made of later documents.
    pub fn absorb(&mut self, later: PluginBatch) {
        for (collection, rows) in later.outputs {
            self.outputs.entry(collection).or_default().extend(rows);
        }
        self.dead_letters.extend(later.dead_letters);
        self.state.extend(later.state);
        self.documents += later.documents;
        for (plugin, took) in later.timings {
            match self.timings.iter_mut().find(|(p, _)| *p == plugin) {
                Some((_, t)) => *t += took,
                None => self.timings.push((plugin, took)),
            }
        }
    }
}

/// The configured plugins, running.
pub struct PluginStage {
    chain: Chain,
    /// Changes before this position are in the restored state already.
    state_position: Option<Lsn>,
}

impl PluginStage {
    /// Loads and starts the plugins with their restored state (by plugin name).
    pub fn start(
        configs: &[PluginConfig],
        mut state: HashMap<String, HashMap<String, Vec<u8>>>,
        state_position: Option<Lsn>,
    ) -> Result<PluginStage, LoadError> {
        let mut stages = Vec::new();
        for c in configs {
            let name = c.name();
            let config = serde_json::to_value(&c.config).unwrap_or(Value::Null);
            let loaded = Arc::new(LoadedPlugin::load(
                &name,
                &c.path,
                &config,
                c.limits.clone(),
                cache::default_dir().as_deref(),
            )?);
            let restored = PluginState::from_committed(state.remove(&name).unwrap_or_default());
            stages.push(loaded.instantiate(restored)?);
        }
        Ok(PluginStage {
            chain: Chain::new(stages),
            state_position,
        })
    }

    /// Runs `docs` through the plugins. Documents a plugin rewrote for their own table
    /// are replaced in place. With `checkpoint`, the state changes are taken too (they
    /// are then written with the batch's position).
    pub fn run(&mut self, docs: &mut [ChangeDocument], checkpoint: bool) -> PluginBatch {
        let mut out = PluginBatch::default();
        let todo: Vec<usize> = (0..docs.len())
            .filter(|&i| self.state_position.is_none_or(|p| docs[i].source.lsn >= p))
            .collect();
        if !todo.is_empty() {
            let inputs: Vec<String> = todo.iter().map(|&i| docs[i].to_json()).collect();
            let tables: Vec<&str> = todo.iter().map(|&i| &*docs[i].source.table).collect();
            let result = self.chain.process(inputs, &tables);
            out.documents = todo.len();
            out.timings = result.timings;
            for (j, e) in result.emitted {
                let d = &docs[todo[j]];
                out.outputs
                    .entry(e.collection)
                    .or_default()
                    .push(OutputRow {
                        key: e.key,
                        document: e.document,
                        lsn: d.source.lsn,
                        ts_ms: d.source.ts_ms,
                    });
            }
            for (j, f) in result.failures {
                let d = &docs[todo[j]];
                out.dead_letters.push(DeadLetter {
                    plugin: f.plugin,
                    kind: f.kind.as_str().to_string(),
                    error: f.error,
                    lsn: d.source.lsn,
                    ts_ms: d.source.ts_ms,
                    source_table: format!("{}.{}", d.source.schema, d.source.table),
                    // As it came in: replacements are applied below.
                    document: d.to_json(),
                    snapshot: d.source.snapshot,
                });
            }
            for (j, text) in result.documents.iter().enumerate() {
                if result.replaced[j] {
                    replace_columns(&mut docs[todo[j]], text);
                }
            }
        }
        if checkpoint {
            out.state = self.chain.take_state_changes();
        }
        out
    }
}

impl PluginStage {
    /// The plugins' state changes since the last call.
    pub fn take_state_changes(&mut self) -> Vec<(String, StateChanges)> {
        self.chain.take_state_changes()
    }
}

/// Takes a rewritten document's columns (everything but `_meta`).
fn replace_columns(doc: &mut ChangeDocument, text: &str) {
    if let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) {
        doc.columns = obj
            .into_iter()
            .filter(|(k, _)| k != crate::document::META_FIELD)
            .map(|(k, v)| (Arc::from(k.as_str()), v))
            .collect();
    }
}
