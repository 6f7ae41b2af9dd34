//! BPF_PROG_TEST_RUN tests of policy enforcement and flow events: the policy engine's
//! entries written to the real maps, crafted TCP packets through `from_pod`,
//! `from_overlay` and (VXLAN-encapsulated) `from_underlay`, the verdict, the flow events in the ring buffer and the verdict
//! counters, and the connection tracking that lets replies pass (`CM_POLICY_CT`). Needs
//! root (CI runs as root).

use std::net::Ipv4Addr;

use aya::maps::{HashMap, MapData};
use clustermesh_agent::datapath::{Config, Datapath, Program};
use clustermesh_agent::flows::FlowMaps;
use clustermesh_agent::policy::maps::PolicyMaps;
use clustermesh_agent::policy::{Config as PolicyConfig, Direction, Engine};
use clustermesh_ebpf_abi::{
    drop_reason, flow_flags, map, policy_ct, verdict, EndpointInfo, FlowEvent, IpcacheValue,
    PolicyCtKey, PolicyCtValue, PolicyMatch,
};
use clustermesh_types::identity::LabelArray;

mod vxlan_common;
use vxlan_common::Vxlan;

const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 10); // frontend, c2
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 2, 1, 11); // backend, c2
const REMOTE_FRONTEND: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 10); // frontend, c1
const REMOTE_OTHER: Ipv4Addr = Ipv4Addr::new(10, 1, 1, 11); // other, c1
const LOCAL_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 11);
const REMOTE_NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const ID_A: u32 = 2001;
const ID_B: u32 = 2002;
const ID_REMOTE_FRONTEND: u32 = 1001;
const ID_REMOTE_OTHER: u32 = 1002;

struct Node {
    dp: Datapath,
    policy: PolicyMaps,
    flows: FlowMaps,
    ct: HashMap<MapData, PolicyCtKey, PolicyCtValue>,
    engine: Engine,
}

fn labels(app: &str, cluster: &str) -> LabelArray {
    LabelArray::parse_kvstore(&format!(
        "k8s:app={app};k8s:io.cilium.k8s.policy.cluster={cluster};k8s:io.kubernetes.pod.namespace=default;"
    ))
    .expect("labels")
}

fn ep(ifindex: u32, identity: u32) -> EndpointInfo {
    EndpointInfo {
        ifindex,
        identity,
        flags: 0,
        pod_mac: [2, 0, 0, 0, 0, ifindex as u8],
        host_mac: [2, 0, 0, 0, 1, ifindex as u8],
    }
}

fn node() -> Node {
    let mut dp = Datapath::load(&Config {
        ipcache_max_entries: 1024,
        local_endpoints_max_entries: 64,
        ..Config::default()
    })
    .expect("load datapath (needs root)");
    let m = &mut dp.maps;
    m.local_endpoints.upsert_v4(POD_A, ep(41, ID_A)).expect("A");
    m.local_endpoints.upsert_v4(POD_B, ep(42, ID_B)).expect("B");
    let remote_node = REMOTE_NODE.octets();
    for (ip, id) in [
        (REMOTE_FRONTEND, ID_REMOTE_FRONTEND),
        (REMOTE_OTHER, ID_REMOTE_OTHER),
    ] {
        m.ipcache
            .upsert_v4(ip, 32, IpcacheValue::tunnel_v4(id, remote_node))
            .expect("remote");
    }
    m.tunnel.set(77, LOCAL_NODE, 4789).expect("tunnel");
    let policy = PolicyMaps::take(&mut dp).expect("policy maps");
    let flows = FlowMaps::take(&mut dp).expect("flow maps");
    let ct = HashMap::try_from(dp.take_map(map::POLICY_CT).expect("ct map")).expect("ct map");
    let mut engine = Engine::new(PolicyConfig {
        local_cluster: "c2".into(),
        default_local_cluster: true,
    });
    engine.on_identity("c2", ID_A, Some(&labels("frontend", "c2")));
    engine.on_identity("c2", ID_B, Some(&labels("backend", "c2")));
    engine.on_identity("c1", ID_REMOTE_FRONTEND, Some(&labels("frontend", "c1")));
    engine.on_identity("c1", ID_REMOTE_OTHER, Some(&labels("other", "c1")));
    Node {
        dp,
        policy,
        flows,
        ct,
        engine,
    }
}

