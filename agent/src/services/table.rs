//! Merged services → LB map entries, by diff (pure; [`super::maps::LbMaps`] writes a
//! [`Diff`]).
//!
//! Layout (`ebpf/abi`, after Cilium's `lb4_*` maps): per frontend `VIP:port/proto`, slot 0
//! holds the backend count and rev-NAT index, slots `1..=count` the backend IDs; backends
//! are shared by every frontend that uses the same `(address, port, proto, cluster)`.
//!
//! Update order keeps every intermediate state usable by the datapath: new backends first,
//! then slots, then the service entry (a new count only after its slots exist), then
//! deletion of slots beyond the count, and backends last, once nothing points at them.
//! Backend IDs are never reused: a connection-tracking entry that still names a deleted
//! backend misses and picks a new one, instead of landing on an unrelated backend.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use clustermesh_ebpf_abi::{
    backend_state, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, IPPROTO_TCP, IPPROTO_UDP,
};

use super::merger::{Merged, Name};

/// Map operations for one change, in the order they must be applied.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Diff {
    /// New backends.
    pub backends: Vec<(u32, Lb4Backend)>,
    /// New or changed reverse-NAT entries.
    pub rev_nat: Vec<(u16, Lb4RevNat)>,
    /// Service entries to write: backend slots before their service entry.
    pub services: Vec<(Lb4Key, Lb4Service)>,
    /// Service entries to delete: a service entry before its slots.
    pub delete_services: Vec<Lb4Key>,
    /// Backends no frontend uses any more.
    pub delete_backends: Vec<u32>,
    /// Reverse-NAT entries of removed frontends.
    pub delete_rev_nat: Vec<u16>,
}

impl Diff {
    /// No operation.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
            && self.rev_nat.is_empty()
            && self.services.is_empty()
            && self.delete_services.is_empty()
            && self.delete_backends.is_empty()
            && self.delete_rev_nat.is_empty()
    }

    /// Appends `other` (applied after `self`).
    pub fn extend(&mut self, other: Diff) {
        self.backends.extend(other.backends);
        self.rev_nat.extend(other.rev_nat);
        self.services.extend(other.services);
        self.delete_services.extend(other.delete_services);
        self.delete_backends.extend(other.delete_backends);
        self.delete_rev_nat.extend(other.delete_rev_nat);
    }

    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.backends.len()
            + self.rev_nat.len()
            + self.services.len()
            + self.delete_services.len()
            + self.delete_backends.len()
            + self.delete_rev_nat.len()
    }
}

/// What identifies a backend entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    ip: Ipv4Addr,
    port: u16,
    proto: u8,
    cluster_id: u16,
}

/// One frontend as programmed.
#[derive(Clone, Debug, PartialEq)]
struct FrontendState {
    key: Lb4Key,
    rev_nat_index: u16,
    backends: Vec<u32>,
}

/// `TCP`/`UDP` → IP protocol number; other protocols are not load-balanced.
pub fn proto_number(protocol: &str) -> Option<u8> {
    match protocol.to_ascii_uppercase().as_str() {
        "TCP" | "" => Some(IPPROTO_TCP),
        "UDP" => Some(IPPROTO_UDP),
        _ => None,
    }
}

/// The programmed state of every service, and the allocation of backend IDs and rev-NAT
/// indexes.
#[derive(Debug, Default)]
pub struct Table {
    services: BTreeMap<Name, Vec<FrontendState>>,
    backends: HashMap<BackendKey, (u32, usize)>,
    by_id: HashMap<u32, BackendKey>,
    next_backend_id: u32,
    rev_nat: HashMap<Lb4Key, u16>,
    rev_nat_used: std::collections::HashSet<u16>,
    next_rev_nat: u16,
    /// Frontends or backends skipped (IPv6, SCTP, cluster ID > 65535).
    pub unsupported: u64,
}

impl Table {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of frontends programmed.
    pub fn frontends(&self) -> usize {
        self.services.values().map(Vec::len).sum()
    }

    /// Number of backend entries programmed.
    pub fn backends(&self) -> usize {
        self.backends.len()
    }

    /// Backend IDs of `name`'s frontends (frontend key, IDs), for status and tests.
    pub fn slots(&self, name: &Name) -> Vec<(Lb4Key, Vec<u32>)> {
        self.services
            .get(name)
            .into_iter()
            .flatten()
            .map(|f| (f.key, f.backends.clone()))
            .collect()
    }

