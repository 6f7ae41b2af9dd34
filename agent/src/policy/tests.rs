use std::sync::Arc;

use clustermesh_types::identity::{Identity, LabelArray};
use clustermesh_types::model::{IpIdentityPair, IpcacheEntry};

use super::gate::Gate;
use super::*;
use crate::input::Input;
use crate::reconcile::{Desired, Prefix};

fn labels(app: &str, ns: &str, cluster: &str) -> LabelArray {
    LabelArray::parse_kvstore(&format!(
        "k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace={ns};"
    ))
    .expect("labels")
}

fn engine(default_local: bool) -> Engine {
    Engine::new(Config {
        local_cluster: "c2".into(),
        default_local_cluster: default_local,
    })
}

const FRONTEND_C1: u32 = 1001;
const OTHER_C1: u32 = 1002;
const FRONTEND_C2: u32 = 2001;
const BACKEND_C2: u32 = 2002;

fn seed(e: &mut Engine) {
    e.on_identity(
        "c1",
        FRONTEND_C1,
        Some(&labels("frontend", "default", "c1")),
    );
    e.on_identity("c1", OTHER_C1, Some(&labels("other", "default", "c1")));
    e.on_identity(
        "c2",
        FRONTEND_C2,
        Some(&labels("frontend", "default", "c2")),
    );
    e.on_identity("c2", BACKEND_C2, Some(&labels("backend", "default", "c2")));
}

const CNP_FROM_C1: &str = r#"{"apiVersion":"cilium.io/v2","kind":"CiliumNetworkPolicy",
 "metadata":{"name":"allow-c1-frontend","namespace":"default"},
 "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
  "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend","io.cilium.k8s.policy.cluster":"c1"}}],
              "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

#[test]
fn cross_cluster_cnp_admits_only_the_selected_cluster_and_port() {
    let mut e = engine(true);
    seed(&mut e);
    e.on_policy_json("p", "CiliumNetworkPolicy", Some(CNP_FROM_C1.as_bytes()))
        .expect("parse");
    let ing = Direction::Ingress;
    assert!(e.allows(BACKEND_C2, FRONTEND_C1, ing, 6, 8080));
    assert!(
        !e.allows(BACKEND_C2, FRONTEND_C1, ing, 6, 9090),
        "other port"
    );
    assert!(
        !e.allows(BACKEND_C2, FRONTEND_C1, ing, 17, 8080),
        "other protocol"
    );
    assert!(!e.allows(BACKEND_C2, OTHER_C1, ing, 6, 8080), "other app");
    assert!(
        !e.allows(BACKEND_C2, FRONTEND_C2, ing, 6, 8080),
        "local frontend: cluster c1 only"
    );
    // Egress is not selected: allow-all.
    assert!(e.allows(BACKEND_C2, OTHER_C1, Direction::Egress, 6, 1));
    // Endpoints the policy does not select stay allow-all.
    assert!(e.allows(FRONTEND_C2, OTHER_C1, ing, 6, 1));
    let c = e.take_changes();
    assert_eq!(
        c.upsert,
        vec![Entry {
            subject: BACKEND_C2,
            peer: FRONTEND_C1,
            direction: ing,
            proto: 6,
            port: 8080
        }]
    );
    assert_eq!(c.enforce, vec![(BACKEND_C2, Direction::Ingress.flag())]);
    // Deleting the policy restores allow-all and removes the entry.
    e.on_policy("p", None);
    let c = e.take_changes();
    assert_eq!(c.delete.len(), 1);
    assert_eq!(c.enforce, vec![(BACKEND_C2, 0)]);
    assert!(e.allows(BACKEND_C2, OTHER_C1, ing, 6, 1));
}

#[test]
fn selector_without_cluster_label_is_local_only_unless_configured() {
    let policy = r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"p","namespace":"default"},
      "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
              "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend"}}]}]}}"#;
    for (default_local, c1_allowed) in [(true, false), (false, true)] {
        let mut e = engine(default_local);
        seed(&mut e);
        e.on_policy_json("p", "CiliumNetworkPolicy", Some(policy.as_bytes()))
            .expect("parse");
        assert!(e.allows(BACKEND_C2, FRONTEND_C2, Direction::Ingress, 6, 80));
        assert_eq!(
            e.allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 80),
            c1_allowed
        );
    }
}

