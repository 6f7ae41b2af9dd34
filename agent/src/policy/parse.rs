//! The L3/L4 subset of CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy and Kubernetes
//! NetworkPolicy, as exported whole (JSON) under `clustermesh/local/v1/policies/`, turned
//! into flat [`Rule`]s over [`Selector`]s.
//!
//! Scoping follows Cilium: a namespaced policy selects subjects in its namespace and, when a
//! peer selector names no namespace, peers in its namespace too; every subject is in the
//! local cluster (only local endpoints enforce); a peer selector without
//! `io.cilium.k8s.policy.cluster` matches the local cluster only when
//! `policy_default_local_cluster` is set (Cilium ≥ 1.19's default).
//!
//! Not supported (ignored, counted in [`Parsed::ignored`]): CIDR and FQDN peers, entities
//! other than `all`/`world`-less `cluster`, named ports, port ranges, L7 rules, deny rules.

use clustermesh_types::identity::{CLUSTER_LABEL, NAMESPACE_LABEL};
use serde_json::Value;

use super::selector::{Op, Requirement, Selector};
use super::{Direction, Error, Result};

/// Prefix of the namespace-label labels Cilium puts on identities.
const NAMESPACE_LABELS: &str = "io.cilium.k8s.namespace.labels.";

/// A peer of a rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Peer {
    /// Any peer, including `world` (identity wildcard 0 in the map).
    Any,
    /// The identities a selector matches.
    Selector(Selector),
}

/// A protocol and destination port; 0 = any.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortProto {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP), 0 = any.
    pub proto: u8,
    /// Destination port, host order, 0 = any.
    pub port: u16,
}

/// One allow rule: `subject` may talk to / hear from `peer` on `ports`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// The local endpoints the rule applies to.
    pub subject: Selector,
    /// Ingress (peer → subject) or egress (subject → peer).
    pub direction: Direction,
    /// Who.
    pub peer: Peer,
    /// Allowed ports; empty = every port and protocol.
    pub ports: Vec<PortProto>,
}

/// A parsed policy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// `(subject, direction)` pairs the policy turns to default-deny.
    pub enforce: Vec<(Selector, Direction)>,
    /// Allow rules.
    pub rules: Vec<Rule>,
    /// Constructs not supported and skipped.
    pub ignored: Vec<String>,
}

/// How selectors are scoped.
#[derive(Clone, Debug)]
pub struct Scope<'a> {
    /// The local cluster's name.
    pub local_cluster: &'a str,
    /// A peer selector without the cluster label matches the local cluster only.
    pub default_local_cluster: bool,
}

/// Parses one exported policy (`kind` = `CiliumNetworkPolicy`,
/// `CiliumClusterwideNetworkPolicy` or `NetworkPolicy`).
pub fn parse(kind: &str, raw: &[u8], scope: &Scope<'_>) -> Result<Parsed> {
    let v: Value = serde_json::from_slice(raw).map_err(|e| Error::Parse {
        policy: kind.to_owned(),
        reason: e.to_string(),
    })?;
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_owned();
    let ns = v
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty());
    let err = |reason: String| Error::Parse {
        policy: format!(
            "{kind}/{}{name}",
            ns.map(|n| format!("{n}/")).unwrap_or_default()
        ),
        reason,
    };
    let mut out = Parsed::default();
    match kind {
        "CiliumNetworkPolicy" | "CiliumClusterwideNetworkPolicy" => {
            let ns = if kind == "CiliumNetworkPolicy" {
                ns
            } else {
                None
            };
            let mut specs: Vec<&Value> = Vec::new();
            if let Some(s) = v.get("spec") {
                specs.push(s);
            }
            if let Some(Value::Array(a)) = v.get("specs") {
                specs.extend(a.iter());
            }
            for spec in specs {
                cilium_spec(spec, ns, scope, &mut out).map_err(err)?;
            }
        }
        "NetworkPolicy" => {
            let spec = v.get("spec").ok_or_else(|| err("no spec".into()))?;
            k8s_spec(spec, ns.unwrap_or("default"), scope, &mut out).map_err(err)?;
        }
        other => return Err(err(format!("unsupported kind {other}"))),
    }
    Ok(out)
}

