//! `MCSAPIServiceSpec` at `cilium/state/serviceexports/v1/<cluster>/<ns>/<name>`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::de::null_default;
use super::{json_value, parse_rfc3339};
use crate::{Error, Result};

/// An MCS-API service export (Cilium `MCSAPIServiceSpec`).
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExport {
    /// Exporting cluster.
    #[serde(default, deserialize_with = "null_default")]
    pub cluster: String,
    /// Service name.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// Namespace.
    #[serde(default, deserialize_with = "null_default")]
    pub namespace: String,
    /// `exportedAnnotations` of the ServiceExport.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub annotations: BTreeMap<String, String>,
    /// `exportedLabels` of the ServiceExport.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339 creation time of the ServiceExport (oldest wins conflicts).
    /// `""` is the zero time, written as `null` like Go's `metav1.Time`.
    #[serde(default, serialize_with = "time_ser", deserialize_with = "time_de")]
    pub export_creation_timestamp: String,
    /// Service ports.
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<ServiceExportPort>,
    /// `ClusterSetIP` or `Headless`.
    #[serde(rename = "type", default, deserialize_with = "null_default")]
    pub type_: String,
    /// `ClientIP`, `None` or `""`; always written.
    #[serde(default, deserialize_with = "null_default")]
    pub session_affinity: String,
    /// Session affinity settings, omitted when `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// `IPv4` / `IPv6`.
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub ip_families: Vec<String>,
    /// `Cluster` or `Local`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal_traffic_policy: Option<String>,
    /// `PreferClose`, `PreferSameZone`, `PreferSameNode`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_distribution: Option<String>,
}

/// A port in MCS-API form (`mcsapiv1alpha1.ServicePort`).
///
/// Field order follows the Go struct: name, protocol, appProtocol, port.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ServiceExportPort {
    /// Port name (omitted when empty).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub name: String,
    /// `TCP`, `UDP`, `SCTP` (omitted when empty).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "String::is_empty"
    )]
    pub protocol: String,
    /// Application protocol hint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
    /// Port number.
    #[serde(default, deserialize_with = "null_default")]
    pub port: i32,
}

/// Kubernetes `SessionAffinityConfig`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct SessionAffinityConfig {
    /// Client-IP affinity settings.
    #[serde(rename = "clientIP", default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<ClientIpConfig>,
}

/// Kubernetes `ClientIPConfig`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// Affinity timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<i32>,
}

fn time_ser<S: Serializer>(t: &str, s: S) -> Result<S::Ok, S::Error> {
    if t.is_empty() {
        s.serialize_none()
    } else {
        s.serialize_str(t)
    }
}

fn time_de<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let t: String = null_default(d)?;
    if !t.is_empty() {
        parse_rfc3339(&t).map_err(serde::de::Error::custom)?;
    }
    Ok(t)
}

/// Pre-v1.19 writers used Go-cased `Labels`/`Annotations` keys; read them as a fallback.
#[derive(Deserialize, Default)]
struct Legacy {
    #[serde(rename = "Annotations", default, deserialize_with = "null_default")]
    annotations: BTreeMap<String, String>,
    #[serde(rename = "Labels", default, deserialize_with = "null_default")]
    labels: BTreeMap<String, String>,
}

json_value!(ServiceExport, |mut v: ServiceExport,
                            bytes: &[u8]|
 -> Result<ServiceExport> {
    if v.annotations.is_empty() || v.labels.is_empty() {
        // The main decode succeeded, so the bytes are a JSON object; a legacy
        // field of the wrong type is ignored rather than failing the value.
        let legacy: Legacy = serde_json::from_slice(bytes).unwrap_or_default();
        if v.annotations.is_empty() {
            v.annotations = legacy.annotations;
        }
        if v.labels.is_empty() {
            v.labels = legacy.labels;
        }
    }
    Ok(v)
});

impl ServiceExport {
    /// Cilium's checks: cluster, namespace, name and creation time set; known
    /// type, session affinity (`""` allowed), traffic policy and distribution.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::InvalidValue {
            kind: "ServiceExport",
            reason,
        };
        for (field, value) in [
            ("cluster", &self.cluster),
            ("namespace", &self.namespace),
            ("name", &self.name),
            ("exportCreationTimestamp", &self.export_creation_timestamp),
        ] {
            if value.is_empty() {
                return Err(invalid(format!("{field} is unset")));
            }
        }
        if !matches!(self.type_.as_str(), "ClusterSetIP" | "Headless") {
            return Err(invalid(format!("type is unknown: {:?}", self.type_)));
        }
        if !matches!(self.session_affinity.as_str(), "" | "ClientIP" | "None") {
            return Err(invalid(format!(
                "session affinity is unknown: {:?}",
                self.session_affinity
            )));
        }
        if let Some(p) = &self.internal_traffic_policy {
            if !matches!(p.as_str(), "Cluster" | "Local") {
                return Err(invalid(format!(
                    "internal traffic policy is unknown: {p:?}"
                )));
            }
        }
        if let Some(t) = &self.traffic_distribution {
            if !matches!(
                t.as_str(),
                "PreferClose" | "PreferSameZone" | "PreferSameNode"
            ) {
                return Err(invalid(format!("traffic distribution is unknown: {t:?}")));
            }
        }
        Ok(())
    }

    /// The kvstore key suffix `<cluster>/<namespace>/<name>`.
    pub fn key_name(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}
