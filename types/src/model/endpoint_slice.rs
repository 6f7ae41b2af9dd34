//! `ClusterEndpointSlice` at `cilium/state/endpointslices/v1/<cluster>/<ns>/<name>`
//! ("ClusterMesh service v2", Cilium 1.20).
//!
//! Upstream stores this value as zstd-compressed protobuf and shows it as JSON only when
//! transcoding (`cilium-dbg kvstore`); the conformance files (`endpointslices.txtar`) fix
//! that JSON form, and that is what is stored here: fields in the order `cluster`,
//! `clusterID`, `namespace`, `name`, `labels`, `addressType`, `endpoints`, `ports`; per
//! endpoint `addresses`, `conditions`, `hostname`, `nodeName`, `zone`, `hints`, absent
//! optional fields omitted; a port always has `name` (`""` when unnamed), `protocol` and
//! `port`.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::de::null_default;
use super::json_value;
use super::ForZone;
use crate::{Error, Result};

/// One EndpointSlice of a global, shared service, as one cluster exports it.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSlice {
    /// Exporting cluster.
    #[serde(default, deserialize_with = "null_default")]
    pub cluster: String,
    /// Exporting cluster's ID.
    #[serde(rename = "clusterID", default, deserialize_with = "null_default")]
    pub cluster_id: u32,
    /// Namespace of the slice (and of its service).
    #[serde(default, deserialize_with = "null_default")]
    pub namespace: String,
    /// Name of the slice (not of the service: that is the `kubernetes.io/service-name`
    /// label).
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// The slice's labels (`kubernetes.io/service-name` among them).
    #[serde(
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub labels: BTreeMap<String, String>,
    /// `IPv4` or `IPv6`.
    #[serde(default, deserialize_with = "null_default")]
    pub address_type: String,
    /// The endpoints.
    #[serde(default, deserialize_with = "null_default")]
    pub endpoints: Vec<Endpoint>,
    /// The ports every endpoint serves.
    #[serde(default, deserialize_with = "null_default")]
    pub ports: Vec<Port>,
}

/// One endpoint of a slice.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Its addresses (all of the slice's address type).
    #[serde(default, deserialize_with = "null_default")]
    pub addresses: Vec<String>,
    /// Ready/serving/terminating, each omitted when unknown.
    #[serde(default, deserialize_with = "null_default")]
    pub conditions: Conditions,
    /// Host name (headless services).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Node it runs on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Zone it runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Topology hints.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hints: Option<Hints>,
}

/// Kubernetes `EndpointConditions`.
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Conditions {
    /// Ready to receive traffic; unknown counts as ready, as in Kubernetes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<bool>,
    /// Serving (may be terminating).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving: Option<bool>,
    /// Terminating.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminating: Option<bool>,
}

impl Conditions {
    /// Whether the endpoint takes new connections (Kubernetes: a missing `ready` is ready).
    pub fn is_ready(&self) -> bool {
        self.ready.unwrap_or(true)
    }
}

/// Kubernetes `EndpointHints`.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Hints {
    /// Zones that should consume this endpoint.
    #[serde(default, deserialize_with = "null_default")]
    pub for_zones: Vec<ForZone>,
}

/// Kubernetes `EndpointPort` with every field written.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Default)]
#[serde(rename_all = "camelCase")]
pub struct Port {
    /// Port name; `""` for the single unnamed port of a service.
    #[serde(default, deserialize_with = "null_default")]
    pub name: String,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(default, deserialize_with = "null_default")]
    pub protocol: String,
    /// Port number.
    #[serde(default, deserialize_with = "null_default")]
    pub port: u16,
    /// Application protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

json_value!(EndpointSlice);

/// The label naming a slice's service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

