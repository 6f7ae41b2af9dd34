//! One flow as the UI keeps and sends it: serialised once, when it arrives, into the JSON of
//! `clustermesh observe -o json` (Hubble's field names) plus the agent it came from and a
//! sequence number, beside the few keys filters need.
//!
//! Serialising once is what lets one flow go to every browser without being encoded per
//! client. It must not filter or aggregate.

use clustermesh_observer_api as api;
use serde::Serialize;

use super::filter::Keys;
use crate::observe;

/// A flow ready to be filtered and sent (its sequence number is in the JSON).
#[derive(Debug)]
pub struct Entry {
    /// What filters look at.
    pub keys: Keys,
    /// The flow's JSON object.
    pub json: Box<str>,
}

#[derive(Serialize)]
struct EndpointJson<'a> {
    #[serde(rename = "IP")]
    ip: &'a str,
    port: u32,
    identity: u32,
    labels: &'a [String],
    cluster_name: &'a str,
    namespace: &'a str,
    pod_name: &'a str,
}

impl<'a> EndpointJson<'a> {
    fn of(e: &'a api::Endpoint) -> Self {
        Self {
            ip: &e.ip,
            port: e.port,
            identity: e.identity,
            labels: &e.labels,
            cluster_name: &e.cluster,
            namespace: &e.namespace,
            pod_name: &e.pod_name,
        }
    }
}

#[derive(Serialize)]
struct L4Json<'a> {
    protocol: &'a str,
    tcp_flags: Vec<&'static str>,
}

/// `observe::json`'s object, borrowed instead of built as a `Value` (one allocation per
/// flow instead of dozens), plus `node` and `seq`.
#[derive(Serialize)]
struct FlowJson<'a> {
    time: String,
    verdict: &'static str,
    drop_reason_desc: &'a str,
    source: Option<EndpointJson<'a>>,
    destination: Option<EndpointJson<'a>>,
    l4: L4Json<'a>,
    traffic_direction: String,
    node_name: &'a str,
    policy_match: &'a str,
    observation_point: &'a str,
    /// `<cluster>/<node>` of the agent that reported it (agents name nodes within their
    /// cluster only).
    node: &'a str,
    seq: u64,
}

/// Builds the entry of `f`, reported by the agent of `node` (`c1/n1`).
pub fn entry(seq: u64, node: &str, f: &api::Flow) -> Entry {
    let j = FlowJson {
        time: observe::time(f.time_unix_nanos, true),
        verdict: observe::verdict(f),
        drop_reason_desc: &f.drop_reason_desc,
        source: f.source.as_ref().map(EndpointJson::of),
        destination: f.destination.as_ref().map(EndpointJson::of),
        l4: L4Json {
            protocol: &f.protocol,
            tcp_flags: observe::tcp_flags(f.tcp_flags),
        },
        traffic_direction: f.traffic_direction.to_uppercase(),
        node_name: &f.node_name,
        policy_match: &f.policy_match,
        observation_point: &f.observation_point,
        node,
        seq,
    };
    Entry {
        keys: Keys::of(f),
        // Serialising plain strings and numbers cannot fail.
        json: serde_json::to_string(&j)
            .unwrap_or_else(|_| String::from("{}"))
            .into_boxed_str(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A flow like the lab's: `src` (cluster, pod, identity) → `dst`, with a label that
    /// a user could have written.
    pub fn flow(src: (&str, &str, u32), dst: (&str, &str, u32), dropped: bool) -> api::Flow {
        let ep = |(c, p, id): (&str, &str, u32), ip: &str, port| api::Endpoint {
            ip: ip.into(),
            port,
            identity: id,
            labels: vec![
                "k8s:app=echo".into(),
                format!("k8s:instance={p}"),
                format!("k8s:io.cilium.k8s.policy.cluster={c}"),
                "k8s:note=<script>alert(1)</script>".into(),
            ],
            cluster: c.into(),
            namespace: "default".into(),
            pod_name: p.into(),
        };
        api::Flow {
            time_unix_nanos: 1_795_000_000_123_000_000,
            source: Some(ep(src, "10.1.1.11", 40000)),
            destination: Some(ep(dst, "10.2.1.11", 8080)),
            protocol: "TCP".into(),
            tcp_flags: 0x02,
            verdict: if dropped {
                api::Verdict::Dropped
            } else {
                api::Verdict::Forwarded
            } as i32,
            drop_reason: if dropped { 133 } else { 0 },
            drop_reason_desc: if dropped { "POLICY_DENIED" } else { "" }.into(),
            traffic_direction: "ingress".into(),
            node_name: "n1".into(),
            policy_match: "none".into(),
            observation_point: "from-overlay".into(),
            ..Default::default()
        }
    }

    #[test]
    fn entry_json_is_observes_json_plus_node_and_seq() {
        let f = flow(("c1", "echo-2-1", 65538), ("c2", "echo-1-1", 131073), true);
        let e = entry(7, "c2/n1", &f);
        let mut got: serde_json::Value = serde_json::from_str(&e.json).unwrap();
        assert_eq!(got["node"], "c2/n1");
        assert_eq!(got["seq"], 7);
        let obj = got.as_object_mut().unwrap();
        obj.remove("node");
        obj.remove("seq");
        assert_eq!(got, observe::json(&f));
        assert_eq!(&*e.keys.src.cluster, "c1");
        assert_eq!(&*e.keys.dst.pod, "echo-1-1");
        // Labels are data, kept verbatim (the page renders them as text).
        assert!(e.json.contains("<script>alert(1)</script>"));
    }
}
