//! `ClusterService` at `cilium/state/services/v1/<cluster>/<ns>/<name>`.
//!
//! # Why the maps look the way they do
//!
//! A global service can have thousands of backends and every agent decodes every remote
//! service on each change, so the per-backend representation decides the decode cost
//! (Cilium: ~6 ms for 1k backends). With `BTreeMap<String, BTreeMap<String, L4Addr>>`
//! each backend cost four heap allocations plus a B-tree insert. Here a backend is one
//! element of a sorted `Vec` ([`AddrMap`]) whose address, port name and protocol are inline
//! [`SmolStr`]s (≤ 23 bytes never allocate) and whose ports live inline for the usual one
//! port ([`PortConfiguration`]): decoding allocates nothing per backend. Go writes map keys
//! sorted, so building the map is an append; anything else is sorted once at the end.
//! [`ClusterService::decode`] first tries a single-pass decoder of the compact JSON Go
//! writes (`fast`) and leaves anything else to serde, which stays the reference.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
pub use smol_str::SmolStr;

use super::de::null_default;
use super::json_value;
use crate::{Error, Result};

mod fast;

/// Keeps the last of adjacent equal keys, as Go's `json.Unmarshal` does for a map's
/// duplicate keys (`dedup_by` keeps the first, so the later value is swapped into it).
macro_rules! dedup_last {
    ($v:expr) => {
        $v.dedup_by(|later, kept| {
            let same = later.0 == kept.0;
            if same {
                std::mem::swap(later, kept);
            }
            same
        })
    };
}

/// Sorts `v` by key and keeps the last of equal keys: a stable sort puts duplicates in
/// input order, then each run collapses onto its last element.
macro_rules! sort_dedup_last {
    ($v:expr) => {{
        let v = $v;
        v.sort_by(|a, b| a.0.cmp(&b.0));
        dedup_last!(v);
    }};
}

/// [`sort_dedup_last!`] for long vectors of large elements: sorts (key prefix, index) pairs,
/// which compare as integers and move cheaply, breaks prefix ties by the full key (stable,
/// so duplicates stay in input order), then moves each element into place once, cycle by
/// cycle, without a second vector. Returns whether there are duplicate keys (adjacent now).
fn sort_by_index<V: Default>(v: &mut [(SmolStr, V)]) -> bool {
    let order = v
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (sort_prefix(k), i))
        .collect();
    sort_by_order(v, order)
}

/// [`sort_by_index`] with the (prefix, index) pairs already computed.
fn sort_by_order<V: Default>(v: &mut [(SmolStr, V)], mut order: Vec<(u128, usize)>) -> bool {
    // Stable sort: it merges the ascending runs that inputs in some other order often have.
    order.sort();
    let mut dups = false;
    for run in order.chunk_by_mut(|a, b| a.0 == b.0) {
        if run.len() > 1 {
            run.sort_by(|a, b| v[a.1].0.cmp(&v[b.1].0));
            dups |= run.windows(2).any(|w| v[w[0].1].0 == v[w[1].1].0);
        }
    }
    // Position `i` receives the element at `order[i].1`; a visited position is marked by
    // pointing at itself.
    for start in 0..v.len() {
        if order[start].1 == start {
            continue;
        }
        let held = std::mem::take(&mut v[start]);
        let mut pos = start;
        loop {
            let src = std::mem::replace(&mut order[pos].1, pos);
            if src == start {
                v[pos] = held;
                break;
            }
            v[pos] = std::mem::take(&mut v[src]);
            pos = src;
        }
    }
    dups
}

/// Whether `v` is strictly ascending by key (so also free of duplicates), comparing
/// [`sort_prefix`]es first.
fn strictly_sorted<V>(v: &[(SmolStr, V)]) -> bool {
    v.windows(2).all(|w| {
        let (a, b) = (sort_prefix(&w[0].0), sort_prefix(&w[1].0));
        a < b || (a == b && w[0].0 < w[1].0)
    })
}