#[test]
fn identities_arriving_later_are_added_incrementally() {
    let mut e = engine(true);
    e.on_policy_json("p", "CiliumNetworkPolicy", Some(CNP_FROM_C1.as_bytes()))
        .expect("parse");
    assert!(
        e.take_changes().is_empty(),
        "no identities, nothing selected"
    );
    e.on_identity("c2", BACKEND_C2, Some(&labels("backend", "default", "c2")));
    let c = e.take_changes();
    assert_eq!(c.enforce, vec![(BACKEND_C2, 1)]);
    assert!(c.upsert.is_empty());
    // The peer arrives: exactly one new entry.
    e.on_identity(
        "c1",
        FRONTEND_C1,
        Some(&labels("frontend", "default", "c1")),
    );
    let c = e.take_changes();
    assert_eq!(c.upsert.len(), 1);
    assert_eq!(c.upsert[0].peer, FRONTEND_C1);
    // A second frontend in c1 (another identity, e.g. other extra labels).
    e.on_identity("c1", 1003, Some(&labels("frontend", "default", "c1")));
    assert_eq!(e.take_changes().upsert[0].peer, 1003);
    // Relabelled: no longer a frontend → its entry goes.
    e.on_identity("c1", 1003, Some(&labels("other", "default", "c1")));
    let c = e.take_changes();
    assert_eq!(c.delete.len(), 1);
    assert!(c.upsert.is_empty());
    // Deleted peer.
    e.on_identity("c1", FRONTEND_C1, None);
    assert_eq!(e.take_changes().delete[0].peer, FRONTEND_C1);
    assert_eq!(e.entries().count(), 0);
}

#[test]
fn match_expressions_wildcard_ports_and_l4_only_rules() {
    let policy = r#"{"kind":"CiliumClusterwideNetworkPolicy","metadata":{"name":"p"},
      "spec":{"endpointSelector":{"matchExpressions":[{"key":"app","operator":"In","values":["backend","db"]}]},
       "egress":[
         {"toEndpoints":[{"matchExpressions":[{"key":"app","operator":"NotIn","values":["other"]},
                                               {"key":"io.cilium.k8s.policy.cluster","operator":"Exists"}]}]},
         {"toPorts":[{"ports":[{"port":"53","protocol":"UDP"}]}]}]}}"#;
    let mut e = engine(true);
    seed(&mut e);
    e.on_policy_json(
        "p",
        "CiliumClusterwideNetworkPolicy",
        Some(policy.as_bytes()),
    )
    .expect("parse");
    let eg = Direction::Egress;
    assert!(
        e.allows(BACKEND_C2, FRONTEND_C1, eg, 6, 1234),
        "any port to frontend (any cluster)"
    );
    assert!(!e.allows(BACKEND_C2, OTHER_C1, eg, 6, 1234));
    assert!(
        e.allows(BACKEND_C2, OTHER_C1, eg, 17, 53),
        "L4-only rule: anyone on udp/53"
    );
    assert!(e.allows(BACKEND_C2, 2, eg, 17, 53), "world too");
    assert!(!e.allows(BACKEND_C2, 2, eg, 6, 53));
    assert_eq!(e.enforcement(BACKEND_C2), Direction::Egress.flag());
    assert_eq!(e.enforcement(FRONTEND_C2), 0);
}

#[test]
fn kubernetes_network_policy() {
    let policy = r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy",
      "metadata":{"name":"np","namespace":"default"},
      "spec":{"podSelector":{"matchLabels":{"app":"backend"}},"policyTypes":["Ingress"],
       "ingress":[{"from":[{"podSelector":{"matchLabels":{"app":"frontend"}}},
                           {"namespaceSelector":{"matchLabels":{"kubernetes.io/metadata.name":"tools"}}}],
                   "ports":[{"port":8080}]}]}}"#;
    let mut e = engine(true);
    seed(&mut e);
    e.on_identity("c2", 2003, Some(&labels("debug", "tools", "c2")));
    e.on_identity("c2", 2004, Some(&labels("frontend", "other", "c2")));
    e.on_policy_json("np", "NetworkPolicy", Some(policy.as_bytes()))
        .expect("parse");
    let ing = Direction::Ingress;
    assert!(e.allows(BACKEND_C2, FRONTEND_C2, ing, 6, 8080));
    assert!(
        !e.allows(BACKEND_C2, FRONTEND_C1, ing, 6, 8080),
        "remote cluster"
    );
    assert!(!e.allows(BACKEND_C2, 2004, ing, 6, 8080), "other namespace");
    assert!(
        e.allows(BACKEND_C2, 2003, ing, 6, 8080),
        "namespace selector"
    );
    assert!(!e.allows(BACKEND_C2, 2003, ing, 6, 80));
    // Deny-all ingress: selected, nothing allowed.
    let deny = r#"{"kind":"NetworkPolicy","metadata":{"name":"d","namespace":"default"},
      "spec":{"podSelector":{},"policyTypes":["Ingress"]}}"#;
    e.on_policy_json("np", "NetworkPolicy", Some(deny.as_bytes()))
        .expect("parse");
    assert!(!e.allows(FRONTEND_C2, BACKEND_C2, ing, 6, 8080));
    assert!(!e.allows(BACKEND_C2, FRONTEND_C2, ing, 6, 8080));
}