impl Node {
    fn policy(&mut self, name: &str, json: Option<&str>) {
        self.engine
            .on_policy_json(name, "CiliumNetworkPolicy", json.map(str::as_bytes))
            .expect("policy");
        let c = self.engine.take_changes();
        self.policy.apply(&c).expect("apply");
    }

    fn run(&mut self, program: Program, packet: &[u8]) -> u32 {
        let mut out = vec![0u8; packet.len() + 64];
        self.dp
            .test_run(program, packet, Some(&mut out), 1)
            .expect("test run")
            .verdict
    }

    /// The tracked connections' forward tuples.
    fn tracked(&self) -> Vec<PolicyCtKey> {
        self.ct.keys().map(|k| k.expect("ct key")).collect()
    }

    fn events(&mut self) -> Vec<FlowEvent> {
        let mut v = Vec::new();
        self.flows.drain(|e| v.push(*e));
        v
    }
}

/// Ethernet + IPv4 + TCP SYN.
fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut p = Vec::with_capacity(54);
    p.extend_from_slice(&[2, 0, 0, 0, 1, 41, 2, 0, 0, 0, 0, 41]);
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&40u16.to_be_bytes());
    p.extend_from_slice(&[0, 1, 0x40, 0, 64, 6, 0, 0]);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    p
}

/// `tcp` with other TCP flags (0x12 = SYN-ACK, 0x10 = ACK).
fn tcp_flags(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = tcp(src, dst, sport, dport);
    p[47] = flags;
    p
}

const BACKEND_FROM_C1_FRONTEND: &str = r#"{"kind":"CiliumNetworkPolicy",
 "metadata":{"name":"p","namespace":"default"},
 "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
  "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend"}}],
              "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#;

#[test]
fn default_allow_then_policy_allows_and_denies_local_delivery() {
    let mut n = node();
    // No policy: allow-all, one forwarded flow event (SYN).
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 40000, 9090)),
        TC_ACT_REDIRECT
    );
    let ev = n.events();
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0].verdict, verdict::FORWARDED);
    assert_eq!((ev[0].src_identity, ev[0].dst_identity), (ID_A, ID_B));
    assert_eq!(u16::from_be(ev[0].dport), 9090);
    assert_eq!(ev[0].tcp_flags, 0x02);

    n.policy("p", Some(BACKEND_FROM_C1_FRONTEND));
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 40000, 8080)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 40000, 9090)),
        TC_ACT_SHOT
    );
    let ev = n.events();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].verdict, verdict::DROPPED);
    assert_eq!(ev[1].drop_reason, drop_reason::POLICY_DENIED);
    assert_eq!(ev[1].direction, 0, "dropped at the destination's ingress");
    let v = n.policy.verdicts().expect("verdicts");
    assert_eq!(v.denied(Direction::Ingress), 1);
    assert_eq!(v.by_match[0][PolicyMatch::L3L4 as usize], 1);

    // Deleting the policy restores traffic.
    n.policy("p", None);
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 40000, 9090)),
        TC_ACT_REDIRECT
    );
}