    fn acquire(&mut self, key: BackendKey, diff: &mut Diff) -> Option<u32> {
        if let Some((id, refs)) = self.backends.get_mut(&key) {
            *refs += 1;
            return Some(*id);
        }
        self.next_backend_id = self.next_backend_id.checked_add(1)?;
        let id = self.next_backend_id;
        self.backends.insert(key, (id, 1));
        self.by_id.insert(id, key);
        diff.backends.push((
            id,
            Lb4Backend {
                address: key.ip.octets(),
                port: key.port.to_be(),
                proto: key.proto,
                flags: backend_state::ACTIVE,
                cluster_id: key.cluster_id,
                zone: 0,
                pad: 0,
            },
        ));
        Some(id)
    }

    fn release(&mut self, id: u32, diff: &mut Diff) {
        let Some(key) = self.by_id.get(&id).copied() else {
            return;
        };
        if let Some((_, refs)) = self.backends.get_mut(&key) {
            *refs -= 1;
            if *refs == 0 {
                self.backends.remove(&key);
                self.by_id.remove(&id);
                diff.delete_backends.push(id);
            }
        }
    }

    fn rev_nat_index(&mut self, key: &Lb4Key, diff: &mut Diff) -> Option<u16> {
        if let Some(i) = self.rev_nat.get(key) {
            return Some(*i);
        }
        // The next free index after the last one handed out (wrapping, 0 is never used), so
        // a freed index is reused as late as possible.
        let mut i = self.next_rev_nat;
        for _ in 0..u16::MAX {
            i = i.wrapping_add(1).max(1);
            if !self.rev_nat_used.contains(&i) {
                self.next_rev_nat = i;
                self.rev_nat.insert(*key, i);
                self.rev_nat_used.insert(i);
                diff.rev_nat.push((
                    i,
                    Lb4RevNat {
                        address: key.address,
                        port: key.dport,
                        pad: 0,
                    },
                ));
                return Some(i);
            }
        }
        None
    }

