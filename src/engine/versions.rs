//! The engine's cache of stored workflow versions that are not in the loaded
//! set (compiled from the database for runs that matched them): bounded, the
//! least recently used definition is dropped first, so a long-lived worker
//! that meets many old versions keeps at most [`CAPACITY`] of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::workflow::Workflow;

/// How many compiled versions the cache keeps.
pub const CAPACITY: usize = 256;

/// Compiled versions by hash, least recently used dropped first.
pub struct VersionCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tick: u64,
    /// hash → (definition, tick of its last use)
    entries: HashMap<String, (Arc<Workflow>, u64)>,
}

impl Default for VersionCache {
    fn default() -> Self {
        Self::new(CAPACITY)
    }
}

impl VersionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn get(&self, hash: &str) -> Option<Arc<Workflow>> {
        let mut inner = self.inner.lock().expect("version cache lock");
        inner.tick += 1;
        let tick = inner.tick;
        inner.entries.get_mut(hash).map(|(wf, used)| {
            *used = tick;
            wf.clone()
        })
    }

    /// Keeps `wf` under `hash`, dropping the least recently used entry when full.
    pub fn insert(&self, hash: &str, wf: Arc<Workflow>) {
        let mut inner = self.inner.lock().expect("version cache lock");
        inner.tick += 1;
        let tick = inner.tick;
        if !inner.entries.contains_key(hash) && inner.entries.len() >= self.capacity {
            // O(capacity), but only when a version not seen lately is compiled.
            if let Some(oldest) = inner
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(h, _)| h.clone())
            {
                inner.entries.remove(&oldest);
            }
        }
        inner.entries.insert(hash.to_owned(), (wf, tick));
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("version cache lock").entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(name: &str) -> Arc<Workflow> {
        let text = format!(
            "name: {name}\non: {{ event: conversation.ended }}\nsteps:\n  - id: s\n    http: {{ url: \"http://127.0.0.1:1/\" }}\n"
        );
        let (wf, _) = crate::workflow::compile::compile(std::path::Path::new("w.yaml"), &text)
            .expect("compiles");
        Arc::new(wf)
    }

    #[test]
    fn keeps_at_most_capacity_and_drops_the_least_recently_used() {
        let cache = VersionCache::new(2);
        cache.insert("h1", wf("one"));
        cache.insert("h2", wf("two"));
        assert!(cache.get("h1").is_some()); // h2 is now the least recently used
        cache.insert("h3", wf("three"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("h2").is_none(), "the least recently used went");
        assert_eq!(cache.get("h1").unwrap().name, "one");
        assert_eq!(cache.get("h3").unwrap().name, "three");
        // Inserting a hash already there evicts nothing.
        cache.insert("h3", wf("three"));
        assert_eq!(cache.len(), 2);
        assert!(cache.get("h1").is_some());
    }
}