#[test]
fn egress_policy_to_a_remote_cluster_with_wildcard_port() {
    let mut n = node();
    n.policy(
        "e",
        Some(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"e","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"frontend"}},
              "egress":[{"toEndpoints":[{"matchLabels":{"app":"frontend","io.cilium.k8s.policy.cluster":"c1"}}]}]}}"#,
        ),
    );
    // Any port to the c1 frontend (L3-only entry), tunnelled.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, REMOTE_FRONTEND, 1, 443)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, REMOTE_FRONTEND, 1, 22)),
        TC_ACT_REDIRECT
    );
    // Not to the other c1 pod, nor to the local backend, nor to world.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, REMOTE_OTHER, 1, 443)),
        TC_ACT_SHOT
    );
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 1, 443)),
        TC_ACT_SHOT
    );
    assert_eq!(
        n.run(
            Program::FromPod,
            &tcp(POD_A, Ipv4Addr::new(192, 0, 2, 1), 1, 443)
        ),
        TC_ACT_SHOT
    );
    // The backend is not selected: allow-all egress.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_B, REMOTE_OTHER, 1, 443)),
        TC_ACT_REDIRECT
    );
    let ev = n.events();
    let drops: Vec<_> = ev
        .iter()
        .filter(|e| e.verdict == verdict::DROPPED)
        .collect();
    assert_eq!(drops.len(), 3);
    assert!(drops.iter().all(|e| e.direction == 1), "egress drops");
    assert_eq!(drops[2].dst_identity, 2, "unknown destination = world");
    let v = n.policy.verdicts().expect("verdicts");
    assert_eq!(v.by_match[1][PolicyMatch::L3Only as usize], 2);
    assert_eq!(v.denied(Direction::Egress), 3);
}

#[test]
fn overlay_ingress_uses_the_vni_identity_and_l4_only_rules() {
    let mut n = node();
    // Under test run there is no tunnel metadata: the source identity is 0 (unknown), so
    // only any-peer entries can allow it.
    n.policy(
        "l4",
        Some(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"l4","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
              "ingress":[{"toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#,
        ),
    );
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_B, 5, 8080)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_B, 5, 22)),
        TC_ACT_SHOT
    );
    let ev = n.events();
    assert_eq!(ev.len(), 2);
    assert_eq!(ev[1].drop_reason, drop_reason::POLICY_DENIED);
    assert_eq!(ev[1].observation, 2, "from_overlay");
    assert_eq!(ev[0].policy_match, PolicyMatch::L4Only as u8);
}

#[test]
fn underlay_ingress_enforces_policy_with_the_vni_as_source_identity() {
    let mut n = node();
    n.policy(
        "c1-frontend",
        Some(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"c1-frontend","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
              "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend",
                  "io.cilium.k8s.policy.cluster":"c1"}}],
                "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#,
        ),
    );
    let vxlan = |vni: u32, src: Ipv4Addr, dport: u16| {
        Vxlan::new(
            REMOTE_NODE,
            LOCAL_NODE,
            4789,
            vni,
            &tcp(src, POD_B, 5, dport),
        )
        .frame()
    };
    let cases = [
        (
            "c1 frontend to 8080",
            ID_REMOTE_FRONTEND,
            REMOTE_FRONTEND,
            8080,
            TC_ACT_REDIRECT,
        ),
        (
            "c1 frontend to 22",
            ID_REMOTE_FRONTEND,
            REMOTE_FRONTEND,
            22,
            TC_ACT_SHOT,
        ),
        (
            "c1 other to 8080",
            ID_REMOTE_OTHER,
            REMOTE_OTHER,
            8080,
            TC_ACT_SHOT,
        ),
        // The identity is the VNI's, whatever the inner source address claims.
        (
            "other's VNI, frontend's address",
            ID_REMOTE_OTHER,
            REMOTE_FRONTEND,
            8080,
            TC_ACT_SHOT,
        ),
    ];
    for (what, vni, src, dport, want) in cases {
        assert_eq!(
            n.run(Program::FromUnderlay, &vxlan(vni, src, dport)),
            want,
            "{what}"
        );
    }
    let ev = n.events();
    assert_eq!(ev.len(), cases.len());
    for ((what, vni, ..), e) in cases.iter().zip(&ev) {
        assert_eq!((e.src_identity, e.dst_identity), (*vni, ID_B), "{what}");
        assert_eq!(e.observation, 2, "{what}: observed as overlay ingress");
    }
    assert_eq!(ev[0].verdict, verdict::FORWARDED);
    assert!(ev[1..]
        .iter()
        .all(|e| e.drop_reason == drop_reason::POLICY_DENIED));
}