    /// Programs `name` as `merged` (`None` = remove it); returns the map operations.
    pub fn set(&mut self, name: &Name, merged: Option<&Merged>) -> Diff {
        let mut diff = Diff::default();
        let old = self.services.remove(name).unwrap_or_default();
        let mut new = Vec::new();
        for fe in merged.map(|m| m.frontends.as_slice()).unwrap_or_default() {
            let (IpAddr::V4(vip), Some(proto)) = (fe.ip, proto_number(&fe.protocol)) else {
                self.unsupported += 1;
                continue;
            };
            let key = Lb4Key::new(vip.octets(), fe.port, proto, 0);
            if new.iter().any(|f: &FrontendState| f.key == key) {
                continue;
            }
            let mut keys: Vec<BackendKey> = Vec::new();
            for b in merged.map(|m| m.backends.as_slice()).unwrap_or_default() {
                let Some((bproto, bport)) = b.ports.get(&fe.port_name) else {
                    continue;
                };
                let (IpAddr::V4(ip), Some(bproto), Ok(cluster_id)) =
                    (b.ip, proto_number(bproto), u16::try_from(b.cluster_id))
                else {
                    self.unsupported += 1;
                    continue;
                };
                if bproto != proto {
                    continue;
                }
                keys.push(BackendKey {
                    ip,
                    port: *bport,
                    proto,
                    cluster_id,
                });
            }
            keys.sort();
            keys.dedup();
            let Some(rev_nat_index) = self.rev_nat_index(&key, &mut diff) else {
                self.unsupported += 1;
                continue;
            };
            let backends: Vec<u32> = keys
                .into_iter()
                .filter_map(|k| self.acquire(k, &mut diff))
                .collect();
            new.push(FrontendState {
                key,
                rev_nat_index,
                backends,
            });
        }

        for f in &new {
            let prev = old.iter().find(|o| o.key == f.key);
            let prev_backends = prev.map(|p| p.backends.as_slice()).unwrap_or_default();
            for (i, id) in f.backends.iter().enumerate() {
                if prev_backends.get(i) != Some(id) {
                    let mut k = f.key;
                    k.backend_slot = (i + 1) as u16;
                    diff.services.push((
                        k,
                        Lb4Service {
                            backend_id: *id,
                            rev_nat_index: f.rev_nat_index,
                            ..Default::default()
                        },
                    ));
                }
            }
            let count = f.backends.len() as u16;
            if prev.map(|p| (p.backends.len(), p.rev_nat_index))
                != Some((f.backends.len(), f.rev_nat_index))
            {
                diff.services.push((
                    f.key,
                    Lb4Service {
                        backend_id: 0,
                        count,
                        rev_nat_index: f.rev_nat_index,
                        ..Default::default()
                    },
                ));
            }
            for slot in f.backends.len()..prev_backends.len() {
                let mut k = f.key;
                k.backend_slot = (slot + 1) as u16;
                diff.delete_services.push(k);
            }
        }
        for o in &old {
            if new.iter().any(|f| f.key == o.key) {
                continue;
            }
            diff.delete_services.push(o.key);
            for slot in 0..o.backends.len() {
                let mut k = o.key;
                k.backend_slot = (slot + 1) as u16;
                diff.delete_services.push(k);
            }
            if let Some(i) = self.rev_nat.remove(&o.key) {
                self.rev_nat_used.remove(&i);
                diff.delete_rev_nat.push(i);
            }
        }
        for o in &old {
            for id in &o.backends {
                self.release(*id, &mut diff);
            }
        }
        if !new.is_empty() {
            self.services.insert(name.clone(), new);
        }
        diff
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::services::merger::{Backend, Frontend};

    fn merged(backends: &[(&str, u32)]) -> Merged {
        Merged {
            frontends: vec![Frontend {
                ip: "172.20.0.10".parse().unwrap(),
                port_name: "http".into(),
                protocol: "TCP".into(),
                port: 80,
            }],
            backends: backends
                .iter()
                .map(|(ip, c)| Backend {
                    ip: ip.parse().unwrap(),
                    ports: [("http".to_string(), ("TCP".to_string(), 8080))]
                        .into_iter()
                        .collect(),
                    cluster_id: *c,
                    local: *c == 1,
                })
                .collect(),
            global: true,
            ..Default::default()
        }
    }

    #[test]
    fn add_shrink_remove() {
        let mut t = Table::new();
        let n = Name::new("default", "echo");
        let d = t.set(&n, Some(&merged(&[("10.1.1.10", 1), ("10.2.1.10", 2)])));
        assert_eq!(d.backends.len(), 2);
        assert_eq!(d.rev_nat.len(), 1);
        // Two slots, then the service entry last.
        assert_eq!(d.services.len(), 3);
        assert_eq!(d.services[2].0.backend_slot, 0);
        assert_eq!(d.services[2].1.count, 2);
        assert_eq!(d.backends[1].1.cluster_id, 2);
        assert_eq!(d.backends[0].1.port, 8080u16.to_be());

        // Unchanged: nothing to do.
        assert!(t
            .set(&n, Some(&merged(&[("10.1.1.10", 1), ("10.2.1.10", 2)])))
            .is_empty());

        // The local backend goes: slot 1 now names the remote one, count 1, slot 2 deleted,
        // the local backend deleted last.
        let d = t.set(&n, Some(&merged(&[("10.2.1.10", 2)])));
        assert_eq!(d.services.len(), 2);
        assert_eq!(d.services[1].1.count, 1);
        assert_eq!(d.delete_services.len(), 1);
        assert_eq!(d.delete_services[0].backend_slot, 2);
        assert_eq!(d.delete_backends, vec![1]);

        let d = t.set(&n, None);
        assert_eq!(d.delete_services[0].backend_slot, 0);
        assert_eq!(d.delete_services.len(), 2);
        assert_eq!(d.delete_backends, vec![2]);
        assert_eq!(d.delete_rev_nat.len(), 1);
        assert_eq!((t.frontends(), t.backends()), (0, 0));
    }

    #[test]
    fn backend_ids_are_not_reused() {
        let mut t = Table::new();
        let n = Name::new("default", "echo");
        t.set(&n, Some(&merged(&[("10.1.1.10", 1)])));
        t.set(&n, Some(&merged(&[])));
        let d = t.set(&n, Some(&merged(&[("10.1.1.10", 1)])));
        assert_eq!(d.backends[0].0, 2);
    }

    #[test]
    fn shared_backends_are_refcounted() {
        let mut t = Table::new();
        let (a, b) = (Name::new("default", "a"), Name::new("default", "b"));
        let mut mb = merged(&[("10.1.1.10", 1)]);
        mb.frontends[0].ip = "172.20.0.11".parse().unwrap();
        t.set(&a, Some(&merged(&[("10.1.1.10", 1)])));
        let d = t.set(&b, Some(&mb));
        assert!(d.backends.is_empty());
        assert!(t.set(&a, None).delete_backends.is_empty());
        assert_eq!(t.set(&b, None).delete_backends, vec![1]);
    }
}
