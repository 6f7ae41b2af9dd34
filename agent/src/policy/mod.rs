//! Identity-aware L3/L4 policy: from exported policies and identities' label sets to the
//! datapath's policy map entries, incrementally.
//!
//! [`Engine`] keeps a selector cache (every distinct [`Selector`] with the set of identities
//! it matches) and, per allow rule, contributes `(subject identity, peer identity,
//! direction, protocol, port)` entries with a reference count. An identity that appears or
//! disappears touches only the selectors it matches and the rules using them; a policy
//! change touches only its own rules. [`Engine::take_changes`] returns the map diff since
//! the last call. Policy is per *subject identity* (as in Cilium: endpoints with the same
//! labels share one policy), so the datapath looks up the local endpoint's identity.
//!
//! Semantics: an identity is allow-all in a direction until some policy selects it in that
//! direction ([`Changes::enforce`]), then only the entries allow. Peer identity 0, protocol
//! 0 and port 0 are wildcards in the map.
//!
//! [`gate::Gate`] holds ipcache entries back until their identity is known (see there).
//!
//! It must not touch etcd; only [`hook`] (the agent loop's side) writes the maps.

pub mod gate;
pub mod hook;
pub mod maps;
pub mod parse;
pub mod selector;

use std::collections::{BTreeSet, HashMap, HashSet};

use clustermesh_types::identity::{Label, LabelArray, CLUSTER_LABEL};

pub use parse::{Parsed, Peer, PortProto, Rule, Scope};
pub use selector::Selector;

/// Errors of the policy module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A policy could not be parsed.
    #[error("policy {policy}: {reason}")]
    Parse {
        /// `kind/namespace/name`.
        policy: String,
        /// What is wrong.
        reason: String,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Traffic direction, as seen from the subject endpoint (values are the ABI's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Peer → subject.
    Ingress = 0,
    /// Subject → peer.
    Egress = 1,
}

impl Direction {
    /// Bit in the enforcement flags ([`clustermesh_ebpf_abi::policy_flags`]).
    pub const fn flag(self) -> u32 {
        1 << self as u32
    }
}

/// Settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// This cluster's name.
    pub local_cluster: String,
    /// A peer selector without `io.cilium.k8s.policy.cluster` matches the local cluster
    /// only (Cilium's `policy-default-local-cluster`, default on since 1.19).
    pub default_local_cluster: bool,
}

/// One allowed `(subject, peer, direction, protocol, port)`; 0 = wildcard for peer,
/// protocol and port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Entry {
    /// Local endpoint's identity.
    pub subject: u32,
    /// Peer identity (0 = any).
    pub peer: u32,
    /// Direction.
    pub direction: Direction,
    /// IP protocol (0 = any).
    pub proto: u8,
    /// Destination port, host order (0 = any).
    pub port: u16,
}

/// The map diff since the last [`Engine::take_changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Entries to insert.
    pub upsert: Vec<Entry>,
    /// Entries to delete.
    pub delete: Vec<Entry>,
    /// `(subject, flags)`: new enforcement flags per identity; 0 = remove.
    pub enforce: Vec<(u32, u32)>,
}

impl Changes {
    /// Nothing to do.
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty() && self.enforce.is_empty()
    }
}

type SelId = u64;

struct SelSlot {
    sel: Selector,
    matches: BTreeSet<u32>,
    refs: usize,
}

struct RuleSlot {
    subject: SelId,
    direction: Direction,
    /// `None` = any peer.
    peer: Option<SelId>,
    ports: Vec<PortProto>,
}

#[derive(Default)]
struct PolicySlot {
    rules: Vec<u64>,
    enforce: Vec<(SelId, Direction)>,
}

/// The policy engine; see the module docs.
pub struct Engine {
    config: Config,
    identities: HashMap<u32, LabelArray>,
    next: u64,
    sel_ids: HashMap<Selector, SelId>,
    sels: HashMap<SelId, SelSlot>,
    rules: HashMap<u64, RuleSlot>,
    rules_by_sel: HashMap<SelId, Vec<u64>>,
    enforce_by_sel: HashMap<SelId, Vec<Direction>>,
    policies: HashMap<String, PolicySlot>,
    entries: HashMap<Entry, u32>,
    enforce: HashMap<(u32, Direction), u32>,
    dirty: HashSet<Entry>,
    dirty_subjects: HashSet<u32>,
    ignored: u64,
}

