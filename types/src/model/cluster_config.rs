//! `CiliumClusterConfig` at `cilium/cluster-config/<cluster>`.

use serde::{Deserialize, Serialize};

use super::de::{is_false, is_zero_u32, null_default};
use super::json_value;

/// Per-cluster configuration announced to peers (Go `CiliumClusterConfig`).
///
/// Encoded as `{"id":3,"capabilities":{"syncedCanaries":true,...}}`; every
/// field is `omitempty`, but `capabilities` is a struct so Go always writes it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClusterConfig {
    /// Cluster ID (0 = unset, omitted).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_zero_u32"
    )]
    pub id: u32,
    /// What the writer supports.
    #[serde(default, deserialize_with = "null_default")]
    pub capabilities: Capabilities,
}

/// Capabilities of the cluster (or of the KVStoreMesh cache) that wrote the config.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Capabilities {
    /// The writer creates `cilium/synced/...` canaries when initial sync is done.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_false"
    )]
    pub synced_canaries: bool,
    /// The data lives under `cilium/cache/...` (written by KVStoreMesh).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_false"
    )]
    pub cached: bool,
    /// 255 or 511; 0 (omitted) means 255 for old writers.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "is_zero_u32"
    )]
    pub max_connected_clusters: u32,
    /// `Some(false)` is written; `None` means the writer predates MCS-API support.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_exports_enabled: Option<bool>,
    /// `""`, `services-and-endpointslices` or `endpointslices-only` (v1.20+).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub endpoint_slices_export_mode: String,
}

json_value!(ClusterConfig);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn omitempty_rules() {
        let c = ClusterConfig::default();
        assert_eq!(c.encode(), br#"{"capabilities":{}}"#);
        let c = ClusterConfig {
            id: 3,
            capabilities: Capabilities {
                synced_canaries: true,
                max_connected_clusters: 255,
                service_exports_enabled: Some(false),
                ..Default::default()
            },
        };
        assert_eq!(
            c.encode(),
            br#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#
        );
    }

    #[test]
    fn decode_errors_name_the_type() {
        let err = ClusterConfig::decode(b"{\"id\":-1}").unwrap_err();
        assert!(err.to_string().contains("ClusterConfig"), "{err}");
        assert!(ClusterConfig::decode(b"null").is_err());
    }
}
