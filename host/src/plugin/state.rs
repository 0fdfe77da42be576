//! A plugin's key-value state: writes made during a call become visible to later calls
//! only when the call succeeds, so a trapped batch leaves no trace and its replay (one
//! document at a time) computes the same thing.

use std::collections::{HashMap, HashSet};

/// Keys committed since a checkpoint, with their new values (`None`: deleted).
pub type StateChanges = HashMap<String, Option<Vec<u8>>>;

/// The hasher of the state's maps: a plugin makes a few state calls per document, each a
/// lookup or an insert here, and SipHash (std's default) was ~10% of a plugin call's host
/// time; foldhash is as resistant to chosen keys (random seeds) and several times faster.
type Hasher = foldhash::fast::RandomState;

/// Committed values plus the writes of the call in progress.
#[derive(Debug, Default, Clone)]
pub struct PluginState {
    committed: HashMap<String, Vec<u8>, Hasher>,
    /// `None` marks a delete.
    pending: HashMap<String, Option<Vec<u8>>, Hasher>,
    /// Keys committed since the last [`PluginState::take_changes`], for checkpointing only
    /// what changed (their values are read from `committed` then).
    changed: HashSet<String, Hasher>,
}

impl PluginState {
    /// Reads a key as the running call sees it.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.pending.get(key) {
            Some(v) => v.clone(),
            None => self.committed.get(key).cloned(),
        }
    }

    /// Writes a key (pending until [`PluginState::commit`]).
    pub fn set(&mut self, key: String, value: Vec<u8>) {
        self.pending.insert(key, Some(value));
    }

    /// Deletes a key (pending until [`PluginState::commit`]).
    pub fn delete(&mut self, key: String) {
        self.pending.insert(key, None);
    }

    /// A state holding `committed` (restored from a checkpoint).
    pub fn from_committed(committed: HashMap<String, Vec<u8>>) -> PluginState {
        PluginState {
            committed: committed.into_iter().collect(),
            ..PluginState::default()
        }
    }

    /// The keys committed since the last call, with their values (`None`: deleted).
    pub fn take_changes(&mut self) -> StateChanges {
        let committed = &self.committed;
        self.changed
            .drain()
            .map(|key| {
                let value = committed.get(&key).cloned();
                (key, value)
            })
            .collect()
    }

    /// Makes the pending writes permanent.
    pub fn commit(&mut self) {
        for (key, value) in self.pending.drain() {
            if !self.changed.contains(&key) {
                self.changed.insert(key.clone());
            }
            match value {
                Some(v) => {
                    self.committed.insert(key, v);
                }
                None => {
                    self.committed.remove(&key);
                }
            }
        }
    }

    /// Forgets the pending writes.
    pub fn rollback(&mut self) {
        self.pending.clear();
    }

    /// Number of committed keys.
    pub fn len(&self) -> usize {
        self.committed.len()
    }

    /// Whether nothing is committed.
    pub fn is_empty(&self) -> bool {
        self.committed.is_empty()
    }

    /// Total bytes of committed keys and values.
    pub fn bytes(&self) -> usize {
        self.committed.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_what_was_committed_since_the_last_look() {
        let mut s = PluginState::default();
        s.set("a".into(), vec![1]);
        s.set("b".into(), vec![2]);
        s.commit();
        s.set("c".into(), vec![3]);
        s.rollback();
        let first = s.take_changes();
        assert_eq!(first.len(), 2);
        assert_eq!(first["a"], Some(vec![1]));
        s.delete("a".into());
        s.commit();
        let second = s.take_changes();
        assert_eq!(second.len(), 1);
        assert_eq!(second["a"], None);
        assert!(s.take_changes().is_empty());
        let restored = PluginState::from_committed([("b".to_string(), vec![2])].into());
        assert_eq!(restored.get("b"), Some(vec![2]));
    }

    #[test]
    fn rollback_forgets_and_commit_keeps() {
        let mut s = PluginState::default();
        s.set("a".into(), vec![1]);
        s.commit();
        s.set("a".into(), vec![2]);
        s.delete("b".into());
        assert_eq!(s.get("a"), Some(vec![2]));
        s.rollback();
        assert_eq!(s.get("a"), Some(vec![1]));
        s.delete("a".into());
        assert_eq!(s.get("a"), None);
        s.commit();
        assert!(s.is_empty());
    }
}