/// [`sort_prefix`] of `text[start..start + len]`, read as one 16-byte load when the input
/// goes on long enough (the bytes past the string are masked off).
fn sort_prefix_at(text: &str, start: usize, len: usize) -> u128 {
    match text
        .as_bytes()
        .get(start..)
        .and_then(|b| b.first_chunk::<16>())
    {
        Some(head) => {
            let mask = (!0u128)
                .checked_shl(8 * (16 - len.min(16) as u32))
                .unwrap_or(0);
            u128::from_be_bytes(*head) & mask
        }
        None => text.get(start..start + len).map(sort_prefix).unwrap_or(0),
    }
}

/// The first 16 bytes of `s`, zero-padded, as a big-endian integer: `a < b` implies the
/// same order of the strings; equal prefixes need the full comparison.
fn sort_prefix(s: &str) -> u128 {
    match s.as_bytes().first_chunk::<16>() {
        Some(head) => u128::from_be_bytes(*head),
        // Shifted in byte by byte: a short copy into a buffer read back as one integer
        // would stall on store forwarding.
        None => {
            let x = s.bytes().fold(0u128, |x, b| (x << 8) | u128::from(b));
            x.checked_shl(8 * (16 - s.len() as u32)).unwrap_or(0)
        }
    }
}

/// Whether `s` is an IP address as [`IpAddr`]'s parser sees it. Dotted-quad IPv4, by far
/// the common case, is recognised without the general parser (which anything else goes
/// to): four 1–3 digit decimals ≤ 255 without leading zeros, as `Ipv4Addr` requires.
fn is_ip(s: &str) -> bool {
    fn dotted_quad(s: &[u8]) -> bool {
        let (mut parts, mut value, mut digits) = (0, 0u32, 0);
        for &c in s {
            match c {
                b'0'..=b'9' => {
                    // A leading zero is only allowed as the whole number.
                    if digits == 3 || (digits == 1 && value == 0) {
                        return false;
                    }
                    value = value * 10 + u32::from(c - b'0');
                    digits += 1;
                }
                b'.' if digits > 0 && value <= 255 && parts < 3 => {
                    parts += 1;
                    (value, digits) = (0, 0);
                }
                _ => return false,
            }
        }
        parts == 3 && digits > 0 && value <= 255
    }
    dotted_quad(s.as_bytes()) || s.parse::<IpAddr>().is_ok()
}

/// Position of `key` in a slice sorted by key; `Err` is where it would be inserted. Checks
/// the end first: Go writes keys sorted, so decoding and building in order only append.
fn find<V>(v: &[(SmolStr, V)], key: &str) -> std::result::Result<usize, usize> {
    match v.last() {
        None => Err(0),
        Some((last, _)) if last.as_str() < key => Err(v.len()),
        _ => v.binary_search_by(|(k, _)| k.as_str().cmp(key)),
    }
}

/// Ports of one frontend or backend address: port name → protocol and port (Go
/// `PortConfiguration`, a map; JSON object with keys sorted as Go writes them).
///
/// A sorted small vector rather than a map: an address almost always has one port, which
/// is stored inline (no allocation); more spill to the heap.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct PortConfiguration(SmallVec<[(SmolStr, L4Addr); 1]>);

impl PortConfiguration {
    /// An empty configuration.
    pub fn new() -> Self {
        Self(SmallVec::new())
    }
    /// Adds or replaces the port `name`.
    pub fn insert(&mut self, name: impl Into<SmolStr>, addr: L4Addr) -> Option<L4Addr> {
        let name = name.into();
        match find(&self.0, &name) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, addr)),
            Err(i) => {
                self.0.insert(i, (name, addr));
                None
            }
        }
    }
    /// The port called `name`.
    pub fn get(&self, name: &str) -> Option<&L4Addr> {
        find(&self.0, name).ok().map(|i| &self.0[i].1)
    }
    /// Ports sorted by name.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = (&SmolStr, &L4Addr)> + ExactSizeIterator {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// Port names, sorted.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &SmolStr> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }
    /// Number of ports.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Builds from pairs in any order; the last of duplicate names wins.
    fn from_unsorted(v: SmallVec<[(SmolStr, L4Addr); 1]>) -> Self {
        let mut p = Self(v);
        p.sort_unsorted();
        p
    }
    /// Restores the order after pushing in any order; the last of duplicate names wins.
    fn sort_unsorted(&mut self) {
        if !self.0.windows(2).all(|w| w[0].0 < w[1].0) {
            sort_dedup_last!(&mut self.0);
        }
    }
}