/// A Kubernetes `LabelSelector` object; `prefix` is prepended to every key (namespace
/// labels), `map` renames keys.
fn label_selector(
    v: &Value,
    key: &dyn Fn(&str) -> String,
) -> std::result::Result<Selector, String> {
    let mut reqs = Vec::new();
    if let Some(m) = v.get("matchLabels") {
        let m = m.as_object().ok_or("matchLabels is not a map")?;
        for (k, val) in m {
            let val = val
                .as_str()
                .ok_or_else(|| format!("matchLabels.{k} is not a string"))?;
            reqs.push(Requirement::new(&key(k), Op::In(vec![val.to_owned()])));
        }
    }
    if let Some(exprs) = v.get("matchExpressions") {
        for e in exprs.as_array().ok_or("matchExpressions is not a list")? {
            let k = e
                .get("key")
                .and_then(Value::as_str)
                .ok_or("expression without key")?;
            let values: Vec<String> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let op = match e.get("operator").and_then(Value::as_str) {
                Some("In") => Op::In(values),
                Some("NotIn") => Op::NotIn(values),
                Some("Exists") => Op::Exists,
                Some("DoesNotExist") => Op::DoesNotExist,
                other => return Err(format!("unsupported operator {other:?}")),
            };
            reqs.push(Requirement::new(&key(k), op));
        }
    }
    Ok(Selector::new(reqs))
}

fn plain(k: &str) -> String {
    k.to_owned()
}

fn subject(sel: Selector, ns: Option<&str>, scope: &Scope<'_>) -> Selector {
    let sel = match ns {
        Some(ns) => sel.with_eq(&format!("k8s:{NAMESPACE_LABEL}"), ns),
        None => sel,
    };
    sel.with_eq(&format!("k8s:{CLUSTER_LABEL}"), scope.local_cluster)
}

fn peer_scope(mut sel: Selector, ns: Option<&str>, scope: &Scope<'_>) -> Selector {
    if let Some(ns) = ns {
        if !sel.mentions(NAMESPACE_LABEL) {
            sel = sel.with_eq(&format!("k8s:{NAMESPACE_LABEL}"), ns);
        }
    }
    if scope.default_local_cluster && !sel.mentions(CLUSTER_LABEL) {
        sel = sel.with_eq(&format!("k8s:{CLUSTER_LABEL}"), scope.local_cluster);
    }
    sel
}

fn proto(s: Option<&str>) -> std::result::Result<u8, String> {
    Ok(match s.map(str::to_ascii_uppercase).as_deref() {
        None | Some("TCP") => 6,
        Some("UDP") => 17,
        Some("SCTP") => 132,
        Some("ANY") => 0,
        Some(o) => return Err(format!("unsupported protocol {o}")),
    })
}

/// A port as a number or numeric string; `Ok(None)` for a named port (unsupported).
fn port(v: Option<&Value>) -> std::result::Result<Option<u16>, String> {
    match v {
        None => Ok(Some(0)),
        Some(Value::Number(n)) => n
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| format!("port {n} out of range")),
        Some(Value::String(s)) => match s.parse::<u16>() {
            Ok(p) => Ok(Some(p)),
            Err(_) => Ok(None),
        },
        Some(o) => Err(format!("port {o} is not a number")),
    }
}

fn cilium_spec(
    spec: &Value,
    ns: Option<&str>,
    scope: &Scope<'_>,
    out: &mut Parsed,
) -> std::result::Result<(), String> {
    let Some(es) = spec.get("endpointSelector") else {
        out.ignored
            .push("spec without endpointSelector (nodeSelector)".into());
        return Ok(());
    };
    let subj = subject(label_selector(es, &plain)?, ns, scope);
    for (dir, field, peers_field, entities_field) in [
        (
            Direction::Ingress,
            "ingress",
            "fromEndpoints",
            "fromEntities",
        ),
        (Direction::Egress, "egress", "toEndpoints", "toEntities"),
    ] {
        let Some(rules) = spec.get(field) else {
            continue;
        };
        let rules = rules
            .as_array()
            .ok_or_else(|| format!("{field} is not a list"))?;
        out.enforce.push((subj.clone(), dir));
        for r in rules {
            for unsupported in [
                "fromCIDR",
                "fromCIDRSet",
                "toCIDR",
                "toCIDRSet",
                "toFQDNs",
                "toServices",
            ] {
                if r.get(unsupported).is_some() {
                    out.ignored.push(format!("{field}.{unsupported}"));
                }
            }
            let mut peers = Vec::new();
            if let Some(eps) = r.get(peers_field) {
                for e in eps
                    .as_array()
                    .ok_or_else(|| format!("{peers_field} is not a list"))?
                {
                    peers.push(Peer::Selector(peer_scope(
                        label_selector(e, &plain)?,
                        ns,
                        scope,
                    )));
                }
            }
            if let Some(ents) = r.get(entities_field).and_then(Value::as_array) {
                for e in ents {
                    match e.as_str() {
                        Some("all") => peers.push(Peer::Any),
                        Some("cluster") => peers.push(Peer::Selector(
                            Selector::default()
                                .with_eq(&format!("k8s:{CLUSTER_LABEL}"), scope.local_cluster),
                        )),
                        other => out.ignored.push(format!("{entities_field} {other:?}")),
                    }
                }
            }
            let mut ports = Vec::new();
            let mut named = false;
            if let Some(tps) = r.get("toPorts").and_then(Value::as_array) {
                for tp in tps {
                    if tp.get("rules").is_some() {
                        out.ignored.push("L7 rules (enforced as L4)".into());
                    }
                    for p in tp
                        .get("ports")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                    {
                        if p.get("endPort").is_some() {
                            out.ignored.push("endPort".into());
                        }
                        match port(p.get("port"))? {
                            Some(port) => ports.push(PortProto {
                                proto: proto(p.get("protocol").and_then(Value::as_str))?,
                                port,
                            }),
                            None => named = true,
                        }
                    }
                }
            }
            if named {
                out.ignored.push("named ports".into());
                if ports.is_empty() {
                    continue; // allows nothing we can express
                }
            }
            let has_l3 = r.get(peers_field).is_some() || r.get(entities_field).is_some();
            if !has_l3 && !ports.is_empty() {
                // L4-only rule: from anywhere on these ports.
                peers.push(Peer::Any);
            }
            ports.sort();
            ports.dedup();
            for peer in peers {
                out.rules.push(Rule {
                    subject: subj.clone(),
                    direction: dir,
                    peer,
                    ports: ports.clone(),
                });
            }
        }
    }
    Ok(())
}