#[test]
fn flow_settings_drops_only_and_all_forwarded() {
    let mut n = node();
    n.flows.set_flags(flow_flags::DROPS_ONLY).expect("flags");
    n.run(Program::FromPod, &tcp(POD_A, POD_B, 1, 80));
    assert!(n.events().is_empty());
    n.flows.set_flags(flow_flags::ALL_FORWARDED).expect("flags");
    let mut ack = tcp(POD_A, POD_B, 1, 80);
    ack[47] = 0x10; // ACK only: skipped by the default aggregation, kept with ALL_FORWARDED
    n.run(Program::FromPod, &ack);
    assert_eq!(n.events().len(), 1);
    n.flows.set_flags(0).expect("flags");
    n.run(Program::FromPod, &ack);
    assert!(
        n.events().is_empty(),
        "default: forwarded TCP only with SYN/FIN/RST"
    );
}

/// The backend (B) admits only the c1 frontend on 8080. B's own connections must still
/// work: their replies come in through B's ingress and pass as replies, from any path
/// (overlay, underlay, a local pod); anything else from those peers stays dropped.
#[test]
fn replies_to_connections_of_an_ingress_policed_pod_pass() {
    let mut n = node();
    n.policy(
        "c1-frontend",
        Some(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"c1-frontend","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
              "ingress":[{"fromEndpoints":[{"matchLabels":{"app":"frontend",
                  "io.cilium.k8s.policy.cluster":"c1"}}],
                "toPorts":[{"ports":[{"port":"8080","protocol":"TCP"}]}]}]}}"#,
        ),
    );
    let syn_ack = tcp_flags(REMOTE_OTHER, POD_B, 80, 40000, 0x12);
    // Before B opened anything, the "reply" is an unsolicited packet: dropped.
    assert_eq!(n.run(Program::FromOverlay, &syn_ack), TC_ACT_SHOT);
    assert!(n.tracked().is_empty(), "a dropped packet is not tracked");

    // B → the other c1 pod (B's egress is not policed): tunnelled and tracked.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_B, REMOTE_OTHER, 40000, 80)),
        TC_ACT_REDIRECT
    );
    let tracked = n.tracked();
    assert_eq!(tracked.len(), 1, "{tracked:?}");
    assert_eq!(
        (tracked[0].saddr, tracked[0].daddr),
        (POD_B.octets(), REMOTE_OTHER.octets())
    );
    assert_eq!(
        (
            u16::from_be(tracked[0].sport),
            u16::from_be(tracked[0].dport)
        ),
        (40000, 80)
    );
    assert_eq!(tracked[0].proto, 6);

    // The reply through the VXLAN device and through the underlay: delivered.
    assert_eq!(n.run(Program::FromOverlay, &syn_ack), TC_ACT_REDIRECT);
    let frame = Vxlan::new(REMOTE_NODE, LOCAL_NODE, 4789, ID_REMOTE_OTHER, &syn_ack).frame();
    assert_eq!(n.run(Program::FromUnderlay, &frame), TC_ACT_REDIRECT);
    // The same peer to another port of B, or from another port: still dropped.
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_B, 80, 40001)),
        TC_ACT_SHOT
    );
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_B, 81, 40000)),
        TC_ACT_SHOT
    );
    // Another peer with the reply's ports: dropped (the tuple includes addresses).
    assert_eq!(
        n.run(
            Program::FromOverlay,
            &tcp_flags(REMOTE_FRONTEND, POD_B, 80, 40000, 0x12)
        ),
        TC_ACT_SHOT
    );

    // A local pod: B → A, A's reply through A's veth passes B's ingress.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_B, POD_A, 40002, 9090)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(
            Program::FromPod,
            &tcp_flags(POD_A, POD_B, 9090, 40002, 0x12)
        ),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 9090, 40003)),
        TC_ACT_SHOT
    );

    let ev = n.events();
    let replies: Vec<_> = ev
        .iter()
        .filter(|e| e.tcp_flags == 0x12 && e.verdict == verdict::FORWARDED)
        .collect();
    assert_eq!(replies.len(), 3, "{ev:?}");
    assert!(replies
        .iter()
        .all(|e| e.policy_match == PolicyMatch::None as u8 && e.drop_reason == 0));
    let v = n.policy.verdicts().expect("verdicts");
    assert_eq!(v.ct_replies, 3, "replies counted as such");
    assert_eq!(
        v.denied(Direction::Ingress),
        5,
        "the unsolicited packets, and no reply, counted as denied"
    );
}

