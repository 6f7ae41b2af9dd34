//! Typed handles on the LB maps (`CM_LB4_*`, `CM_LB6_*`), writing a [`Diff`] in its order
//! (the IPv4 operations, then the IPv6 ones).

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use clustermesh_ebpf_abi::{
    map, Ct4Entry, Ct4Key, Ct6Entry, Ct6Key, Lb4Backend, Lb4Key, Lb4RevNat, Lb4Service, Lb6Backend,
    Lb6Key, Lb6RevNat, Lb6Service, LbCounter,
};

use super::table::Diff;
use super::{Error, Result};
use crate::datapath::Datapath;

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, source }
}

fn is_not_found(error: &MapError) -> bool {
    matches!(error, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// The service maps of one loaded datapath.
pub struct LbMaps {
    services: HashMap<MapData, Lb4Key, Lb4Service>,
    backends: HashMap<MapData, u32, Lb4Backend>,
    rev_nat: HashMap<MapData, u16, Lb4RevNat>,
    ct: HashMap<MapData, Ct4Key, Ct4Entry>,
    counters: PerCpuArray<MapData, u64>,
    v6: Lb6Maps,
}

/// The `lb6` maps.
struct Lb6Maps {
    services: HashMap<MapData, Lb6Key, Lb6Service>,
    backends: HashMap<MapData, u32, Lb6Backend>,
    rev_nat: HashMap<MapData, u16, Lb6RevNat>,
    ct: HashMap<MapData, Ct6Key, Ct6Entry>,
}

/// Removes `k` from `m`; an absent key is not an error.
fn remove<K: aya::Pod, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    k: &K,
    name: &'static str,
) -> Result<()> {
    match m.remove(k) {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(map_err(name, "delete")(e)),
    }
}

/// Every key of `m` not in `keep`, removed; how many went.
fn remove_all_but<K: aya::Pod + Eq + std::hash::Hash, V: aya::Pod>(
    m: &mut HashMap<MapData, K, V>,
    keep: &std::collections::HashSet<K>,
) -> usize {
    let keys: Vec<K> = m.keys().filter_map(|k| k.ok()).collect();
    keys.into_iter()
        .filter(|k| !keep.contains(k))
        .map(|k| usize::from(m.remove(&k).is_ok()))
        .sum()
}

impl Lb6Maps {
    fn apply(&mut self, d: &super::table::Diff6) -> Result<()> {
        for (id, b) in &d.backends {
            self.backends
                .insert(id, b, 0)
                .map_err(map_err(map::LB6_BACKENDS, "update"))?;
        }
        for (i, r) in &d.rev_nat {
            self.rev_nat
                .insert(i, r, 0)
                .map_err(map_err(map::LB6_REVERSE_NAT, "update"))?;
        }
        for (k, v) in &d.services {
            self.services
                .insert(k, v, 0)
                .map_err(map_err(map::LB6_SERVICES, "update"))?;
        }
        for k in &d.delete_services {
            remove(&mut self.services, k, map::LB6_SERVICES)?;
        }
        for id in &d.delete_backends {
            remove(&mut self.backends, id, map::LB6_BACKENDS)?;
        }
        for i in &d.delete_rev_nat {
            remove(&mut self.rev_nat, i, map::LB6_REVERSE_NAT)?;
        }
        Ok(())
    }

    fn sweep(&mut self, d: &super::table::Diff6) -> usize {
        let keep_s = d.services.iter().map(|(k, _)| *k).collect();
        let keep_b = d.backends.iter().map(|(k, _)| *k).collect();
        let keep_r = d.rev_nat.iter().map(|(k, _)| *k).collect();
        remove_all_but(&mut self.services, &keep_s)
            + remove_all_but(&mut self.backends, &keep_b)
            + remove_all_but(&mut self.rev_nat, &keep_r)
    }
}

impl LbMaps {
    /// Takes the LB maps out of `dp` (once per load).
    pub fn take(dp: &mut Datapath) -> Result<Self> {
        let mut take = |name: &'static str| dp.take_map(name).ok_or(Error::MissingMap(name));
        Ok(Self {
            services: HashMap::try_from(take(map::LB4_SERVICES)?)
                .map_err(map_err(map::LB4_SERVICES, "open"))?,
            backends: HashMap::try_from(take(map::LB4_BACKENDS)?)
                .map_err(map_err(map::LB4_BACKENDS, "open"))?,
            rev_nat: HashMap::try_from(take(map::LB4_REVERSE_NAT)?)
                .map_err(map_err(map::LB4_REVERSE_NAT, "open"))?,
            ct: HashMap::try_from(take(map::LB4_CT)?).map_err(map_err(map::LB4_CT, "open"))?,
            counters: PerCpuArray::try_from(take(map::LB_COUNTERS)?)
                .map_err(map_err(map::LB_COUNTERS, "open"))?,
            v6: Lb6Maps {
                services: HashMap::try_from(take(map::LB6_SERVICES)?)
                    .map_err(map_err(map::LB6_SERVICES, "open"))?,
                backends: HashMap::try_from(take(map::LB6_BACKENDS)?)
                    .map_err(map_err(map::LB6_BACKENDS, "open"))?,
                rev_nat: HashMap::try_from(take(map::LB6_REVERSE_NAT)?)
                    .map_err(map_err(map::LB6_REVERSE_NAT, "open"))?,
                ct: HashMap::try_from(take(map::LB6_CT)?).map_err(map_err(map::LB6_CT, "open"))?,
            },
        })
    }

    /// Applies `diff` in its order (see [`super::table`]). Deleting an absent key is not an
    /// error (a pinned map adopted from an earlier agent may lack it).
    pub fn apply(&mut self, diff: &Diff) -> Result<()> {
        for (id, b) in &diff.backends {
            self.backends
                .insert(id, b, 0)
                .map_err(map_err(map::LB4_BACKENDS, "update"))?;
        }
        for (i, r) in &diff.rev_nat {
            self.rev_nat
                .insert(i, r, 0)
                .map_err(map_err(map::LB4_REVERSE_NAT, "update"))?;
        }
        for (k, v) in &diff.services {
            self.services
                .insert(k, v, 0)
                .map_err(map_err(map::LB4_SERVICES, "update"))?;
        }
        for k in &diff.delete_services {
            match self.services.remove(k) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(map::LB4_SERVICES, "delete")(e)),
            }
        }
        for id in &diff.delete_backends {
            match self.backends.remove(id) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(map::LB4_BACKENDS, "delete")(e)),
            }
        }
        for i in &diff.delete_rev_nat {
            match self.rev_nat.remove(i) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(map::LB4_REVERSE_NAT, "delete")(e)),
            }
        }
        self.v6.apply(&diff.v6)
    }

    /// Removes every entry of the service, backend and reverse-NAT maps (start-up with
    /// pinned maps from an earlier agent whose IDs this one does not know; connections keep
    /// their CT entries and re-select a backend on their next packet).
    pub fn clear(&mut self) -> Result<()> {
        let keys: Vec<Lb4Key> = self.services.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.services.remove(&k);
        }
        let ids: Vec<u32> = self.backends.keys().filter_map(|k| k.ok()).collect();
        for id in ids {
            let _ = self.backends.remove(&id);
        }
        let rs: Vec<u16> = self.rev_nat.keys().filter_map(|k| k.ok()).collect();
        for r in rs {
            let _ = self.rev_nat.remove(&r);
        }
        self.v6.sweep(&super::table::Diff6::default());
        Ok(())
    }

    /// Removes every service, backend and reverse-NAT entry that `full` (a diff that
    /// writes the complete table, [`super::ServiceMerger::reprogram`]) does not write:
    /// after `apply(full)`, the maps hold exactly the table, and entries of an earlier
    /// agent kept serving until then (no window without services).
    pub fn sweep(&mut self, full: &Diff) -> Result<usize> {
        use std::collections::HashSet;
        let keep_s: HashSet<Lb4Key> = full.services.iter().map(|(k, _)| *k).collect();
        let keep_b: HashSet<u32> = full.backends.iter().map(|(k, _)| *k).collect();
        let keep_r: HashSet<u16> = full.rev_nat.iter().map(|(k, _)| *k).collect();
        let mut n = 0;
        let keys: Vec<Lb4Key> = self.services.keys().filter_map(|k| k.ok()).collect();
        for k in keys.into_iter().filter(|k| !keep_s.contains(k)) {
            n += usize::from(self.services.remove(&k).is_ok());
        }
        let ids: Vec<u32> = self.backends.keys().filter_map(|k| k.ok()).collect();
        for id in ids.into_iter().filter(|k| !keep_b.contains(k)) {
            n += usize::from(self.backends.remove(&id).is_ok());
        }
        let rs: Vec<u16> = self.rev_nat.keys().filter_map(|k| k.ok()).collect();
        for r in rs.into_iter().filter(|k| !keep_r.contains(k)) {
            n += usize::from(self.rev_nat.remove(&r).is_ok());
        }
        Ok(n + self.v6.sweep(&full.v6))
    }

    /// A service entry (slot 0 = the frontend).
    pub fn service(&self, key: &Lb4Key) -> Result<Option<Lb4Service>> {
        match self.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LB4_SERVICES, "lookup")(e)),
        }
    }

    /// An IPv6 service entry (slot 0 = the frontend).
    pub fn service6(&self, key: &Lb6Key) -> Result<Option<Lb6Service>> {
        match self.v6.services.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LB6_SERVICES, "lookup")(e)),
        }
    }

    /// An IPv6 backend.
    pub fn backend6(&self, id: u32) -> Result<Option<Lb6Backend>> {
        match self.v6.backends.get(&id, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LB6_BACKENDS, "lookup")(e)),
        }
    }

    /// A backend.
    pub fn backend(&self, id: u32) -> Result<Option<Lb4Backend>> {
        match self.backends.get(&id, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LB4_BACKENDS, "lookup")(e)),
        }
    }

    /// Every connection-tracking entry (status, tests).
    pub fn ct_entries(&self) -> Result<Vec<(Ct4Key, Ct4Entry)>> {
        self.ct
            .iter()
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(map_err(map::LB4_CT, "iterate"))
    }

    /// Removes every connection-tracking entry.
    pub fn clear_ct(&mut self) -> Result<()> {
        let keys: Vec<Ct4Key> = self.ct.keys().filter_map(|k| k.ok()).collect();
        for k in keys {
            let _ = self.ct.remove(&k);
        }
        remove_all_but(&mut self.v6.ct, &std::collections::HashSet::new());
        Ok(())
    }

    /// Every LB counter, summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(LbCounter, u64)>> {
        LbCounter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(map_err(map::LB_COUNTERS, "lookup"))?;
                Ok((*c, v.iter().sum()))
            })
            .collect()
    }

    /// One counter, summed over CPUs.
    pub fn counter(&self, c: LbCounter) -> Result<u64> {
        let v = self
            .counters
            .get(&(c as u32), 0)
            .map_err(map_err(map::LB_COUNTERS, "lookup"))?;
        Ok(v.iter().sum())
    }
}
