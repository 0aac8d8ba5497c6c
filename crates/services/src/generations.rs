//! A bounded map that forgets what was used longest ago, in halves: new entries go to
//! the young generation; when it holds half the capacity it becomes the old one and the
//! old one is dropped, and an entry used again from the old generation moves back to
//! the young one. Emptying the whole map when full, as the caches did before, also
//! forgot the streams in the middle of their course, whose next messages then each
//! read their stream from the log.
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

pub(crate) struct Generations<V, K = String> {
    young: HashMap<K, V>,
    old: HashMap<K, V>,
    half: usize,
}

impl<V, K: Hash + Eq> Generations<V, K> {
    /// A map of at most `capacity` entries (at least 2).
    pub(crate) fn new(capacity: usize) -> Generations<V, K> {
        Generations {
            young: HashMap::new(),
            old: HashMap::new(),
            half: (capacity / 2).max(1),
        }
    }

    /// The entry of `key`, which counts as a use.
    pub(crate) fn get<Q>(&mut self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        if !self.young.contains_key(key) {
            let (key, value) = self.old.remove_entry(key)?;
            self.insert_young(key, value);
        }
        self.young.get(key)
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.young.contains_key(key) || self.old.contains_key(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) {
        self.old.remove(&key);
        self.insert_young(key, value);
    }

    fn insert_young(&mut self, key: K, value: V) {
        if self.young.len() >= self.half && !self.young.contains_key(&key) {
            self.old = std::mem::take(&mut self.young);
        }
        self.young.insert(key, value);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.young.len() + self.old.len()
    }
}

#[cfg(test)]
mod tests {
    use super::Generations;

    fn filled(keys: &[&str]) -> Generations<usize> {
        let mut map = Generations::new(4);
        for (i, key) in keys.iter().enumerate() {
            map.insert((*key).to_owned(), i);
        }
        map
    }

    #[test]
    fn a_full_map_forgets_the_entries_used_longest_ago_not_all_of_them() {
        let mut map = filled(&["a", "b", "c", "d"]);
        assert_eq!(map.get("a"), Some(&0));
        map.insert("e".to_owned(), 4);
        for kept in ["a", "c", "d", "e"] {
            assert!(map.contains_key(kept), "{kept} was forgotten");
        }
        assert!(!map.contains_key("b"), "b was used longest ago");
    }

    #[test]
    fn it_never_holds_more_than_its_capacity() {
        let mut map = Generations::new(4);
        for i in 0..100 {
            map.insert(format!("k{i}"), i);
            let _ = map.get("k0");
            assert!(map.len() <= 4, "{} entries", map.len());
        }
        assert_eq!(map.get("k99"), Some(&99));
    }

    #[test]
    fn inserting_a_key_again_replaces_its_value() {
        let mut map = filled(&["a", "b", "c"]);
        map.insert("a".to_owned(), 10);
        assert_eq!(map.get("a"), Some(&10));
        assert_eq!(map.len(), 3);
    }
}