/// The backend (B) may send only DNS to the c1 frontend. Connections others open to B
/// (its ingress is open) must still get B's answers; B's own packets elsewhere stay dropped.
#[test]
fn replies_of_an_egress_policed_pod_pass() {
    let mut n = node();
    n.policy(
        "dns-only",
        Some(
            r#"{"kind":"CiliumNetworkPolicy","metadata":{"name":"dns-only","namespace":"default"},
             "spec":{"endpointSelector":{"matchLabels":{"app":"backend"}},
              "egress":[{"toEndpoints":[{"matchLabels":{"app":"frontend",
                  "io.cilium.k8s.policy.cluster":"c1"}}],
                "toPorts":[{"ports":[{"port":"53","protocol":"UDP"}]}]}]}}"#,
        ),
    );
    let answer = tcp_flags(POD_B, REMOTE_OTHER, 8080, 40000, 0x12);
    assert_eq!(n.run(Program::FromPod, &answer), TC_ACT_SHOT, "unsolicited");
    // The c1 pod connects to B through the overlay: allowed (no ingress policy), tracked.
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_B, 40000, 8080)),
        TC_ACT_REDIRECT
    );
    assert_eq!(n.tracked().len(), 1);
    // B's answer: tunnelled back.
    assert_eq!(n.run(Program::FromPod, &answer), TC_ACT_REDIRECT);
    // B's packets to another destination, or from another port: dropped.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_B, REMOTE_FRONTEND, 8080, 40000)),
        TC_ACT_SHOT
    );
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_B, REMOTE_OTHER, 8081, 40000)),
        TC_ACT_SHOT
    );
    // Through the underlay too: the c1 pod's second connection, then B's answer.
    let syn = tcp(REMOTE_OTHER, POD_B, 40001, 8080);
    let frame = Vxlan::new(REMOTE_NODE, LOCAL_NODE, 4789, ID_REMOTE_OTHER, &syn).frame();
    assert_eq!(n.run(Program::FromUnderlay, &frame), TC_ACT_REDIRECT);
    assert_eq!(
        n.run(
            Program::FromPod,
            &tcp_flags(POD_B, REMOTE_OTHER, 8080, 40001, 0x12)
        ),
        TC_ACT_REDIRECT
    );
    // A local pod connects to B: B's answer into A's veth.
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, POD_B, 40002, 8080)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(
            Program::FromPod,
            &tcp_flags(POD_B, POD_A, 8080, 40002, 0x12)
        ),
        TC_ACT_REDIRECT
    );
    assert_eq!(n.tracked().len(), 3);

    let v = n.policy.verdicts().expect("verdicts");
    assert_eq!(v.ct_replies, 3);
    assert_eq!(v.denied(Direction::Egress), 3);
}

/// Endpoints without policy never write the connection map (the fast path stays as it
/// was), and neither does traffic a policed endpoint's replies do not depend on.
#[test]
fn endpoints_without_policy_are_not_tracked() {
    let mut n = node();
    for (program, packet) in [
        (Program::FromPod, tcp(POD_A, POD_B, 40000, 80)),
        (Program::FromPod, tcp(POD_B, POD_A, 80, 40000)),
        (Program::FromPod, tcp(POD_A, REMOTE_OTHER, 40000, 80)),
        (Program::FromOverlay, tcp(REMOTE_OTHER, POD_A, 80, 40000)),
    ] {
        assert_eq!(n.run(program, &packet), TC_ACT_REDIRECT);
    }
    assert!(n.tracked().is_empty(), "{:?}", n.tracked());
    // An ingress policy on B: A's connections (neither end has a policy their replies
    // would meet) stay untracked.
    n.policy("p", Some(BACKEND_FROM_C1_FRONTEND));
    assert_eq!(
        n.run(Program::FromPod, &tcp(POD_A, REMOTE_OTHER, 40001, 80)),
        TC_ACT_REDIRECT
    );
    assert_eq!(
        n.run(Program::FromOverlay, &tcp(REMOTE_OTHER, POD_A, 80, 40001)),
        TC_ACT_REDIRECT
    );
    assert!(n.tracked().is_empty(), "{:?}", n.tracked());
    assert_eq!(n.policy.verdicts().expect("verdicts").ct_replies, 0);
}