#[test]
fn overlapping_policies_are_reference_counted() {
    let mut e = engine(true);
    seed(&mut e);
    e.on_policy_json("a", "CiliumNetworkPolicy", Some(CNP_FROM_C1.as_bytes()))
        .expect("parse");
    e.on_policy_json("b", "CiliumNetworkPolicy", Some(CNP_FROM_C1.as_bytes()))
        .expect("parse");
    e.take_changes();
    e.on_policy("a", None);
    assert!(e.take_changes().is_empty(), "b still allows the same");
    assert!(e.allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 8080));
    e.on_policy("b", None);
    assert_eq!(e.take_changes().delete.len(), 1);
}

fn pair(ip: &str, host: &str, id: u32, pod: &str) -> Arc<IpcacheEntry> {
    let pair = IpIdentityPair::decode(
        format!(
            r#"{{"IP":"{ip}","HostIP":"{host}","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"{pod}"}}"#
        )
        .as_bytes(),
    )
    .expect("valid entry");
    Arc::new(IpcacheEntry::new(pair).expect("valid entry"))
}

/// The upsert of `entry` by `cluster`.
fn endpoint(cluster: &Arc<str>, entry: Arc<IpcacheEntry>) -> Input {
    Input::Endpoint {
        cluster: cluster.clone(),
        prefix: entry.prefix,
        entry: Some(entry),
    }
}

fn identity(id: u32, labels: LabelArray) -> Option<Arc<Identity>> {
    Some(Arc::new(Identity { id, labels }))
}

/// The ordering guarantee: an ipcache entry delivered before its identity never reaches
/// the maps on its own; it is released in the same step that programs the identity's
/// policy entries, so there is no moment at which the datapath resolves the address to an
/// identity the policy has not seen (the late-identity `world` drop).
#[test]
fn ipcache_entry_before_its_identity_is_held_until_the_policy_knows_it() {
    let c1: Arc<str> = "c1".into();
    let mut e = engine(true);
    let mut gate = Gate::new();
    let mut desired = Desired::new("c2".into(), "198.18.2.11".parse().expect("ip"));
    e.on_identity("c2", BACKEND_C2, Some(&labels("backend", "default", "c2")));
    gate.identity_added(BACKEND_C2);
    e.on_policy_json("p", "CiliumNetworkPolicy", Some(CNP_FROM_C1.as_bytes()))
        .expect("parse");
    e.take_changes();

    // The remote endpoint arrives first.
    let input = endpoint(
        &c1,
        pair("10.1.1.11", "198.18.1.11", FRONTEND_C1, "frontend"),
    );
    assert!(gate.admit(input).is_none(), "held: identity unknown");
    assert_eq!(gate.held(), 1);
    // Nothing reaches the desired ipcache, and no policy entry exists yet.
    let prefix = Prefix {
        addr: "10.1.1.11".parse().expect("ip"),
        bits: 32,
    };
    assert!(!desired.contains(&prefix));
    assert!(!e.allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 8080));

    // A reserved identity (world, host) is never held.
    let world = endpoint(&c1, pair("192.0.2.1", "", 2, ""));
    assert!(gate.admit(world).is_some());

    // The identity arrives: engine first, then the released entry.
    e.on_identity(
        "c1",
        FRONTEND_C1,
        Some(&labels("frontend", "default", "c1")),
    );
    let changes = e.take_changes();
    assert_eq!(changes.upsert.len(), 1, "policy entry for the new identity");
    let released = gate.identity_added(FRONTEND_C1);
    assert_eq!(released.len(), 1);
    for i in released {
        if let Input::Endpoint {
            cluster,
            prefix,
            entry,
        } = i
        {
            desired.apply(&cluster, &prefix, entry.as_deref());
        }
    }
    assert!(desired.contains(&prefix));
    assert_eq!(
        desired.winner(&prefix).map(|c| c.value.sec_identity),
        Some(FRONTEND_C1)
    );
    assert!(e.allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 8080));
    assert_eq!(gate.held(), 0);

    // A held entry deleted before its identity arrives is forgotten.
    let late = pair("10.1.1.12", "198.18.1.11", 1009, "x");
    let prefix = late.prefix;
    assert!(gate.admit(endpoint(&c1, late)).is_none());
    assert!(gate
        .admit(Input::Endpoint {
            cluster: c1,
            prefix,
            entry: None
        })
        .is_some());
    assert_eq!(gate.held(), 0);
    assert!(gate.identity_added(1009).is_empty());
}

