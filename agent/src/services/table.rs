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
//!
//! IPv6 frontends go to the `lb6` maps (Cilium's layout) by the same rules: a frontend
//! takes the backends of its own family (a dual-stack service has a VIP and backends of
//! each), backend IDs and rev-NAT indexes come from one space shared by both families, and
//! the IPv6 operations of a diff are in their own lists, applied after the IPv4 ones in the
//! same order.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use clustermesh_ebpf_abi::{
    backend_state, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, Lb6Backend, Lb6Key, Lb6RevNat,
    IPPROTO_TCP, IPPROTO_UDP,
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
    /// The same six lists for IPv6 frontends (`lb6` maps), applied after the IPv4 ones.
    pub v6: Diff6,
}

/// The IPv6 operations of a [`Diff`], in the same order as the IPv4 ones.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Diff6 {
    /// New backends.
    pub backends: Vec<(u32, Lb6Backend)>,
    /// New or changed reverse-NAT entries.
    pub rev_nat: Vec<(u16, Lb6RevNat)>,
    /// Service entries to write: backend slots before their service entry.
    pub services: Vec<(Lb6Key, Lb4Service)>,
    /// Service entries to delete: a service entry before its slots.
    pub delete_services: Vec<Lb6Key>,
    /// Backends no frontend uses any more.
    pub delete_backends: Vec<u32>,
    /// Reverse-NAT entries of removed frontends.
    pub delete_rev_nat: Vec<u16>,
}

impl Diff6 {
    fn len(&self) -> usize {
        self.backends.len()
            + self.rev_nat.len()
            + self.services.len()
            + self.delete_services.len()
            + self.delete_backends.len()
            + self.delete_rev_nat.len()
    }

    fn extend(&mut self, other: Diff6) {
        self.backends.extend(other.backends);
        self.rev_nat.extend(other.rev_nat);
        self.services.extend(other.services);
        self.delete_services.extend(other.delete_services);
        self.delete_backends.extend(other.delete_backends);
        self.delete_rev_nat.extend(other.delete_rev_nat);
    }
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
            && self.v6.len() == 0
    }

    /// Appends `other` (applied after `self`).
    pub fn extend(&mut self, other: Diff) {
        self.backends.extend(other.backends);
        self.rev_nat.extend(other.rev_nat);
        self.services.extend(other.services);
        self.delete_services.extend(other.delete_services);
        self.delete_backends.extend(other.delete_backends);
        self.delete_rev_nat.extend(other.delete_rev_nat);
        self.v6.extend(other.v6);
    }

    /// Number of map operations.
    pub fn len(&self) -> usize {
        self.backends.len()
            + self.rev_nat.len()
            + self.services.len()
            + self.delete_services.len()
            + self.delete_backends.len()
            + self.delete_rev_nat.len()
            + self.v6.len()
    }

    /// Writes slot `slot` of frontend `key` (slot 0: the service entry).
    fn write(&mut self, key: FeKey, slot: u16, svc: Lb4Service) {
        match key {
            FeKey::V4(mut k) => {
                k.backend_slot = slot;
                self.services.push((k, svc));
            }
            FeKey::V6(mut k) => {
                k.backend_slot = slot;
                self.v6.services.push((k, svc));
            }
        }
    }

    /// Deletes slot `slot` of frontend `key`.
    fn delete(&mut self, key: FeKey, slot: u16) {
        match key {
            FeKey::V4(mut k) => {
                k.backend_slot = slot;
                self.delete_services.push(k);
            }
            FeKey::V6(mut k) => {
                k.backend_slot = slot;
                self.v6.delete_services.push(k);
            }
        }
    }
}

/// A frontend's service key (slot 0), of either family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum FeKey {
    V4(Lb4Key),
    V6(Lb6Key),
}

/// What identifies a backend entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct BackendKey {
    ip: IpAddr,
    port: u16,
    proto: u8,
    cluster_id: u16,
}

