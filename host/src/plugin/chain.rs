//! Plugins in configured order.
//!
//! Each document goes through every plugin. An output addressed to the document's own
//! table (collection `transactions` for a row of `public.transactions`) replaces the
//! document for the next plugins and, in the end, for the replica; outputs to other
//! collections are collected for their tables. A plugin that fails on a document does not
//! stop it: the failure is recorded (for the dead-letter table) and the document goes on
//! unchanged.

use super::{Emitted, Failure, PluginInstance};

/// What a chain makes of a batch.
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Per input document, what continues to its table (the input, or what replaced it).
    pub documents: Vec<String>,
    /// Per input document, whether a plugin replaced it.
    pub replaced: Vec<bool>,
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

    /// Runs a batch of documents (JSON) through every plugin; `tables[i]` is the source
    /// table of `documents[i]` (an output to that collection replaces the document).
    pub fn process<T: AsRef<str>>(&mut self, documents: Vec<String>, tables: &[T]) -> ChainOutput {
        debug_assert_eq!(documents.len(), tables.len());
        let mut out = ChainOutput {
            replaced: vec![false; documents.len()],
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
                            if tables[i].as_ref() == e.collection {
                                out.documents[i] = e.document.into_text();
                                out.replaced[i] = true;
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
