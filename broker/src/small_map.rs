//! A map for the many maps that hold one or two entries: the subscription tree's children
//! and subscriber sets (`topic.rs`). A `HashMap` keeps room for at least 3 entries, with
//! their control bytes, as soon as it holds one: a device subscribed to its own
//! `devices/<id>/cmd` paid for two such maps (issue 14: what an idle client costs). Up to
//! [`FEW`] entries live in a vector sized exactly to them and are found by a linear scan
//! (a handful of comparisons, no hashing); past that, a boxed `HashMap`.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

/// Entries kept in the vector before the map becomes a `HashMap`.
const FEW: usize = 8;

pub(crate) enum SmallMap<K, V> {
    Few(Vec<(K, V)>),
    Many(Box<HashMap<K, V>>),
}

impl<K: Clone, V: Clone> Clone for SmallMap<K, V> {
    fn clone(&self) -> Self {
        match self {
            SmallMap::Few(entries) => SmallMap::Few(entries.clone()),
            SmallMap::Many(map) => SmallMap::Many(map.clone()),
        }
    }
}

impl<K: Hash + Eq, V> FromIterator<(K, V)> for SmallMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(entries: I) -> Self {
        let mut map = SmallMap::default();
        for (k, v) in entries {
            map.insert(k, v);
        }
        map
    }
}

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap::Few(Vec::new())
    }
}

impl<K: Hash + Eq, V> SmallMap<K, V> {
    pub(crate) fn len(&self) -> usize {
        match self {
            SmallMap::Few(entries) => entries.len(),
            SmallMap::Many(map) => map.len(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.iter().map(|(k, _)| k)
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(entries) => entries
                .iter()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            SmallMap::Many(map) => map.get(key),
        }
    }

    pub(crate) fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(entries) => entries
                .iter_mut()
                .find(|(k, _)| k.borrow() == key)
                .map(|(_, v)| v),
            SmallMap::Many(map) => map.get_mut(key),
        }
    }

    /// Inserts or replaces; the value it replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(old) = self.get_mut(&key) {
            return Some(std::mem::replace(old, value));
        }
        self.push_new(key, value);
        None
    }

    /// The value under `key`, made with `V::default()` if there was none.
    pub(crate) fn get_or_default<Q>(&mut self, key: &Q) -> &mut V
    where
        K: Borrow<Q> + for<'a> From<&'a Q>,
        Q: Hash + Eq + ?Sized,
        V: Default,
    {
        // Looked up twice when the key is new: the borrow checker does not let a miss fall
        // through from a first `get_mut` (the tree is written far less than it is read).
        if self.get(key).is_none() {
            self.push_new(K::from(key), V::default());
        }
        self.get_mut(key).expect("just inserted")
    }

    pub(crate) fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self {
            SmallMap::Few(entries) => {
                let at = entries.iter().position(|(k, _)| k.borrow() == key)?;
                let (_, value) = entries.swap_remove(at);
                if entries.is_empty() {
                    *entries = Vec::new();
                }
                Some(value)
            }
            SmallMap::Many(map) => map.remove(key),
        }
    }

    pub(crate) fn iter(&self) -> Iter<'_, K, V> {
        match self {
            SmallMap::Few(entries) => Iter::Few(entries.iter()),
            SmallMap::Many(map) => Iter::Many(map.iter()),
        }
    }

    /// A key known to be absent.
    fn push_new(&mut self, key: K, value: V) {
        match self {
            SmallMap::Few(entries) if entries.len() < FEW => {
                // Exactly one more slot: `push` would double (at least 4 slots).
                entries.reserve_exact(1);
                entries.push((key, value));
            }
            SmallMap::Few(entries) => {
                let mut map: HashMap<K, V> = std::mem::take(entries).into_iter().collect();
                map.insert(key, value);
                *self = SmallMap::Many(Box::new(map));
            }
            SmallMap::Many(map) => {
                map.insert(key, value);
            }
        }
    }
}

/// The entries of a [`SmallMap`], in no particular order.
pub(crate) enum Iter<'a, K, V> {
    Few(std::slice::Iter<'a, (K, V)>),
    Many(std::collections::hash_map::Iter<'a, K, V>),
}

impl<'a, K, V> Iterator for Iter<'a, K, V> {
    type Item = (&'a K, &'a V);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            Iter::Few(entries) => entries.next().map(|(k, v)| (k, v)),
            Iter::Many(map) => map.next(),
        }
    }
}

impl<'a, K: Hash + Eq, V> IntoIterator for &'a SmallMap<K, V> {
    type Item = (&'a K, &'a V);
    type IntoIter = Iter<'a, K, V>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn behaves_like_a_hash_map_below_and_above_few() {
        let mut small: SmallMap<Box<str>, usize> = SmallMap::default();
        let mut reference: HashMap<Box<str>, usize> = HashMap::new();
        // Grows past FEW, shrinks back, replaces: every step compared with a HashMap.
        let steps: Vec<(bool, usize)> = (0..40)
            .map(|i| (true, i % 13))
            .chain((0..40).map(|i| (false, (i * 7) % 13)))
            .chain((0..10).map(|i| (true, i)))
            .collect();
        for (n, (insert, k)) in steps.into_iter().enumerate() {
            let key: Box<str> = k.to_string().into();
            if insert {
                assert_eq!(small.insert(key.clone(), n), reference.insert(key, n));
            } else {
                assert_eq!(small.remove(&*key), reference.remove(&*key));
            }
            assert_eq!(small.len(), reference.len());
            assert_eq!(small.is_empty(), reference.is_empty());
            for k in 0..13 {
                let key = k.to_string();
                assert_eq!(small.get(key.as_str()), reference.get(key.as_str()));
            }
            let mut seen: Vec<(Box<str>, usize)> =
                small.iter().map(|(k, v)| (k.clone(), *v)).collect();
            let mut want: Vec<(Box<str>, usize)> =
                reference.iter().map(|(k, v)| (k.clone(), *v)).collect();
            seen.sort();
            want.sort();
            assert_eq!(seen, want);
        }
    }

    #[test]
    fn a_few_entries_take_exactly_their_room() {
        let mut small: SmallMap<Box<str>, u64> = SmallMap::default();
        *small.get_or_default("cmd") += 1;
        *small.get_or_default("cmd") += 1;
        assert_eq!(small.get("cmd"), Some(&2));
        match &small {
            SmallMap::Few(entries) => assert_eq!(entries.capacity(), 1),
            SmallMap::Many(_) => panic!("one entry in a HashMap"),
        }
        for k in 0..FEW {
            small.insert(k.to_string().into(), 0);
        }
        assert!(matches!(small, SmallMap::Many(_)), "past FEW: a HashMap");
        assert_eq!(small.len(), FEW + 1);
        // The map's own size: a vector's, so a node of the tree does not grow either.
        assert_eq!(
            std::mem::size_of::<SmallMap<Box<str>, u64>>(),
            std::mem::size_of::<Vec<(Box<str>, u64)>>()
        );
    }
}
