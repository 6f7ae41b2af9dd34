//! `nodeTypes.Node` at `cilium/state/nodes/v1/<cluster>/<node>`.
//!
//! The Go struct has no JSON tags, so the keys are the Go field names.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::{Serialize, Serializer};

use super::de::{ip_or_empty, null_default};
use super::{json_value, Cidr};
use crate::{Error, Result};

/// A node of a cluster, as announced to the other clusters.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "PascalCase")]
pub struct Node {
    /// Node name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Cluster name.
    #[serde(default, deserialize_with = "null_default")]
    pub cluster: String,
    /// Node addresses; written as `null` when empty (a nil Go slice).
    #[serde(
        rename = "IPAddresses",
        default,
        deserialize_with = "null_default",
        serialize_with = "vec_or_null"
    )]
    pub ip_addresses: Vec<NodeAddress>,
    /// Primary IPv4 pod CIDR.
    #[serde(rename = "IPv4AllocCIDR", default)]
    pub ipv4_alloc_cidr: Option<Cidr>,
    /// Further IPv4 pod CIDRs; `null` when empty.
    #[serde(
        rename = "IPv4SecondaryAllocCIDRs",
        default,
        deserialize_with = "null_default",
        serialize_with = "vec_or_null"
    )]
    pub ipv4_secondary_alloc_cidrs: Vec<Cidr>,
    /// Primary IPv6 pod CIDR.
    #[serde(rename = "IPv6AllocCIDR", default)]
    pub ipv6_alloc_cidr: Option<Cidr>,
    /// Further IPv6 pod CIDRs; `null` when empty.
    #[serde(
        rename = "IPv6SecondaryAllocCIDRs",
        default,
        deserialize_with = "null_default",
        serialize_with = "vec_or_null"
    )]
    pub ipv6_secondary_alloc_cidrs: Vec<Cidr>,
    /// IPv4 of the health endpoint, `""` if none.
    #[serde(rename = "IPv4HealthIP", default, deserialize_with = "ip_or_empty")]
    pub ipv4_health_ip: String,
    /// IPv6 of the health endpoint, `""` if none.
    #[serde(rename = "IPv6HealthIP", default, deserialize_with = "ip_or_empty")]
    pub ipv6_health_ip: String,
    /// IPv4 of the ingress endpoint, `""` if none.
    #[serde(rename = "IPv4IngressIP", default, deserialize_with = "ip_or_empty")]
    pub ipv4_ingress_ip: String,
    /// IPv6 of the ingress endpoint, `""` if none.
    #[serde(rename = "IPv6IngressIP", default, deserialize_with = "ip_or_empty")]
    pub ipv6_ingress_ip: String,
    /// Cluster ID.
    #[serde(rename = "ClusterID", default, deserialize_with = "null_default")]
    pub cluster_id: u32,
    /// Who wrote the node: `custom-resource` (clustermesh-apiserver) or `local`.
    #[serde(default, deserialize_with = "null_default")]
    pub source: String,
    /// IPsec key index.
    #[serde(default, deserialize_with = "null_default")]
    pub encryption_key: u8,
    /// Node labels (`null` when `None`).
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    /// Node annotations (`null` when `None`).
    #[serde(default)]
    pub annotations: Option<BTreeMap<String, String>>,
    /// WireGuard public key, `""` if none.
    #[serde(default, deserialize_with = "null_default")]
    pub wireguard_pub_key: String,
    /// Boot ID of the node (changes on reboot).
    #[serde(rename = "BootID", default, deserialize_with = "null_default")]
    pub boot_id: String,
}

/// One address of a node.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct NodeAddress {
    /// `InternalIP`, `ExternalIP`, `CiliumInternalIP`, `Hostname`, ...
    #[serde(rename = "Type", default, deserialize_with = "null_default")]
    pub type_: String,
    /// The address.
    #[serde(rename = "IP", default, deserialize_with = "ip_or_empty")]
    pub ip: String,
}

/// Go writes a nil slice as `null`; Cilium never writes an empty non-nil one here.
fn vec_or_null<S: Serializer, T: Serialize>(v: &[T], s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        s.collect_seq(v)
    }
}

json_value!(Node);

impl Node {
    /// Cilium's unmarshal checks: name and cluster must be set.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: &str| Error::InvalidValue {
            kind: "Node",
            reason: reason.to_owned(),
        };
        if self.name.is_empty() {
            return Err(invalid("name is unset"));
        }
        if self.cluster.is_empty() {
            return Err(invalid("cluster is unset"));
        }
        Ok(())
    }

    /// The kvstore key suffix `<cluster>/<name>` (Go `strings.Trim(.., "/")`).
    pub fn key_name(&self) -> String {
        format!("{}/{}", self.cluster, self.name)
            .trim_matches('/')
            .to_owned()
    }
}