fn namespace_key(k: &str) -> String {
    if k == "kubernetes.io/metadata.name" {
        format!("k8s:{NAMESPACE_LABEL}")
    } else {
        format!("k8s:{NAMESPACE_LABELS}{k}")
    }
}

fn k8s_spec(
    spec: &Value,
    ns: &str,
    scope: &Scope<'_>,
    out: &mut Parsed,
) -> std::result::Result<(), String> {
    let empty = Value::Object(Default::default());
    let ps = spec.get("podSelector").unwrap_or(&empty);
    let subj = subject(
        label_selector(ps, &|k| format!("k8s:{k}"))?,
        Some(ns),
        scope,
    );
    let types: Vec<String> = match spec.get("policyTypes").and_then(Value::as_array) {
        Some(t) => t
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        None => {
            let mut t = vec!["Ingress".to_owned()];
            if spec.get("egress").is_some() {
                t.push("Egress".into());
            }
            t
        }
    };
    for (dir, field, peers_field) in [
        (Direction::Ingress, "ingress", "from"),
        (Direction::Egress, "egress", "to"),
    ] {
        let ty = if dir == Direction::Ingress {
            "Ingress"
        } else {
            "Egress"
        };
        if !types.iter().any(|t| t == ty) {
            continue;
        }
        out.enforce.push((subj.clone(), dir));
        let rules = spec
            .get(field)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for r in &rules {
            let mut ports = Vec::new();
            let mut named = false;
            for p in r
                .get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if p.get("endPort").is_some() {
                    out.ignored.push("endPort".into());
                }
                match port(p.get("port"))? {
                    Some(port) => ports.push(PortProto {
                        proto: proto(p.get("protocol").and_then(Value::as_str))?,
                        port,
                    }),
                    None => named = true,
                }
            }
            if named {
                out.ignored.push("named ports".into());
                if ports.is_empty() {
                    continue;
                }
            }
            ports.sort();
            ports.dedup();
            let peers_v = r.get(peers_field).and_then(Value::as_array);
            let mut peers = Vec::new();
            match peers_v {
                None => peers.push(Peer::Any),
                Some(list) if list.is_empty() => peers.push(Peer::Any),
                Some(list) => {
                    for p in list {
                        if p.get("ipBlock").is_some() {
                            out.ignored.push("ipBlock".into());
                            continue;
                        }
                        let pod = match p.get("podSelector") {
                            Some(s) => label_selector(s, &|k| format!("k8s:{k}"))?,
                            None => Selector::default(),
                        };
                        let sel = match p.get("namespaceSelector") {
                            // Namespace labels are on identities as
                            // io.cilium.k8s.namespace.labels.<key> (name: the namespace label).
                            Some(n) => {
                                let nsel = label_selector(n, &namespace_key)?;
                                let mut reqs = pod.requirements;
                                reqs.extend(nsel.requirements);
                                // An empty namespace selector means every namespace: make
                                // sure the namespace default does not narrow it.
                                reqs.push(Requirement::new(
                                    &format!("k8s:{NAMESPACE_LABEL}"),
                                    Op::Exists,
                                ));
                                Selector::new(reqs)
                            }
                            None => pod.with_eq(&format!("k8s:{NAMESPACE_LABEL}"), ns),
                        };
                        peers.push(Peer::Selector(peer_scope(sel, None, scope)));
                    }
                }
            }
            for peer in peers {
                out.rules.push(Rule {
                    subject: subj.clone(),
                    direction: dir,
                    peer,
                    ports: ports.clone(),
                });
            }
        }
    }
    Ok(())
}