const ANY_PORT: [PortProto; 1] = [PortProto { proto: 0, port: 0 }];

impl Engine {
    /// An engine with no identities and no policies.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            identities: HashMap::new(),
            next: 1,
            sel_ids: HashMap::new(),
            sels: HashMap::new(),
            rules: HashMap::new(),
            rules_by_sel: HashMap::new(),
            enforce_by_sel: HashMap::new(),
            policies: HashMap::new(),
            entries: HashMap::new(),
            enforce: HashMap::new(),
            dirty: HashSet::new(),
            dirty_subjects: HashSet::new(),
            ignored: 0,
        }
    }

    /// The settings.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The labels of identity `id`, if known.
    pub fn identity(&self, id: u32) -> Option<&LabelArray> {
        self.identities.get(&id)
    }

    /// Known identities.
    pub fn identities(&self) -> usize {
        self.identities.len()
    }

    /// Policy constructs skipped as unsupported so far.
    pub fn ignored(&self) -> u64 {
        self.ignored
    }

    /// Entries currently allowed.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.keys()
    }

    /// Enforcement flags of `subject` (0 = allow-all both ways).
    pub fn enforcement(&self, subject: u32) -> u32 {
        [Direction::Ingress, Direction::Egress]
            .into_iter()
            .filter(|d| self.enforce.get(&(subject, *d)).is_some_and(|n| *n > 0))
            .map(Direction::flag)
            .sum()
    }

    /// Whether `subject` may exchange traffic with `peer` (the datapath's lookup order).
    pub fn allows(
        &self,
        subject: u32,
        peer: u32,
        direction: Direction,
        proto: u8,
        port: u16,
    ) -> bool {
        if self.enforcement(subject) & direction.flag() == 0 {
            return true;
        }
        lookup_order(subject, peer, direction, proto, port)
            .iter()
            .any(|e| self.entries.contains_key(e))
    }

    /// Identity `id` of `cluster` appeared or changed labels (`None`: deleted). Labels
    /// without the cluster label get it (remote identities published before Cilium added
    /// it would otherwise match no cluster-scoped selector).
    pub fn on_identity(&mut self, cluster: &str, id: u32, labels: Option<&LabelArray>) {
        if self.identities.contains_key(&id) {
            self.remove_identity(id);
        }
        let Some(labels) = labels else {
            return;
        };
        let labels = if labels.get(&format!("k8s:{CLUSTER_LABEL}")).is_some()
            || labels.iter().any(|l| l.key == CLUSTER_LABEL)
        {
            labels.clone()
        } else {
            let mut v = labels.as_slice().to_vec();
            v.push(Label::new("k8s", CLUSTER_LABEL, cluster));
            LabelArray::new(v)
        };
        let newly: Vec<SelId> = self
            .sels
            .iter_mut()
            .filter(|(_, s)| s.sel.matches(&labels))
            .map(|(id_, s)| {
                s.matches.insert(id);
                *id_
            })
            .collect();
        self.identities.insert(id, labels);
        self.bump_identity(id, &newly, 1);
    }

    fn remove_identity(&mut self, id: u32) {
        let sels: Vec<SelId> = self
            .sels
            .iter()
            .filter(|(_, s)| s.matches.contains(&id))
            .map(|(k, _)| *k)
            .collect();
        self.bump_identity(id, &sels, -1);
        for s in &sels {
            if let Some(slot) = self.sels.get_mut(s) {
                slot.matches.remove(&id);
            }
        }
        self.identities.remove(&id);
    }

    /// Adds (+1) or removes (-1) every contribution of identity `id`, which is (still) in
    /// the match sets of `sels`.
    fn bump_identity(&mut self, id: u32, sels: &[SelId], delta: i32) {
        let mut rules: Vec<u64> = sels
            .iter()
            .flat_map(|s| self.rules_by_sel.get(s).into_iter().flatten().copied())
            .collect();
        rules.sort_unstable();
        rules.dedup();
        let mut bumps = Vec::new();
        for r in rules {
            let Some(rule) = self.rules.get(&r) else {
                continue;
            };
            let subjects = &self.sels[&rule.subject].matches;
            let mut pairs: BTreeSet<(u32, u32)> = BTreeSet::new();
            if subjects.contains(&id) {
                match rule.peer {
                    None => {
                        pairs.insert((id, 0));
                    }
                    Some(p) => pairs.extend(self.sels[&p].matches.iter().map(|p| (id, *p))),
                }
            }
            if let Some(p) = rule.peer {
                if self.sels[&p].matches.contains(&id) {
                    pairs.extend(subjects.iter().map(|s| (*s, id)));
                }
            }
            for (s, p) in pairs {
                bumps.push((s, p, rule.direction, rule.ports.clone()));
            }
        }
        for (s, p, d, ports) in bumps {
            self.bump(s, p, d, &ports, delta);
        }
        for s in sels {
            let dirs = self.enforce_by_sel.get(s).cloned().unwrap_or_default();
            for d in dirs {
                self.bump_enforce(id, d, delta);
            }
        }
    }

    fn bump(
        &mut self,
        subject: u32,
        peer: u32,
        direction: Direction,
        ports: &[PortProto],
        delta: i32,
    ) {
        let ports = if ports.is_empty() {
            &ANY_PORT[..]
        } else {
            ports
        };
        for pp in ports {
            let e = Entry {
                subject,
                peer,
                direction,
                proto: pp.proto,
                port: pp.port,
            };
            let was = self.entries.get(&e).copied().unwrap_or(0);
            let now = was.saturating_add_signed(delta);
            if now == 0 {
                self.entries.remove(&e);
            } else {
                self.entries.insert(e, now);
            }
            if (was == 0) != (now == 0) {
                self.dirty.insert(e);
            }
        }
    }

    fn bump_enforce(&mut self, subject: u32, d: Direction, delta: i32) {
        let was = self.enforce.get(&(subject, d)).copied().unwrap_or(0);
        let now = was.saturating_add_signed(delta);
        if now == 0 {
            self.enforce.remove(&(subject, d));
        } else {
            self.enforce.insert((subject, d), now);
        }
        if (was == 0) != (now == 0) {
            self.dirty_subjects.insert(subject);
        }
    }

    fn intern(&mut self, sel: &Selector) -> SelId {
        if let Some(id) = self.sel_ids.get(sel) {
            if let Some(s) = self.sels.get_mut(id) {
                s.refs += 1;
            }
            return *id;
        }
        let id = self.next;
        self.next += 1;
        let matches = self
            .identities
            .iter()
            .filter(|(_, l)| sel.matches(l))
            .map(|(i, _)| *i)
            .collect();
        self.sels.insert(
            id,
            SelSlot {
                sel: sel.clone(),
                matches,
                refs: 1,
            },
        );
        self.sel_ids.insert(sel.clone(), id);
        id
    }

    fn release(&mut self, id: SelId) {
        let gone = match self.sels.get_mut(&id) {
            Some(s) => {
                s.refs -= 1;
                s.refs == 0
            }
            None => false,
        };
        if gone {
            if let Some(s) = self.sels.remove(&id) {
                self.sel_ids.remove(&s.sel);
            }
            self.rules_by_sel.remove(&id);
            self.enforce_by_sel.remove(&id);
        }
    }

    /// Policy `name` (any unique key, e.g. its etcd key) was added or changed (`None`:
    /// deleted).
    pub fn on_policy(&mut self, name: &str, parsed: Option<Parsed>) {
        if let Some(old) = self.policies.remove(name) {
            for r in old.rules {
                let Some(rule) = self.rules.remove(&r) else {
                    continue;
                };
                let subjects: Vec<u32> = self.sels[&rule.subject].matches.iter().copied().collect();
                let peers: Vec<u32> = match rule.peer {
                    None => vec![0],
                    Some(p) => self.sels[&p].matches.iter().copied().collect(),
                };
                for s in &subjects {
                    for p in &peers {
                        self.bump(*s, *p, rule.direction, &rule.ports, -1);
                    }
                }
                for sel in std::iter::once(rule.subject).chain(rule.peer) {
                    if let Some(v) = self.rules_by_sel.get_mut(&sel) {
                        if let Some(i) = v.iter().position(|x| *x == r) {
                            v.swap_remove(i);
                        }
                    }
                    self.release(sel);
                }
            }
            for (sel, d) in old.enforce {
                let subjects: Vec<u32> = self.sels[&sel].matches.iter().copied().collect();
                for s in subjects {
                    self.bump_enforce(s, d, -1);
                }
                if let Some(v) = self.enforce_by_sel.get_mut(&sel) {
                    if let Some(i) = v.iter().position(|x| *x == d) {
                        v.swap_remove(i);
                    }
                }
                self.release(sel);
            }
        }
        let Some(parsed) = parsed else { return };
        self.ignored += parsed.ignored.len() as u64;
        let mut slot = PolicySlot::default();
        for (sel, d) in &parsed.enforce {
            let id = self.intern(sel);
            self.enforce_by_sel.entry(id).or_default().push(*d);
            let subjects: Vec<u32> = self.sels[&id].matches.iter().copied().collect();
            for s in subjects {
                self.bump_enforce(s, *d, 1);
            }
            slot.enforce.push((id, *d));
        }
        for rule in parsed.rules {
            let subject = self.intern(&rule.subject);
            let peer = match &rule.peer {
                Peer::Any => None,
                Peer::Selector(s) => Some(self.intern(s)),
            };
            let r = self.next;
            self.next += 1;
            for sel in std::iter::once(subject).chain(peer) {
                self.rules_by_sel.entry(sel).or_default().push(r);
            }
            let subjects: Vec<u32> = self.sels[&subject].matches.iter().copied().collect();
            let peers: Vec<u32> = match peer {
                None => vec![0],
                Some(p) => self.sels[&p].matches.iter().copied().collect(),
            };
            for s in &subjects {
                for p in &peers {
                    self.bump(*s, *p, rule.direction, &rule.ports, 1);
                }
            }
            self.rules.insert(
                r,
                RuleSlot {
                    subject,
                    direction: rule.direction,
                    peer,
                    ports: rule.ports,
                },
            );
            slot.rules.push(r);
        }
        self.policies.insert(name.to_owned(), slot);
    }

    /// Parses and applies an exported policy (`kind` from its key).
    pub fn on_policy_json(&mut self, name: &str, kind: &str, raw: Option<&[u8]>) -> Result<()> {
        let parsed = match raw {
            Some(raw) => Some(parse::parse(
                kind,
                raw,
                &Scope {
                    local_cluster: &self.config.local_cluster,
                    default_local_cluster: self.config.default_local_cluster,
                },
            )?),
            None => None,
        };
        self.on_policy(name, parsed);
        Ok(())
    }

    /// The map diff since the last call.
    pub fn take_changes(&mut self) -> Changes {
        let mut c = Changes::default();
        for e in self.dirty.drain() {
            if self.entries.contains_key(&e) {
                c.upsert.push(e);
            } else {
                c.delete.push(e);
            }
        }
        let subjects: Vec<u32> = self.dirty_subjects.drain().collect();
        for s in subjects {
            c.enforce.push((s, self.enforcement(s)));
        }
        c.upsert.sort();
        c.delete.sort();
        c.enforce.sort();
        c
    }
}

/// The keys the datapath tries, most specific first (Cilium's L3+L4, L3-only, L4-only,
/// allow-all order).
pub fn lookup_order(
    subject: u32,
    peer: u32,
    direction: Direction,
    proto: u8,
    port: u16,
) -> [Entry; 6] {
    let e = |peer, proto, port| Entry {
        subject,
        peer,
        direction,
        proto,
        port,
    };
    [
        e(peer, proto, port),
        e(peer, proto, 0),
        e(peer, 0, 0),
        e(0, proto, port),
        e(0, proto, 0),
        e(0, 0, 0),
    ]
}

#[cfg(test)]
mod tests;
