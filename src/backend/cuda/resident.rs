//! Steering directions kept on the device across passes, so a steered decode step uploads no
//! vector: each `Steering`'s `[L+1, hidden]` table goes up once, the first time a pass uses it.
//!
//! Entries are keyed by the address of the table's `Arc` allocation and hold a `Weak` to it.
//! While that `Weak` lives the allocation is not freed, so no other table can appear at the same
//! address (no ABA), and its contents cannot change: `Arc::get_mut` refuses while a `Weak`
//! exists, and `Arc::make_mut` then moves the value to a new allocation, i.e. a new key.
//! Generic over the device buffer type so the keying is tested without a GPU.
use std::collections::HashMap;
use std::sync::{Arc, Weak};

/// Most tables kept. A live intervention is a handful of tables (the study's control shares one
/// `Arc` across coefficients); the cap only bounds device memory for long-running servers.
pub const MAX_RESIDENT_TABLES: usize = 64;

pub struct ResidentTables<V> {
    entries: HashMap<usize, Entry<V>>,
    clock: u64,
    max_entries: usize,
    uploads: u64,
}

struct Entry<V> {
    table: Weak<Vec<f32>>,
    value: Arc<V>,
    last_use: u64,
}

impl<V> ResidentTables<V> {
    pub fn new(max_entries: usize) -> Self {
        ResidentTables { entries: HashMap::new(), clock: 0, max_entries: max_entries.max(1), uploads: 0 }
    }

    /// The device copy of `table`, uploaded by `upload` on first use. The returned `Arc` keeps
    /// the copy alive for the pass that uses it even if the entry is evicted meanwhile.
    pub fn get_or_upload<E>(&mut self, table: &Arc<Vec<f32>>, upload: impl FnOnce(&[f32]) -> Result<V, E>) -> Result<Arc<V>, E> {
        self.clock += 1;
        let key = Arc::as_ptr(table) as usize;
        if let Some(e) = self.entries.get_mut(&key) {
            // Always true while we hold the Weak (see the module comment); checked all the same.
            if e.table.upgrade().is_some_and(|t| Arc::ptr_eq(&t, table)) {
                e.last_use = self.clock;
                return Ok(e.value.clone());
            }
        }
        // A miss: forget tables nobody holds any more, then the least recently used beyond the cap.
        self.entries.retain(|_, e| e.table.strong_count() > 0);
        while self.entries.len() >= self.max_entries {
            let Some(oldest) = self.entries.iter().min_by_key(|(_, e)| e.last_use).map(|(k, _)| *k) else { break };
            self.entries.remove(&oldest);
        }
        let value = Arc::new(upload(table)?);
        self.uploads += 1;
        self.entries.insert(key, Entry { table: Arc::downgrade(table), value: value.clone(), last_use: self.clock });
        Ok(value)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Uploads made so far (for tests and diagnostics).
    pub fn uploads(&self) -> u64 {
        self.uploads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up(t: &[f32]) -> Result<Vec<f32>, ()> {
        Ok(t.to_vec())
    }

    #[test]
    fn uploads_once_per_table_and_never_serves_a_stale_copy() {
        let mut c = ResidentTables::new(8);
        let a = Arc::new(vec![1.0f32, 2.0]);
        let first = c.get_or_upload(&a, up).unwrap();
        let again = c.get_or_upload(&a, up).unwrap();
        assert!(Arc::ptr_eq(&first, &again));
        assert_eq!(c.uploads(), 1);
        // A clone of the Arc is the same table.
        let a2 = a.clone();
        c.get_or_upload(&a2, up).unwrap();
        assert_eq!(c.uploads(), 1);

        // Drop the table and make many new ones of the same size: the allocator is free to
        // reuse addresses, but never the one our Weak still holds, so each is a new upload
        // with its own contents.
        drop((a, a2));
        for i in 0..32 {
            let b = Arc::new(vec![i as f32, -(i as f32)]);
            let got = c.get_or_upload(&b, up).unwrap();
            assert_eq!(*got, *b, "table {i}");
        }
        assert!(c.len() <= 8);

        // make_mut while we hold a Weak moves the value: the changed table is a new key.
        let mut m = Arc::new(vec![5.0f32, 6.0]);
        assert_eq!(*c.get_or_upload(&m, up).unwrap(), vec![5.0, 6.0]);
        Arc::make_mut(&mut m)[0] = 7.0;
        assert_eq!(*c.get_or_upload(&m, up).unwrap(), vec![7.0, 6.0]);
        // get_mut refuses while the cache holds a Weak, so contents cannot change in place.
        assert!(Arc::get_mut(&mut m).is_none());
    }

    #[test]
    fn evicts_dead_then_least_recently_used() {
        let mut c = ResidentTables::new(2);
        let (a, b, d) = (Arc::new(vec![1.0f32]), Arc::new(vec![2.0f32]), Arc::new(vec![3.0f32]));
        let held = c.get_or_upload(&a, up).unwrap();
        c.get_or_upload(&b, up).unwrap();
        c.get_or_upload(&a, up).unwrap(); // a is now the most recent
        c.get_or_upload(&d, up).unwrap(); // evicts b
        assert_eq!(c.len(), 2);
        assert_eq!(c.uploads(), 3);
        c.get_or_upload(&a, up).unwrap();
        assert_eq!(c.uploads(), 3, "a stayed");
        c.get_or_upload(&b, up).unwrap();
        assert_eq!(c.uploads(), 4, "b was evicted");
        // An evicted copy stays valid for whoever still holds it.
        assert_eq!(*held, vec![1.0]);
        // A failed upload leaves no entry.
        let e = Arc::new(vec![4.0f32]);
        assert!(c.get_or_upload(&e, |_| Err::<Vec<f32>, ()>(())).is_err());
        assert_eq!(c.uploads(), 4);
        drop((b, d));
        c.get_or_upload(&e, up).unwrap();
        assert!(c.len() <= 2);
    }
}