/// An entry older than its lifetime (60 s for UDP) no longer lets replies in.
#[test]
fn expired_connections_do_not_admit_replies() {
    let mut n = node();
    n.policy("p", Some(BACKEND_FROM_C1_FRONTEND));
    let mut udp = tcp(POD_B, REMOTE_OTHER, 5353, 53);
    udp[23] = 17;
    assert_eq!(n.run(Program::FromPod, &udp), TC_ACT_REDIRECT);
    let mut reply = tcp(REMOTE_OTHER, POD_B, 53, 5353);
    reply[23] = 17;
    assert_eq!(n.run(Program::FromOverlay, &reply), TC_ACT_REDIRECT);
    let key = n.tracked()[0];
    assert_eq!(key.proto, 17);
    // The kernel's timestamp of the last packet, moved back by 61 s.
    let seen = n.ct.get(&key, 0).expect("entry");
    assert_eq!(seen.lifetime_ns, policy_ct::ANY_LIFETIME_NS);
    n.ct.insert(
        key,
        PolicyCtValue {
            last_seen_ns: seen.last_seen_ns.saturating_sub(61_000_000_000),
            ..seen
        },
        0,
    )
    .expect("age the entry");
    assert_eq!(n.run(Program::FromOverlay, &reply), TC_ACT_SHOT);
}

/// A FIN or RST in either direction shortens a TCP connection's entry to the close lifetime
/// (10 s): the rest of the close passes, then the tuple is closed to replies; a new SYN on
/// the same tuple opens it for 6 h again.
#[test]
fn closed_tcp_connections_stop_admitting_replies_after_the_close_lifetime() {
    let mut n = node();
    n.policy("p", Some(BACKEND_FROM_C1_FRONTEND));
    let syn = tcp(POD_B, REMOTE_OTHER, 40000, 80);
    assert_eq!(n.run(Program::FromPod, &syn), TC_ACT_REDIRECT);
    let key = n.tracked()[0];
    let lifetime = |n: &Node| n.ct.get(&key, 0).expect("entry").lifetime_ns;
    assert_eq!(lifetime(&n), policy_ct::TCP_LIFETIME_NS);

    // The peer resets the connection: the RST passes as a reply and starts the close.
    let rst = tcp_flags(REMOTE_OTHER, POD_B, 80, 40000, 0x14);
    assert_eq!(n.run(Program::FromOverlay, &rst), TC_ACT_REDIRECT);
    assert_eq!(lifetime(&n), policy_ct::CLOSE_LIFETIME_NS);
    // Within the close lifetime the rest of the close still passes.
    let ack = tcp_flags(REMOTE_OTHER, POD_B, 80, 40000, 0x10);
    assert_eq!(n.run(Program::FromOverlay, &ack), TC_ACT_REDIRECT);
    // 11 s later, the closed tuple admits nothing.
    let seen = n.ct.get(&key, 0).expect("entry");
    n.ct.insert(
        key,
        PolicyCtValue {
            last_seen_ns: seen.last_seen_ns.saturating_sub(11_000_000_000),
            ..seen
        },
        0,
    )
    .expect("age the entry");
    assert_eq!(n.run(Program::FromOverlay, &ack), TC_ACT_SHOT);

    // B opens a new connection on the same tuple: 6 h again, replies pass.
    assert_eq!(n.run(Program::FromPod, &syn), TC_ACT_REDIRECT);
    assert_eq!(lifetime(&n), policy_ct::TCP_LIFETIME_NS);
    assert_eq!(n.run(Program::FromOverlay, &ack), TC_ACT_REDIRECT);
    // B's own FIN closes it from its side too.
    let fin = tcp_flags(POD_B, REMOTE_OTHER, 40000, 80, 0x11);
    assert_eq!(n.run(Program::FromPod, &fin), TC_ACT_REDIRECT);
    assert_eq!(lifetime(&n), policy_ct::CLOSE_LIFETIME_NS);
}
