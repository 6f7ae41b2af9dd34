//! The reflector side of the machine: a [`Store`] per watched prefix and the [`Reflector`]
//! that applies [`Event`]s to it by the module's rules (swap on `InitDone`, stale sweep,
//! changes only for changed bytes, last good value kept).
//!
//! A store maps the key relative to its prefix to the decoded value and a 128-bit digest of
//! the raw bytes. The digest tells a real change from a rewrite of the same value without
//! keeping the bytes: the raw value travels only in the emitted [`Change::Upsert`], for
//! consumers that mirror it. The digest is SHA-256 truncated to 128 bits, so a hostile
//! writer cannot craft a different value that looks unchanged. A B-tree instead of a hash
//! map saves about 60 bytes per entry (250k remote endpoints are the scale target) and keeps
//! keys in order; keys are inline [`SmolStr`]s (an IP, a node name or an identity fit in 23
//! bytes: no allocation per key). A list is collected in key order and bulk-built into the
//! new tree (inserting keys one by one leaves B-tree nodes about half full).

use std::collections::BTreeMap;
use std::sync::{PoisonError, RwLock};

use bytes::Bytes;
use clustermesh_types::model::SmolStr;

use super::{Event, Kv};

/// SHA-256 of a raw value, truncated to 128 bits.
pub type Digest = [u8; 16];

/// The digest a store keeps of a raw value.
pub fn digest(raw: &[u8]) -> Digest {
    let d = ring::digest::digest(&ring::digest::SHA256, raw);
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// One stored entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored<V> {
    /// [`digest`] of the raw bytes.
    pub digest: Digest,
    /// The decoded value.
    pub value: V,
}

/// What happened to a key.
#[derive(Debug, Clone, PartialEq)]
pub enum Change<V> {
    /// The key was created or its value changed. `raw` is the exact bytes (for mirroring);
    /// `value` is the decoded value.
    Upsert {
        /// Bytes as stored in etcd.
        raw: Bytes,
        /// The decoded value.
        value: V,
    },
    /// The key is gone (deleted, swept after a relist, drained or revoked).
    Delete {
        /// The last value that was applied, for consumers that must undo it.
        last: V,
    },
}

type Map<V> = BTreeMap<SmolStr, Stored<V>>;

/// The entries of one watched prefix, keyed relative to it; shared with readers.
#[derive(Debug)]
pub struct Store<V> {
    map: RwLock<Map<V>>,
}

impl<V> Default for Store<V> {
    fn default() -> Self {
        Self {
            map: RwLock::new(BTreeMap::new()),
        }
    }
}

impl<V: Clone> Store<V> {
    /// Entries.
    pub fn len(&self) -> usize {
        self.read(BTreeMap::len)
    }

    /// No entry.
    pub fn is_empty(&self) -> bool {
        self.read(BTreeMap::is_empty)
    }

    /// The entry under `key`.
    pub fn get(&self, key: &str) -> Option<Stored<V>> {
        self.read(|m| m.get(key).cloned())
    }

    /// The value under `key`.
    pub fn value(&self, key: &str) -> Option<V> {
        self.read(|m| m.get(key).map(|s| s.value.clone()))
    }