/// One frontend as programmed.
#[derive(Clone, Debug, PartialEq)]
struct FrontendState {
    key: FeKey,
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
    rev_nat: HashMap<FeKey, u16>,
    rev_nat_used: std::collections::HashSet<u16>,
    next_rev_nat: u16,
    /// Frontends or backends skipped (SCTP, cluster ID > 65535).
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

    /// Backend IDs of `name`'s IPv4 frontends (frontend key, IDs), for status and tests.
    pub fn slots(&self, name: &Name) -> Vec<(Lb4Key, Vec<u32>)> {
        self.services
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|f| match f.key {
                FeKey::V4(k) => Some((k, f.backends.clone())),
                FeKey::V6(_) => None,
            })
            .collect()
    }

    /// Backend IDs of `name`'s IPv6 frontends.
    pub fn slots6(&self, name: &Name) -> Vec<(Lb6Key, Vec<u32>)> {
        self.services
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|f| match f.key {
                FeKey::V6(k) => Some((k, f.backends.clone())),
                FeKey::V4(_) => None,
            })
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
        match key.ip {
            IpAddr::V4(ip) => diff.backends.push((
                id,
                Lb4Backend {
                    address: ip.octets(),
                    port: key.port.to_be(),
                    proto: key.proto,
                    flags: backend_state::ACTIVE,
                    cluster_id: key.cluster_id,
                    zone: 0,
                    pad: 0,
                },
            )),
            IpAddr::V6(ip) => diff.v6.backends.push((
                id,
                Lb6Backend {
                    address: ip.octets(),
                    port: key.port.to_be(),
                    proto: key.proto,
                    flags: backend_state::ACTIVE,
                    cluster_id: key.cluster_id,
                    zone: 0,
                    pad: 0,
                },
            )),
        }
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
                match key.ip {
                    IpAddr::V4(_) => diff.delete_backends.push(id),
                    IpAddr::V6(_) => diff.v6.delete_backends.push(id),
                }
            }
        }
    }

    fn rev_nat_index(&mut self, key: &FeKey, diff: &mut Diff) -> Option<u16> {
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
                match key {
                    FeKey::V4(k) => diff.rev_nat.push((
                        i,
                        Lb4RevNat {
                            address: k.address,
                            port: k.dport,
                            pad: 0,
                        },
                    )),
                    FeKey::V6(k) => diff.v6.rev_nat.push((
                        i,
                        Lb6RevNat {
                            address: k.address,
                            port: k.dport,
                            pad: 0,
                        },
                    )),
                }
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
            let Some(proto) = proto_number(&fe.protocol) else {
                self.unsupported += 1;
                continue;
            };
            let key = match fe.ip {
                IpAddr::V4(vip) => FeKey::V4(Lb4Key::new(vip.octets(), fe.port, proto, 0)),
                IpAddr::V6(vip) => FeKey::V6(Lb6Key::new(vip.octets(), fe.port, proto, 0)),
            };
            if new.iter().any(|f: &FrontendState| f.key == key) {
                continue;
            }
            let mut keys: Vec<BackendKey> = Vec::new();
            for b in merged.map(|m| m.backends.as_slice()).unwrap_or_default() {
                let Some((bproto, bport)) = b.ports.get(&fe.port_name) else {
                    continue;
                };
                // The other family's backends serve the other VIP of a dual-stack service.
                if b.ip.is_ipv4() != fe.ip.is_ipv4() {
                    continue;
                }
                let ip = b.ip;
                let (Some(bproto), Ok(cluster_id)) =
                    (proto_number(bproto), u16::try_from(b.cluster_id))
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
                    diff.write(
                        f.key,
                        (i + 1) as u16,
                        Lb4Service {
                            backend_id: *id,
                            rev_nat_index: f.rev_nat_index,
                            ..Default::default()
                        },
                    );
                }
            }
            let count = f.backends.len() as u16;
            if prev.map(|p| (p.backends.len(), p.rev_nat_index))
                != Some((f.backends.len(), f.rev_nat_index))
            {
                diff.write(
                    f.key,
                    0,
                    Lb4Service {
                        backend_id: 0,
                        count,
                        rev_nat_index: f.rev_nat_index,
                        ..Default::default()
                    },
                );
            }
            for slot in f.backends.len()..prev_backends.len() {
                diff.delete(f.key, (slot + 1) as u16);
            }
        }
        for o in &old {
            if new.iter().any(|f| f.key == o.key) {
                continue;
            }
            diff.delete(o.key, 0);
            for slot in 0..o.backends.len() {
                diff.delete(o.key, (slot + 1) as u16);
            }
            if let Some(i) = self.rev_nat.remove(&o.key) {
                self.rev_nat_used.remove(&i);
                match o.key {
                    FeKey::V4(_) => diff.delete_rev_nat.push(i),
                    FeKey::V6(_) => diff.v6.delete_rev_nat.push(i),
                }
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
    fn dual_stack_frontends_take_their_familys_backends() {
        let mut t = Table::new();
        let n = Name::new("default", "echo");
        let mut m = merged(&[("10.1.1.10", 1), ("fd00:10:1::10", 1), ("fd00:10:2::10", 2)]);
        m.frontends.push(Frontend {
            ip: "fd00:172:20::10".parse().unwrap(),
            port_name: "http".into(),
            protocol: "TCP".into(),
            port: 80,
        });
        let d = t.set(&n, Some(&m));
        // IPv4: one backend, its slot and service entry.
        assert_eq!(d.backends.len(), 1);
        assert_eq!(d.services.len(), 2);
        assert_eq!(d.rev_nat.len(), 1);
        // IPv6: two backends (IDs from the same space), two slots, then the service entry.
        let v6 = &d.v6;
        assert_eq!(v6.backends.len(), 2);
        assert!(v6.backends.iter().all(|(id, _)| *id > 1));
        assert_eq!(
            std::net::Ipv6Addr::from(v6.backends[1].1.address),
            "fd00:10:2::10".parse::<std::net::Ipv6Addr>().unwrap()
        );
        assert_eq!(v6.backends[1].1.cluster_id, 2);
        assert_eq!(v6.backends[0].1.port, 8080u16.to_be());
        assert_eq!(v6.services.len(), 3);
        assert_eq!(v6.services[2].0.backend_slot, 0);
        assert_eq!(v6.services[2].0.dport, 80u16.to_be());
        assert_eq!(v6.services[2].1.count, 2);
        assert_eq!(v6.rev_nat.len(), 1);
        assert_ne!(v6.rev_nat[0].0, d.rev_nat[0].0, "one rev-NAT index space");
        assert_eq!(v6.services[2].1.rev_nat_index, v6.rev_nat[0].0);
        assert_eq!(t.slots6(&n)[0].1.len(), 2);
        assert_eq!(
            t.unsupported, 0,
            "the other family's backends are not unsupported"
        );
        // A remote IPv6 backend goes: IPv6 only changes.
        let mut m2 = merged(&[("10.1.1.10", 1), ("fd00:10:1::10", 1)]);
        m2.frontends.push(m.frontends[1].clone());
        let d = t.set(&n, Some(&m2));
        assert!(d.backends.is_empty() && d.services.is_empty() && d.delete_backends.is_empty());
        assert_eq!(d.v6.delete_services.len(), 1);
        assert_eq!(d.v6.delete_backends.len(), 1);
        // Removed: every IPv6 entry deleted, service entry before its slots.
        let d = t.set(&n, None);
        assert_eq!(d.v6.delete_services[0].backend_slot, 0);
        assert_eq!(d.v6.delete_services.len(), 2);
        assert_eq!(d.v6.delete_rev_nat.len(), 1);
        assert_eq!(d.v6.delete_backends.len(), 1);
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
