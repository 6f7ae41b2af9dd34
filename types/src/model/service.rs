//! `ClusterService` at `cilium/state/services/v1/<cluster>/<ns>/<name>`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::de::null_default;
use super::json_value;
use crate::{Error, Result};

/// Ports of one frontend or backend address: port name → protocol and port.
pub type PortConfiguration = BTreeMap<String, L4Addr>;

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
