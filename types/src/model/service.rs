//! `ClusterService` at `cilium/state/services/v1/<cluster>/<ns>/<name>`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::de::null_default;
use super::json_value;
use crate::{Error, Result};

/// Ports of one frontend or backend address: port name → protocol and port (Go
/// `PortConfiguration`, a map; JSON object with keys sorted as Go writes them).
///
/// Backed by a small sorted `Vec` rather than a `BTreeMap`: an address almost always has one
/// or two ports, and a B-tree allocates a whole node per map. For a service with 1k backends
/// that is the difference between ~1k node allocations and none beyond the entries.
#[derive(Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct PortConfiguration(Vec<(String, L4Addr)>);

impl PortConfiguration {
    /// An empty configuration.
    pub fn new() -> Self {
        Self(Vec::new())
    }
    /// Adds or replaces the port `name`.
    pub fn insert(&mut self, name: String, addr: L4Addr) -> Option<L4Addr> {
        match self
            .0
            .binary_search_by(|(k, _)| k.as_str().cmp(name.as_str()))
        {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, addr)),
            Err(i) => {
                self.0.insert(i, (name, addr));
                None
            }
        }
    }
    /// The port called `name`.
    pub fn get(&self, name: &str) -> Option<&L4Addr> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(name))
            .ok()
            .map(|i| &self.0[i].1)
    }
    /// Ports sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &L4Addr)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    /// Number of ports.
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Extend<(String, L4Addr)> for PortConfiguration {
    fn extend<I: IntoIterator<Item = (String, L4Addr)>>(&mut self, iter: I) {
        for (k, v) in iter {
            self.insert(k, v);
        }
    }
}

impl IntoIterator for PortConfiguration {
    type Item = (String, L4Addr);
    type IntoIter = std::vec::IntoIter<(String, L4Addr)>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl FromIterator<(String, L4Addr)> for PortConfiguration {
    fn from_iter<I: IntoIterator<Item = (String, L4Addr)>>(iter: I) -> Self {
        let mut p = Self::new();
        p.extend(iter);
        p
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
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
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
                let mut v: Vec<(String, L4Addr)> =
                    Vec::with_capacity(map.size_hint().unwrap_or(1).clamp(1, 16));
                while let Some((k, a)) = map.next_entry::<String, L4Addr>()? {
                    v.push((k, a));
                }
                if v.len() > 1 {
                    // Go keeps the last of duplicate keys: a stable sort puts duplicates in
                    // input order, then each run collapses onto its last element.
                    v.sort_by(|a, b| a.0.cmp(&b.0));
                    let mut i = 0;
                    while i + 1 < v.len() {
                        if v[i].0 == v[i + 1].0 {
                            v.remove(i);
                        } else {
                            i += 1;
                        }
                    }
                }
                Ok(PortConfiguration(v))
            }
        }
        d.deserialize_any(V)
    }
}

/// A protocol and port (Go `loadbalancer.L4Addr`, no JSON tags).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
#[serde(rename_all = "PascalCase")]
pub struct L4Addr {
    /// `TCP`, `UDP`, `SCTP` or `ANY`.
    #[serde(default, deserialize_with = "null_default")]
    pub protocol: String,
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
    pub frontends: BTreeMap<String, PortConfiguration>,
    /// Backend IP → ports (ready endpoints only).
    #[serde(default, deserialize_with = "null_default")]
    pub backends: BTreeMap<String, PortConfiguration>,
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

json_value!(ClusterService);

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
            if let Some(bad) = map.keys().find(|k| k.parse::<IpAddr>().is_err()) {
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