impl<K: Into<SmolStr>> Extend<(K, L4Addr)> for PortConfiguration {
    fn extend<I: IntoIterator<Item = (K, L4Addr)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl IntoIterator for PortConfiguration {
    type Item = (SmolStr, L4Addr);
    type IntoIter = smallvec::IntoIter<[(SmolStr, L4Addr); 1]>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a PortConfiguration {
    type Item = (&'a SmolStr, &'a L4Addr);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (SmolStr, L4Addr)>,
        fn(&'a (SmolStr, L4Addr)) -> (&'a SmolStr, &'a L4Addr),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl<K: Into<SmolStr>> FromIterator<(K, L4Addr)> for PortConfiguration {
    fn from_iter<I: IntoIterator<Item = (K, L4Addr)>>(iter: I) -> Self {
        Self::from_unsorted(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl std::ops::Index<&str> for PortConfiguration {
    type Output = L4Addr;
    fn index(&self, name: &str) -> &L4Addr {
        match self.get(name) {
            Some(a) => a,
            None => panic!("no port named {name:?}"),
        }
    }
}

impl Serialize for PortConfiguration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for PortConfiguration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = PortConfiguration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of port name to {Protocol, Port}, or null")
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PortConfiguration::new())
            }
            fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(PortConfiguration::new())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = SmallVec::new();
                while let Some(entry) = map.next_entry::<SmolStr, L4Addr>()? {
                    v.push(entry);
                }
                Ok(PortConfiguration::from_unsorted(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// Frontend or backend addresses of a service → their ports (Go
/// `map[string]PortConfiguration`), sorted by address as Go writes them.
///
/// A sorted `Vec` of inline strings instead of a `BTreeMap<String, _>`: building it from
/// Go's sorted output is an append per address, with no allocation per address. Lookups
/// are binary searches; inserting out of order shifts (fine for the sizes services have).
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct AddrMap(Vec<(SmolStr, PortConfiguration)>);

impl AddrMap {
    /// An empty map.
    pub fn new() -> Self {
        Self(Vec::new())
    }
    /// An empty map with room for `n` addresses.
    pub fn with_capacity(n: usize) -> Self {
        Self(Vec::with_capacity(n))
    }
    /// Adds or replaces the ports of `addr`.
    pub fn insert(
        &mut self,
        addr: impl Into<SmolStr>,
        ports: PortConfiguration,
    ) -> Option<PortConfiguration> {
        let addr = addr.into();
        match find(&self.0, &addr) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, ports)),
            Err(i) => {
                self.0.insert(i, (addr, ports));
                None
            }
        }
    }
    /// Removes `addr`, returning its ports.
    pub fn remove(&mut self, addr: &str) -> Option<PortConfiguration> {
        find(&self.0, addr).ok().map(|i| self.0.remove(i).1)
    }
    /// The ports of `addr`.
    pub fn get(&self, addr: &str) -> Option<&PortConfiguration> {
        find(&self.0, addr).ok().map(|i| &self.0[i].1)
    }
    /// The ports of `addr`, mutably.
    pub fn get_mut(&mut self, addr: &str) -> Option<&mut PortConfiguration> {
        find(&self.0, addr).ok().map(|i| &mut self.0[i].1)
    }
    /// Whether `addr` is present.
    pub fn contains_key(&self, addr: &str) -> bool {
        find(&self.0, addr).is_ok()
    }
    /// (address, ports), sorted by address.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (&SmolStr, &PortConfiguration)> + ExactSizeIterator {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// Addresses, sorted.
    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &SmolStr> + ExactSizeIterator {
        self.0.iter().map(|(k, _)| k)
    }
    /// Ports, in address order.
    pub fn values(
        &self,
    ) -> impl DoubleEndedIterator<Item = &PortConfiguration> + ExactSizeIterator {
        self.0.iter().map(|(_, v)| v)
    }
    /// Number of addresses.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Builds from pairs in any order; the last of duplicate addresses wins.
    fn from_unsorted(v: Vec<(SmolStr, PortConfiguration)>) -> Self {
        let mut m = Self(v);
        m.sort_unsorted();
        m
    }
    /// Sorts by a precomputed (key prefix, index) per entry (see [`sort_by_order`]); the
    /// last of duplicate addresses wins.
    fn sort_with(&mut self, order: Vec<(u128, usize)>) {
        if sort_by_order(&mut self.0, order) {
            dedup_last!(self.0);
        }
    }
    /// Restores the order after pushing in any order; the last of duplicate addresses wins.
    fn sort_unsorted(&mut self) {
        if !strictly_sorted(&self.0) && sort_by_index(&mut self.0) {
            dedup_last!(self.0);
        }
    }
}

impl<K: Into<SmolStr>> Extend<(K, PortConfiguration)> for AddrMap {
    fn extend<I: IntoIterator<Item = (K, PortConfiguration)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl<K: Into<SmolStr>> FromIterator<(K, PortConfiguration)> for AddrMap {
    fn from_iter<I: IntoIterator<Item = (K, PortConfiguration)>>(iter: I) -> Self {
        Self::from_unsorted(iter.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }
}

impl IntoIterator for AddrMap {
    type Item = (SmolStr, PortConfiguration);
    type IntoIter = std::vec::IntoIter<(SmolStr, PortConfiguration)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a AddrMap {
    type Item = (&'a SmolStr, &'a PortConfiguration);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (SmolStr, PortConfiguration)>,
        fn(&'a (SmolStr, PortConfiguration)) -> (&'a SmolStr, &'a PortConfiguration),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

impl std::ops::Index<&str> for AddrMap {
    type Output = PortConfiguration;
    fn index(&self, addr: &str) -> &PortConfiguration {
        match self.get(addr) {
            Some(p) => p,
            None => panic!("no address {addr:?}"),
        }
    }
}

impl Serialize for AddrMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

impl<'de> Deserialize<'de> for AddrMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = AddrMap;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of address to port configuration, or null")
            }
            fn visit_unit<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(AddrMap::new())
            }
            fn visit_none<E: serde::de::Error>(self) -> std::result::Result<Self::Value, E> {
                Ok(AddrMap::new())
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Self::Value, A::Error> {
                let mut v = Vec::with_capacity(map.size_hint().unwrap_or(0).min(4096));
                while let Some(entry) = map.next_entry::<SmolStr, PortConfiguration>()? {
                    v.push(entry);
                }
                Ok(AddrMap::from_unsorted(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A protocol and port (Go `loadbalancer.L4Addr`, no JSON tags).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[serde(rename_all = "PascalCase")]
pub struct L4Addr {
    /// `TCP`, `UDP`, `SCTP` or `ANY` (inline, never allocates).
    #[serde(default, deserialize_with = "null_default")]
    pub protocol: SmolStr,
    /// Port number.
    #[serde(default, deserialize_with = "null_default")]
    pub port: u16,
}

/// Topology information of one backend.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct BackendZone {
    /// Zone of the backend.
    #[serde(default, deserialize_with = "null_default")]
    pub zone: String,
    /// Zones that should consume this backend (topology hints).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub for_zones: Vec<ForZone>,
}

/// One zone hint.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct ForZone {
    /// Zone name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
}

/// A global service as exported by one cluster.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterService {
    /// Cluster that exports the service.
    #[serde(default, deserialize_with = "null_default")]
    pub cluster: String,
    /// Namespace.
    #[serde(default, deserialize_with = "null_default")]
    pub namespace: String,
    /// Service name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Frontend IP (ClusterIP) → ports.
    #[serde(default, deserialize_with = "null_default")]
    pub frontends: AddrMap,
    /// Backend IP → ports (ready endpoints only).
    #[serde(default, deserialize_with = "null_default")]
    pub backends: AddrMap,
    /// Backend IP → hostname.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub hostnames: BTreeMap<String, String>,
    /// Backend IP → zone information.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub zones: BTreeMap<String, BackendZone>,
    /// Service labels (written as `{}` when empty).
    #[serde(default, deserialize_with = "null_default")]
    pub labels: BTreeMap<String, String>,
    /// Service selector (written as `{}` when empty).
    #[serde(default, deserialize_with = "null_default")]
    pub selector: BTreeMap<String, String>,
    /// The service is global (`service.cilium.io/global`).
    #[serde(default, deserialize_with = "null_default")]
    pub include_external: bool,
    /// The service's backends are shared (`service.cilium.io/shared`).
    #[serde(default, deserialize_with = "null_default")]
    pub shared: bool,
    /// ID of the exporting cluster.
    #[serde(rename = "clusterID", default, deserialize_with = "null_default")]
    pub cluster_id: u32,
}

json_value!(ClusterService, fast: fast::decode);

impl ClusterService {
    /// Cilium's checks: cluster, namespace and name set; every frontend and
    /// backend key is an IP address. (The cluster ID is checked by callers that
    /// know the mesh size, see [`crate::cluster::validate_cluster_id`].)
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::InvalidValue {
            kind: "ClusterService",
            reason,
        };
        for (field, value) in [
            ("cluster", &self.cluster),
            ("namespace", &self.namespace),
            ("name", &self.name),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("{field} is unset")));
            }
        }
        for (what, map) in [("frontend", &self.frontends), ("backend", &self.backends)] {
            if let Some(bad) = map.keys().find(|k| !is_ip(k)) {
                return Err(invalid(format!("{what} {bad:?} is not an ip address")));
            }
        }
        Ok(())
    }

    /// The kvstore key suffix `<cluster>/<namespace>/<name>`.
    pub fn key_name(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

#[cfg(test)]
mod port_configuration_tests {
    use super::*;

    #[test]
    fn is_ip_agrees_with_the_std_parser() {
        for s in [
            "10.244.1.10",
            "0.0.0.0",
            "255.255.255.255",
            "256.0.0.1",
            "1.2.3",
            "1.2.3.4.5",
            "01.2.3.4",
            "1.2.3.04",
            "1..3.4",
            ".1.2.3",
            "1.2.3.4.",
            "1.2.3.-4",
            "1.2.3.4 ",
            "299.1.1.1",
            "100.200.250.255",
            "",
            "fd00::1",
            "::ffff:10.0.0.1",
            "1.2.3.a",
        ] {
            assert_eq!(is_ip(s), s.parse::<IpAddr>().is_ok(), "{s:?}");
        }
        for a in 0..=300u32 {
            let s = format!("{a}.{a}.0.{a}");
            assert_eq!(is_ip(&s), s.parse::<IpAddr>().is_ok(), "{s:?}");
            let z = format!("0{a}.1.1.1");
            assert_eq!(is_ip(&z), z.parse::<IpAddr>().is_ok(), "{z:?}");
        }
    }

    #[test]
    fn sort_prefix_orders_like_strings() {
        let keys = [
            "",
            "a",
            "a\0",
            "a\0b",
            "10.244.0.10",
            "10.244.0.2",
            "fd00::1:2:3:4:5:6",
            "fd00::1:2:3:4:5:7",
            "fd00::1:2:3:4:5",
        ];
        for a in keys {
            for b in keys {
                if sort_prefix(a) != sort_prefix(b) {
                    assert_eq!(sort_prefix(a) < sort_prefix(b), a < b, "{a:?} {b:?}");
                }
            }
        }
    }

    #[test]
    fn sorted_and_last_duplicate_wins_like_go() {
        let p: PortConfiguration = serde_json::from_str(
            r#"{"z":{"Protocol":"TCP","Port":1},"a":{"Protocol":"UDP","Port":2},"z":{"Protocol":"TCP","Port":3}}"#,
        )
        .unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p["z"].port, 3);
        assert_eq!(
            serde_json::to_string(&p).unwrap(),
            r#"{"a":{"Protocol":"UDP","Port":2},"z":{"Protocol":"TCP","Port":3}}"#
        );
        let empty: PortConfiguration = serde_json::from_str("null").unwrap();
        assert!(empty.is_empty());
    }
}
