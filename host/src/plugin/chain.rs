//! Plugins in configured order.
//!
//! Each document goes through every plugin. An output addressed to the document's own
//! table (collection `transactions` for a row of `public.transactions`) replaces the
//! document for the next plugins and, in the end, for the replica; outputs to other
//! collections are collected for their tables. A plugin that fails on a document does not
//! stop it: the failure is recorded (for the dead-letter table) and the document goes on
//! unchanged.

use super::{Emitted, Failure, PluginInstance, source_field};

/// What a chain makes of a batch.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Per input document, what continues to its table (the input, or what replaced it).
    pub documents: Vec<String>,
    /// Outputs to other collections, with the index of the input they came from.
    pub emitted: Vec<(usize, Emitted)>,
    /// Failures, with the index of the input document.
    pub failures: Vec<(usize, Failure)>,
    /// Per plugin, in order: its name and the time it took over the batch.
    pub timings: Vec<(String, std::time::Duration)>,
}

/// Plugin instances in order.
pub struct Chain {
    stages: Vec<PluginInstance>,
}

impl Chain {
    /// A chain of instances, first to last.
    pub fn new(stages: Vec<PluginInstance>) -> Chain {
        Chain { stages }
    }

    /// The instances.
    pub fn stages(&self) -> &[PluginInstance] {
        &self.stages
    }

    /// Each plugin's state changes since the last call.
    pub fn take_state_changes(&mut self) -> Vec<(String, super::StateChanges)> {
        self.stages
            .iter_mut()
            .map(|s| (s.name().to_string(), s.take_state_changes()))
            .collect()
    }

    /// Runs a batch of documents (JSON) through every plugin.
    pub fn process(&mut self, documents: Vec<String>) -> ChainOutput {
        let tables: Vec<Option<String>> =
            documents.iter().map(|d| source_field(d, "table")).collect();
        let mut out = ChainOutput {
            documents,
            ..ChainOutput::default()
        };
        for stage in &mut self.stages {
            let started = std::time::Instant::now();
            let outcomes = stage.process(&out.documents);
            out.timings
                .push((stage.name().to_string(), started.elapsed()));
            for (i, outcome) in outcomes.into_iter().enumerate() {
                match outcome {
                    Err(failure) => out.failures.push((i, failure)),
                    Ok(emitted) => {
                        for e in emitted {
                            if tables[i].as_deref() == Some(e.collection.as_str()) {
                                out.documents[i] = e.document.to_string();
                            } else {
                                out.emitted.push((i, e));
                            }
                        }
                    }
                }
            }
        }
        out
    }
}
