//! A plugin's key-value state: writes made during a call become visible to later calls
//! only when the call succeeds, so a trapped batch leaves no trace and its replay (one
//! document at a time) computes the same thing.

use std::collections::HashMap;

/// Committed values plus the writes of the call in progress.
#[derive(Debug, Default, Clone)]
pub struct PluginState {
    committed: HashMap<String, Vec<u8>>,
    /// `None` marks a delete.
    pending: HashMap<String, Option<Vec<u8>>>,
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

    /// Makes the pending writes permanent.
    pub fn commit(&mut self) {
        for (key, value) in std::mem::take(&mut self.pending) {
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