    /// Runs `f` on the entries, ordered by key, under the store's read lock.
    pub fn read<R>(&self, f: impl FnOnce(&BTreeMap<SmolStr, Stored<V>>) -> R) -> R {
        f(&self.map.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Removes every entry, returning (key, delete change) in key order.
    pub fn take_all(&self) -> Vec<(SmolStr, Change<V>)> {
        let map = std::mem::take(&mut *self.write());
        map.into_iter()
            .map(|(k, s)| (k, Change::Delete { last: s.value }))
            .collect()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Map<V>> {
        self.map.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What applying one event means for the consumer.
#[derive(Debug, Clone, PartialEq)]
pub enum Step<V> {
    /// Nothing to do: a listed key (its change comes with the end of the list), an
    /// unchanged value, a refused value, or the delete of an unknown key.
    Nothing,
    /// A key changed after the list.
    Changed(SmolStr, Change<V>),
    /// A (re)list is complete and swapped in: what changed since the store's previous
    /// content (upserts in key order, then deletes of the keys that vanished).
    Listed(Vec<(SmolStr, Change<V>)>),
}

/// Applies a [`Watcher`](super::Watcher)'s events to a [`Store`] (kube-rs's reflector
/// writer); see the [module docs](super) for the rules.
#[derive(Debug)]
pub struct Reflector<V> {
    /// The list being collected (between `Init` and `InitDone`).
    buffer: Option<Vec<(SmolStr, Stored<V>)>>,
    /// Upserts of the list being collected.
    listed: Vec<(SmolStr, Change<V>)>,
    refused: u64,
}

impl<V> Default for Reflector<V> {
    fn default() -> Self {
        Self {
            buffer: None,
            listed: Vec::new(),
            refused: 0,
        }
    }
}

impl<V: Clone> Reflector<V> {
    /// Values refused by the decoder so far.
    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// Applies `event` to `store`. `decode` is called only for bytes the store does not hold
    /// under that key already; `None` refuses the value (the decoder says why, to whom it
    /// concerns) and the last good one stays.
    pub fn apply(
        &mut self,
        store: &Store<V>,
        event: Event,
        decode: impl FnOnce(&str, &Bytes) -> Option<V>,
    ) -> Step<V> {
        match event {
            Event::Init => {
                self.buffer = Some(Vec::new());
                self.listed.clear();
                Step::Nothing
            }
            Event::InitApply(kv) => {
                let Some(buffer) = &mut self.buffer else {
                    // A watcher yields InitApply only after Init: treat it as a change.
                    return self.apply(store, Event::Apply(kv), decode);
                };
                let d = digest(&kv.value);
                let old = store.get(&kv.key);
                match old {
                    Some(old) if old.digest == d => buffer.push((kv.key, old)),
                    old => match decode(&kv.key, &kv.value) {
                        Some(value) => {
                            buffer.push((
                                kv.key.clone(),
                                Stored {
                                    digest: d,
                                    value: value.clone(),
                                },
                            ));
                            self.listed.push((
                                kv.key,
                                Change::Upsert {
                                    raw: kv.value,
                                    value,
                                },
                            ));
                        }
                        None => {
                            self.refused += 1;
                            if let Some(old) = old {
                                buffer.push((kv.key, old));
                            }
                        }
                    },
                }
                Step::Nothing
            }
            Event::InitDone => {
                let listed: Map<V> = self.buffer.take().unwrap_or_default().into_iter().collect();
                let mut changes = std::mem::take(&mut self.listed);
                let old = std::mem::replace(&mut *store.write(), listed);
                // The stale sweep: what the store held that the list lacks.
                let before = changes.len();
                store.read(|new| {
                    for (key, s) in old {
                        if !new.contains_key(&key) {
                            changes.push((key, Change::Delete { last: s.value }));
                        }
                    }
                });
                tracing::trace!(
                    upserts = before,
                    deletes = changes.len() - before,
                    "list applied"
                );
                Step::Listed(changes)
            }
            Event::Apply(Kv { key, value: raw }) => {
                let d = digest(&raw);
                if store.read(|m| m.get(&key).is_some_and(|s| s.digest == d)) {
                    return Step::Nothing;
                }
                let Some(value) = decode(&key, &raw) else {
                    self.refused += 1;
                    return Step::Nothing;
                };
                store.write().insert(
                    key.clone(),
                    Stored {
                        digest: d,
                        value: value.clone(),
                    },
                );
                Step::Changed(key, Change::Upsert { raw, value })
            }
            Event::Delete(key) => match store.write().remove(&key) {
                Some(s) => Step::Changed(key, Change::Delete { last: s.value }),
                None => Step::Nothing,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes a value as a number; anything else is refused.
    fn num(_: &str, raw: &Bytes) -> Option<u32> {
        std::str::from_utf8(raw).ok()?.parse().ok()
    }

    fn kv(key: &str, value: &str) -> Kv {
        Kv {
            key: key.into(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        }
    }

    /// Runs a whole list through the reflector.
    fn list(r: &mut Reflector<u32>, s: &Store<u32>, kvs: &[(&str, &str)]) -> Step<u32> {
        assert_eq!(r.apply(s, Event::Init, num), Step::Nothing);
        for (k, v) in kvs {
            assert_eq!(r.apply(s, Event::InitApply(kv(k, v)), num), Step::Nothing);
        }
        r.apply(s, Event::InitDone, num)
    }

    fn upsert(key: &str, raw: &str, value: u32) -> (SmolStr, Change<u32>) {
        (
            key.into(),
            Change::Upsert {
                raw: Bytes::copy_from_slice(raw.as_bytes()),
                value,
            },
        )
    }

    fn delete(key: &str, last: u32) -> (SmolStr, Change<u32>) {
        (key.into(), Change::Delete { last })
    }

    #[test]
    fn the_store_swaps_in_on_init_done() {
        let (mut r, s) = (Reflector::default(), Store::default());
        assert_eq!(r.apply(&s, Event::Init, num), Step::Nothing);
        r.apply(&s, Event::InitApply(kv("a", "1")), num);
        r.apply(&s, Event::InitApply(kv("b", "2")), num);
        assert!(s.is_empty(), "a half-done list is not visible");
        assert_eq!(
            r.apply(&s, Event::InitDone, num),
            Step::Listed(vec![upsert("a", "1", 1), upsert("b", "2", 2)])
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s.value("b"), Some(2));

        // A relist: the old content stays visible until it is complete.
        r.apply(&s, Event::Init, num);
        r.apply(&s, Event::InitApply(kv("b", "20")), num);
        assert_eq!(s.value("a"), Some(1));
        assert_eq!(s.value("b"), Some(2));
        assert_eq!(
            r.apply(&s, Event::InitDone, num),
            Step::Listed(vec![upsert("b", "20", 20), delete("a", 1)])
        );
        assert_eq!(s.value("b"), Some(20));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn a_relist_after_compaction_deletes_what_vanished_and_nothing_else() {
        let (mut r, s) = (Reflector::default(), Store::default());
        list(&mut r, &s, &[("a", "1"), ("b", "2"), ("c", "3")]);
        // Watched changes, then the watch's start revision is compacted away and the
        // machine relists: "b" was deleted and "d" created in the gap.
        assert_eq!(
            r.apply(&s, Event::Apply(kv("c", "30")), num),
            Step::Changed(upsert("c", "30", 30).0, upsert("c", "30", 30).1)
        );
        assert_eq!(
            list(&mut r, &s, &[("a", "1"), ("c", "30"), ("d", "4")]),
            Step::Listed(vec![upsert("d", "4", 4), delete("b", 2)]),
            "unchanged keys produce no change"
        );
        // The same list again: nothing at all.
        assert_eq!(
            list(&mut r, &s, &[("a", "1"), ("c", "30"), ("d", "4")]),
            Step::Listed(Vec::new())
        );
        let keys: Vec<SmolStr> = s.read(|m| m.keys().cloned().collect());
        assert_eq!(keys, ["a", "c", "d"]);
    }

    #[test]
    fn a_bad_value_keeps_the_last_good_one_and_is_counted() {
        let (mut r, s) = (Reflector::default(), Store::default());
        list(&mut r, &s, &[("a", "1")]);
        // Watched: a bad update of a good key, and a bad new key.
        assert_eq!(r.apply(&s, Event::Apply(kv("a", "x")), num), Step::Nothing);
        assert_eq!(r.apply(&s, Event::Apply(kv("n", "y")), num), Step::Nothing);
        assert_eq!(s.value("a"), Some(1));
        assert_eq!(s.get("n"), None);
        assert_eq!(r.refused(), 2);
        // Listed: the bad value is still there; the good one stays, nothing is swept.
        assert_eq!(
            list(&mut r, &s, &[("a", "x"), ("n", "y")]),
            Step::Listed(Vec::new())
        );
        assert_eq!(s.value("a"), Some(1));
        assert_eq!(s.get("n"), None);
        assert_eq!(r.refused(), 4);
        // A good value again is a change; a delete removes it.
        assert_eq!(
            r.apply(&s, Event::Apply(kv("a", "5")), num),
            Step::Changed(upsert("a", "5", 5).0, upsert("a", "5", 5).1)
        );
        assert_eq!(
            r.apply(&s, Event::Delete("a".into()), num),
            Step::Changed(delete("a", 5).0, delete("a", 5).1)
        );
        assert_eq!(r.apply(&s, Event::Delete("a".into()), num), Step::Nothing);
    }

    #[test]
    fn unchanged_bytes_are_not_decoded_again() {
        let (mut r, s) = (Reflector::default(), Store::default());
        list(&mut r, &s, &[("a", "1")]);
        let refuse = |_: &str, _: &Bytes| -> Option<u32> { panic!("decoded again") };
        assert_eq!(
            r.apply(&s, Event::Apply(kv("a", "1")), refuse),
            Step::Nothing
        );
        r.apply(&s, Event::Init, refuse);
        r.apply(&s, Event::InitApply(kv("a", "1")), refuse);
        assert_eq!(
            r.apply(&s, Event::InitDone, refuse),
            Step::Listed(Vec::new())
        );
        assert_eq!(
            s.take_all(),
            vec![delete("a", 1)],
            "take_all empties the store"
        );
        assert!(s.is_empty());
    }
}