/// The agent loop's path: through [`hook::Hook`], an endpoint that arrives before its
/// identity reaches the reconciler only after the identity and its policy entries, and
/// the flow directory learns the identity's labels and the pod's name.
#[test]
fn hook_releases_an_early_endpoint_after_its_identity_and_fills_the_directory() {
    let dir = crate::flows::SharedDirectory::default();
    let mut hook = hook::Hook::new(
        Config {
            local_cluster: "c2".into(),
            default_local_cluster: true,
        },
        None,
        dir.clone(),
    );
    let c1: Arc<str> = "c1".into();
    let c2: Arc<str> = "c2".into();
    let mut out = Vec::new();
    hook.input(
        Input::Identity {
            cluster: c2,
            id: BACKEND_C2,
            labels: identity(BACKEND_C2, labels("backend", "default", "c2")),
        },
        &mut out,
    );
    hook.input(
        Input::Policy {
            key: "CiliumNetworkPolicy/default/p".into(),
            raw: Some(CNP_FROM_C1.as_bytes().to_vec()),
        },
        &mut out,
    );
    hook.flush();
    hook.input(
        endpoint(
            &c1,
            pair("10.1.1.11", "198.18.1.11", FRONTEND_C1, "frontend"),
        ),
        &mut out,
    );
    assert!(out.is_empty(), "held until the identity is known");
    assert_eq!(hook.stats().held, 1);
    assert!(!hook
        .engine()
        .allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 8080));

    hook.input(
        Input::Identity {
            cluster: c1.clone(),
            id: FRONTEND_C1,
            labels: identity(FRONTEND_C1, labels("frontend", "default", "c1")),
        },
        &mut out,
    );
    assert_eq!(out.len(), 1, "released with the identity");
    assert!(matches!(&out[0], Input::Endpoint { entry: Some(p), .. } if p.id == FRONTEND_C1));
    assert!(hook
        .engine()
        .allows(BACKEND_C2, FRONTEND_C1, Direction::Ingress, 6, 8080));
    assert_eq!(hook.stats().held, 0);

    // Flows from that address are enriched with cluster, labels and pod.
    let ev = clustermesh_ebpf_abi::FlowEvent {
        saddr: [10, 1, 1, 11, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        family: clustermesh_ebpf_abi::family::IPV4,
        src_identity: FRONTEND_C1,
        ..Default::default()
    };
    let flow = crate::flows::enrich(&ev, &dir.read().expect("lock"), 0, "n1");
    let src = flow.source.expect("source");
    assert_eq!(src.cluster, "c1");
    assert_eq!(src.pod_name, "frontend");
    assert!(
        src.labels.iter().any(|l| l == "k8s:app=frontend"),
        "{:?}",
        src.labels
    );

    // A policy that stops parsing stops applying; deleting it is harmless.
    out.clear();
    hook.input(
        Input::Policy {
            key: "CiliumNetworkPolicy/default/p".into(),
            raw: Some(b"{not json".to_vec()),
        },
        &mut out,
    );
    assert_eq!(hook.stats().parse_errors, 1);
    assert!(hook
        .engine()
        .allows(BACKEND_C2, OTHER_C1, Direction::Ingress, 6, 8080));
    hook.input(
        Input::Policy {
            key: "CiliumNetworkPolicy/default/p".into(),
            raw: None,
        },
        &mut out,
    );
    assert!(out.is_empty());
}