impl EndpointSlice {
    /// Cilium's rules: cluster, namespace and name set; the address type is IPv4 or IPv6;
    /// every address parses as that family.
    pub fn validate(&self) -> Result<()> {
        let invalid = |reason: String| Error::InvalidValue {
            kind: "EndpointSlice",
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
        let v4 = match self.address_type.as_str() {
            "IPv4" => true,
            "IPv6" => false,
            other => {
                return Err(invalid(format!(
                    "address type {other:?} is neither IPv4 nor IPv6"
                )))
            }
        };
        for address in self.endpoints.iter().flat_map(|e| &e.addresses) {
            match address.parse::<IpAddr>() {
                Ok(ip) if ip.is_ipv4() == v4 => {}
                Ok(_) => {
                    return Err(invalid(format!(
                        "address {address:?} is not {}",
                        self.address_type
                    )))
                }
                Err(_) => return Err(invalid(format!("{address:?} is not an ip address"))),
            }
        }
        Ok(())
    }

    /// The service the slice belongs to (its `kubernetes.io/service-name` label).
    pub fn service_name(&self) -> Option<&str> {
        self.labels.get(SERVICE_NAME_LABEL).map(String::as_str)
    }

    /// The kvstore key suffix `<cluster>/<namespace>/<name>`.
    pub fn key_name(&self) -> String {
        format!("{}/{}/{}", self.cluster, self.namespace, self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `endpointslices-1.expected` (endpointslices.txtar), compact.
    const UPSTREAM: &str = r#"{"cluster":"cluster3","clusterID":3,"namespace":"test","name":"echo-kvlm2","labels":{"kubernetes.io/service-name":"echo"},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.1"],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"nodeport-worker","zone":"zone1","hints":{"forZones":[{"name":"zone1"}]}},{"addresses":["10.244.1.2"],"conditions":{"ready":false,"serving":false,"terminating":false},"nodeName":"nodeport-worker"}],"ports":[{"name":"http","protocol":"TCP","port":8080}]}"#;

    #[test]
    fn round_trips_byte_for_byte() {
        let slice = EndpointSlice::decode(UPSTREAM.as_bytes()).unwrap();
        assert_eq!(slice.cluster_id, 3);
        assert_eq!(slice.service_name(), Some("echo"));
        assert!(slice.endpoints[0].conditions.is_ready());
        assert!(!slice.endpoints[1].conditions.is_ready());
        assert_eq!(String::from_utf8(slice.encode()).unwrap(), UPSTREAM);
        slice.validate().unwrap();
    }

    #[test]
    fn unnamed_port_and_empty_fields() {
        let slice = EndpointSlice {
            cluster: "c".into(),
            cluster_id: 1,
            namespace: "n".into(),
            name: "s".into(),
            address_type: "IPv6".into(),
            ports: vec![Port {
                name: String::new(),
                protocol: "TCP".into(),
                port: 80,
                app_protocol: None,
            }],
            ..Default::default()
        };
        assert_eq!(
            String::from_utf8(slice.encode()).unwrap(),
            r#"{"cluster":"c","clusterID":1,"namespace":"n","name":"s","addressType":"IPv6","endpoints":[],"ports":[{"name":"","protocol":"TCP","port":80}]}"#
        );
        let null = EndpointSlice::decode(
            br#"{"cluster":"c","clusterID":null,"labels":null,"endpoints":null,"ports":[{"name":null,"port":80}]}"#,
        )
        .unwrap();
        assert_eq!(null.ports[0].name, "");
        assert!(null.endpoints.is_empty());
    }

    #[test]
    fn validation_names_the_broken_rule() {
        let ok = EndpointSlice::decode(UPSTREAM.as_bytes()).unwrap();
        let mut s = ok.clone();
        s.namespace.clear();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("namespace is unset"));
        let mut s = ok.clone();
        s.address_type = "FQDN".into();
        assert!(s.validate().unwrap_err().to_string().contains("FQDN"));
        let mut s = ok.clone();
        s.endpoints[0].addresses[0] = "fd00::1".into();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("is not IPv4"));
        let mut s = ok;
        s.endpoints[1].addresses.push("10.0.0.300".into());
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("not an ip address"));
        assert!(EndpointSlice::decode(b"{\"endpoints\":{}}").is_err());
    }
}
