//! Holds ipcache entries back until the agent knows their identity.
//!
//! Etcd gives no order between `cilium/state/ip/v1/` and `cilium/state/identities/v1/`
//! (nor between a remote's caches): an endpoint can arrive before its identity. Programmed
//! at once, its address would resolve to an identity no selector has matched yet, so the
//! policy would drop its traffic as if it came from (or went to) `world` — Cilium's
//! "late identity" drops. The gate passes an entry on only when its identity's labels are
//! known (reserved identities always are), and releases held entries the moment the
//! identity arrives, after the policy engine has seen it: the caller feeds the identity to
//! the [`Engine`](super::Engine) first, flushes the policy diff, then hands the released
//! entries to the reconciler.
//!
//! An identity deleted later does not retract entries already passed: the endpoint is still
//! there, and its own deletion follows.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use clustermesh_types::model::Cidr;

use crate::input::Input;

/// Identities below this are reserved (Cilium's `MinimalNumericIdentity`): always known.
pub const MIN_ALLOCATED_IDENTITY: u32 = 256;

/// See the module docs.
#[derive(Default)]
pub struct Gate {
    known: HashSet<u32>,
    /// Held upserts: identity → (cluster, prefix) → input.
    held: HashMap<u32, HashMap<(Arc<str>, Cidr), Input>>,
    /// (cluster, prefix) → the identity it waits for.
    waiting: HashMap<(Arc<str>, Cidr), u32>,
}

impl Gate {
    /// An empty gate (only reserved identities known).
    pub fn new() -> Self {
        Self::default()
    }

    /// Entries held now.
    pub fn held(&self) -> usize {
        self.waiting.len()
    }

    /// Whether identity `id` is known.
    pub fn knows(&self, id: u32) -> bool {
        id < MIN_ALLOCATED_IDENTITY || self.known.contains(&id)
    }

    /// Passes `input` on, or holds it (an endpoint upsert whose identity is unknown). A
    /// newer input for a held prefix replaces it; a delete drops it (and is passed on,
    /// which is harmless if the entry never reached the maps).
    pub fn admit(&mut self, input: Input) -> Option<Input> {
        let Input::Endpoint {
            cluster,
            prefix,
            entry,
        } = &input
        else {
            return Some(input);
        };
        let k = (cluster.clone(), *prefix);
        if let Some(old) = self.waiting.remove(&k) {
            if let Some(h) = self.held.get_mut(&old) {
                h.remove(&k);
                if h.is_empty() {
                    self.held.remove(&old);
                }
            }
        }
        match entry {
            Some(p) if !self.knows(p.id) => {
                self.waiting.insert(k.clone(), p.id);
                self.held.entry(p.id).or_default().insert(k, input);
                None
            }
            _ => Some(input),
        }
    }

    /// Identity `id` is now known: the entries that waited for it.
    pub fn identity_added(&mut self, id: u32) -> Vec<Input> {
        self.known.insert(id);
        let Some(h) = self.held.remove(&id) else {
            return Vec::new();
        };
        for k in h.keys() {
            self.waiting.remove(k);
        }
        h.into_values().collect()
    }

    /// Identity `id` was deleted: later entries with it are held again.
    pub fn identity_removed(&mut self, id: u32) {
        self.known.remove(&id);
    }
}
