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

/// How a cluster exports its global services' backends (Cilium 1.20's capability
/// `endpointSlicesExportMode`), which tells a reader which stores to watch.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub enum EndpointSlicesExportMode {
    /// `""`: services only as far as a reader knows (a writer before 1.20, or one that
    /// prefers the legacy store); readers use `cilium/state/services/v1` and do not wait
    /// for EndpointSlices.
    #[default]
    Unset,
    /// `services-and-endpointslices`: both stores; readers prefer the EndpointSlices.
    ServicesAndEndpointSlices,
    /// `endpointslices-only`: no `cilium/state/services/v1` at all.
    EndpointSlicesOnly,
}

impl EndpointSlicesExportMode {
    /// The wire value.
    pub fn as_str(self) -> &'static str {
        match self {
            EndpointSlicesExportMode::Unset => "",
            EndpointSlicesExportMode::ServicesAndEndpointSlices => "services-and-endpointslices",
            EndpointSlicesExportMode::EndpointSlicesOnly => "endpointslices-only",
        }
    }

    /// Parses the wire value; anything else is refused, as Cilium's
    /// `ValidateRemoteConfig` does.
    pub fn parse(value: &str) -> crate::Result<Self> {
        match value {
            "" => Ok(EndpointSlicesExportMode::Unset),
            "services-and-endpointslices" => {
                Ok(EndpointSlicesExportMode::ServicesAndEndpointSlices)
            }
            "endpointslices-only" => Ok(EndpointSlicesExportMode::EndpointSlicesOnly),
            other => Err(crate::Error::InvalidValue {
                kind: "ClusterConfig",
                reason: format!(
                    "endpointSlicesExportMode {other:?} is none of \"\", \"services-and-endpointslices\", \"endpointslices-only\""
                ),
            }),
        }
    }

    /// Whether the cluster writes `cilium/state/services/v1`.
    pub fn exports_services(self) -> bool {
        self != EndpointSlicesExportMode::EndpointSlicesOnly
    }

    /// Whether a reader should watch (and prefer) `cilium/state/endpointslices/v1`.
    pub fn exports_endpoint_slices(self) -> bool {
        self != EndpointSlicesExportMode::Unset
    }
}

impl Capabilities {
    /// [`Capabilities::endpoint_slices_export_mode`], parsed.
    pub fn export_mode(&self) -> crate::Result<EndpointSlicesExportMode> {
        EndpointSlicesExportMode::parse(&self.endpoint_slices_export_mode)
    }
}

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
    fn export_mode() {
        // clusterconfig-endpointslices-only.txtar, compact.
        let c = ClusterConfig::decode(
            br#"{"id":5,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#,
        )
        .unwrap();
        let mode = c.capabilities.export_mode().unwrap();
        assert_eq!(mode, EndpointSlicesExportMode::EndpointSlicesOnly);
        assert!(!mode.exports_services() && mode.exports_endpoint_slices());
        assert_eq!(
            String::from_utf8(c.encode()).unwrap(),
            r#"{"id":5,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false,"endpointSlicesExportMode":"endpointslices-only"}}"#
        );
        for m in [
            EndpointSlicesExportMode::Unset,
            EndpointSlicesExportMode::ServicesAndEndpointSlices,
            EndpointSlicesExportMode::EndpointSlicesOnly,
        ] {
            assert_eq!(EndpointSlicesExportMode::parse(m.as_str()).unwrap(), m);
        }
        assert!(ClusterConfig::default()
            .capabilities
            .export_mode()
            .unwrap()
            .exports_services());
        let err = EndpointSlicesExportMode::parse("only-endpointslice").unwrap_err();
        assert!(err.to_string().contains("only-endpointslice"), "{err}");
    }

    #[test]
    fn decode_errors_name_the_type() {
        let err = ClusterConfig::decode(b"{\"id\":-1}").unwrap_err();
        assert!(err.to_string().contains("ClusterConfig"), "{err}");
        assert!(ClusterConfig::decode(b"null").is_err());
    }
}
