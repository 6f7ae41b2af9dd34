//! The service map: workloads (one per security identity, labelled with its identity
//! labels), services and outside peers as nodes; one edge per (source, destination) pair
//! seen in flows, with counts per verdict, a rate over the last [`WINDOW_S`] seconds and,
//! for drops, which side's policy dropped and the identities involved.
//!
//! Counts are flow events, as Hubble counts them: a packet between two nodes is reported by
//! the agent at each end. Edges point from client to server: flows carry no reply bit, so a
//! reply is recognised as the reverse of a connection seen before (a TCP SYN names the
//! client; otherwise the first direction seen) and counted on the connection's edge instead
//! of drawing a reverse edge. Edges, flow-only nodes and remembered connections are bounded
//! ([`MAX_EDGES`], [`MAX_ENDPOINTS`], [`MAX_CONNECTIONS`]): past that, the least recently
//! seen are forgotten (edges are counted).
//!
//! It must not do I/O: flows and the inventory (workloads and services read from etcd) are
//! handed to it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::hash::{Hash as _, Hasher as _};

use clustermesh_observer_api as api;
use serde::Serialize;

use crate::observe;

/// Seconds the rate is averaged over.
pub const WINDOW_S: u64 = 10;
/// How long after its last drop an edge still shows as dropped.
pub const DROPPED_FOR_S: u64 = 60;
/// Edges kept at most.
pub const MAX_EDGES: usize = 5000;
/// Nodes learnt from flows kept at most (the inventory's are not counted).
pub const MAX_ENDPOINTS: usize = 5000;
/// Connections remembered to recognise replies (oldest forgotten first).
pub const MAX_CONNECTIONS: usize = 16 * 1024;
/// Pods listed per node at most (the rest is a count).
const MAX_PODS_LISTED: usize = 16;
/// Ports listed per edge at most.
const MAX_PORTS_LISTED: usize = 8;

/// What kind of peer a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Pods sharing one security identity.
    Workload,
    /// A service (from etcd), linked to the workloads that back it.
    Service,
    /// A reserved identity (`world`, `host`, `remote-node`, …).
    Reserved,
    /// An address the agents could not attribute.
    Ip,
}

/// A node of the map.
#[derive(Debug, Clone, Serialize)]
pub struct Node {
    /// `<cluster>/<identity>`, `svc:<cluster>/<ns>/<name>`, `reserved:<name>` or `ip:<addr>`.
    pub key: String,
    /// What it is.
    pub kind: Kind,
    /// Its cluster (empty outside every cluster).
    pub cluster: String,
    /// Security identity (0 for services and addresses).
    pub identity: u32,
    /// Identity labels worth showing (`source:key=value`; not the namespace/cluster ones).
    pub labels: Vec<String>,
    /// `namespace/pod` of its pods (at most [`MAX_PODS_LISTED`]).
    pub pods: BTreeSet<String>,
    /// Pods beyond those listed.
    pub more_pods: usize,
    /// Services: `namespace/name`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub name: String,
    /// Services: `ip:port/protocol` of each frontend.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub frontends: Vec<String>,
    /// Services: keys of the workloads behind the backends.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub backends: Vec<String>,
    /// Services: backend addresses no workload is known for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unknown_backends: Vec<String>,
    #[serde(skip)]
    last_seen: u64,
}

impl Node {
    fn new(key: String, kind: Kind, cluster: &str, identity: u32) -> Self {
        Self {
            key,
            kind,
            cluster: cluster.to_owned(),
            identity,
            labels: Vec::new(),
            pods: BTreeSet::new(),
            more_pods: 0,
            name: String::new(),
            frontends: Vec::new(),
            backends: Vec::new(),
            unknown_backends: Vec::new(),
            last_seen: 0,
        }
    }

    fn add_pod(&mut self, pod: String) {
        if self.pods.contains(&pod) {
            return;
        }
        if self.pods.len() < MAX_PODS_LISTED {
            self.pods.insert(pod);
        } else {
            self.more_pods += 1;
        }
    }
}

/// The last drop on an edge.
#[derive(Debug, Clone, Serialize)]
pub struct Drop {
    /// `ingress` (the destination's policy) or `egress` (the source's).
    pub side: &'static str,
    /// Key of the node whose policy dropped.
    pub by: String,
    /// Hubble's drop reason (`POLICY_DENIED`, …).
    pub reason: String,
    /// Which policy entry decided.
    pub policy_match: String,
    /// Source and destination identities.
    pub src_identity: u32,
    /// See `src_identity`.
    pub dst_identity: u32,
    /// The agent that dropped (`<cluster>/<node>`).
    pub node: String,
    /// When (RFC 3339).
    pub time: String,
}

/// An edge of the map.
#[derive(Debug, Clone, Serialize)]
pub struct Edge {
    /// Source node key.
    pub from: String,
    /// Destination node key.
    pub to: String,
    /// Forwarded flow events since the UI started.
    pub forwarded: u64,
    /// Dropped flow events since the UI started.
    pub dropped: u64,
    /// Of those, replies (server to client).
    pub replies: u64,
    /// Flow events per second over the last [`WINDOW_S`] s.
    pub rate: f64,
    /// `dropped` if a flow was dropped in the last [`DROPPED_FOR_S`] s, else `forwarded`.
    pub verdict: &'static str,
    /// `protocol/port` of the destinations seen.
    pub ports: BTreeSet<String>,
    /// The last drop, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_drop: Option<Drop>,
    /// Seconds since the last flow.
    pub idle_s: u64,
    #[serde(skip)]
    buckets: [(u64, u32); WINDOW_S as usize],
    #[serde(skip)]
    last_seen: u64,
    #[serde(skip)]
    last_drop_at: Option<u64>,
}

/// A workload read from etcd: an identity with the pods that carry it.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Cluster.
    pub cluster: String,
    /// Identity.
    pub identity: u32,
    /// Its labels (`source:key=value`).
    pub labels: Vec<String>,
    /// `namespace/pod` of each pod.
    pub pods: Vec<String>,
}

/// A service read from etcd.
#[derive(Debug, Clone)]
pub struct Service {
    /// Exporting cluster.
    pub cluster: String,
    /// `namespace/name`.
    pub name: String,
    /// `ip:port/protocol`.
    pub frontends: Vec<String>,
    /// Backend addresses.
    pub backends: Vec<String>,
}

/// What etcd says exists, replaced as a whole on every read.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Services.
    pub services: Vec<Service>,
    /// Pod address → workload key.
    pub addresses: HashMap<String, String>,
}

impl Inventory {
    /// Adds a cluster's identities (id → labels), ipcache (ip → id, namespace, pod) and
    /// services.
    pub fn add_cluster(
        &mut self,
        cluster: &str,
        identities: &BTreeMap<u32, Vec<String>>,
        ipcache: &[(String, u32, String, String)],
        services: Vec<(String, Vec<String>, Vec<String>)>,
    ) {
        let mut pods: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (ip, id, ns, pod) in ipcache {
            if pod.is_empty() || !identities.contains_key(id) {
                continue;
            }
            pods.entry(*id).or_default().push(format!("{ns}/{pod}"));
            self.addresses
                .insert(ip.clone(), workload_key(cluster, *id));
        }
        for (id, pods) in pods {
            self.workloads.push(Workload {
                cluster: cluster.to_owned(),
                identity: id,
                labels: identities.get(&id).cloned().unwrap_or_default(),
                pods,
            });
        }
        for (name, frontends, backends) in services {
            self.services.push(Service {
                cluster: cluster.to_owned(),
                name,
                frontends,
                backends,
            });
        }
    }
}

/// The key of identity `id` of `cluster`.
pub fn workload_key(cluster: &str, id: u32) -> String {
    format!("{cluster}/{id}")
}

fn short(labels: &[String]) -> Vec<String> {
    observe::short_labels(labels)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

/// Cilium's reserved identities stop here (`world-ipv6` is 10); user identities start at 256.
const MAX_RESERVED: u32 = 255;

/// The node an endpoint of a flow belongs to.
fn endpoint_node(e: &api::Endpoint) -> Node {
    let reserved = e.identity != 0 && e.identity <= MAX_RESERVED;
    if reserved {
        let name = e
            .labels
            .iter()
            .find_map(|l| l.strip_prefix("reserved:"))
            .map(str::to_owned)
            .unwrap_or_else(|| format!("identity-{}", e.identity));
        let mut n = Node::new(format!("reserved:{name}"), Kind::Reserved, "", e.identity);
        n.labels = vec![format!("reserved:{name}")];
        return n;
    }
    if e.identity != 0 && !e.cluster.is_empty() {
        let mut n = Node::new(
            workload_key(&e.cluster, e.identity),
            Kind::Workload,
            &e.cluster,
            e.identity,
        );
        n.labels = short(&e.labels);
        if !e.pod_name.is_empty() {
            n.add_pod(format!("{}/{}", e.namespace, e.pod_name));
        }
        return n;
    }
    let mut n = Node::new(format!("ip:{}", e.ip), Kind::Ip, &e.cluster, e.identity);
    n.labels = short(&e.labels);
    n
}

/// The map.
#[derive(Debug, Default)]
pub struct Graph {
    nodes: HashMap<String, Node>,
    edges: HashMap<(String, String), Edge>,
    inventory: Inventory,
    /// Hashes of the (client → server) 5-tuples seen, oldest first in `conn_order`.
    conns: HashSet<u64>,
    conn_order: VecDeque<u64>,
    /// Edges forgotten to stay within [`MAX_EDGES`].
    evicted_edges: u64,
    /// Flow events counted.
    flows: u64,
}

/// What `/api/map` returns.
#[derive(Debug, Serialize)]
pub struct View<'a> {
    /// Every node (inventory and flows), sorted by key.
    pub nodes: &'a [Node],
    /// Every edge.
    pub edges: Vec<Edge>,
    /// Flow events counted.
    pub flows: u64,
    /// Edges forgotten (bounded memory).
    pub evicted_edges: u64,
    /// Seconds the rates are averaged over.
    pub window_s: u64,
}

/// A 5-tuple's hash (the direction matters).
fn tuple(f: &api::Flow, src: &api::Endpoint, dst: &api::Endpoint, reverse: bool) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let (a, b) = if reverse { (dst, src) } else { (src, dst) };
    (&f.protocol, &a.ip, a.port, &b.ip, b.port).hash(&mut h);
    h.finish()
}

const TCP_SYN: u32 = 0x02;
const TCP_ACK: u32 = 0x10;

impl Graph {
    /// Whether `f` answers a connection seen before (and remembers new connections).
    fn is_reply(&mut self, f: &api::Flow, src: &api::Endpoint, dst: &api::Endpoint) -> bool {
        let fwd = tuple(f, src, dst, false);
        let syn = f.protocol == "TCP" && f.tcp_flags & TCP_SYN != 0;
        let (reply, request) = if syn && f.tcp_flags & TCP_ACK == 0 {
            (false, fwd)
        } else if self.conns.contains(&fwd) {
            return false;
        } else if syn || self.conns.contains(&tuple(f, src, dst, true)) {
            // A SYN-ACK, or the reverse of a known connection.
            (true, tuple(f, src, dst, true))
        } else {
            (false, fwd)
        };
        if self.conns.insert(request) {
            self.conn_order.push_back(request);
            if self.conn_order.len() > MAX_CONNECTIONS {
                if let Some(old) = self.conn_order.pop_front() {
                    self.conns.remove(&old);
                }
            }
        }
        reply
    }

    /// Counts flow `f`, reported by agent `node` (`c1/n1`), at second `now` (monotonic).
    pub fn observe(&mut self, f: &api::Flow, node: &str, now: u64) {
        let (Some(src), Some(dst)) = (f.source.as_ref(), f.destination.as_ref()) else {
            return;
        };
        self.flows += 1;
        let mut keys = [String::new(), String::new()];
        for (slot, e) in keys.iter_mut().zip([src, dst]) {
            let fresh = endpoint_node(e);
            let pod = (!e.pod_name.is_empty()).then(|| format!("{}/{}", e.namespace, e.pod_name));
            let n = self
                .nodes
                .entry(fresh.key.clone())
                .or_insert_with(|| fresh.clone());
            if n.labels.is_empty() {
                n.labels = fresh.labels;
            }
            if let Some(p) = pod {
                if n.kind == Kind::Workload {
                    n.add_pod(p);
                }
            }
            n.last_seen = now;
            *slot = fresh.key;
        }
        let reply = self.is_reply(f, src, dst);
        let [src_key, dst_key] = keys;
        let (from, to) = if reply {
            (dst_key.clone(), src_key.clone())
        } else {
            (src_key.clone(), dst_key.clone())
        };
        let e = self
            .edges
            .entry((from.clone(), to.clone()))
            .or_insert_with(|| Edge {
                from: from.clone(),
                to: to.clone(),
                forwarded: 0,
                dropped: 0,
                replies: 0,
                rate: 0.0,
                verdict: "forwarded",
                ports: BTreeSet::new(),
                last_drop: None,
                idle_s: 0,
                buckets: [(0, 0); WINDOW_S as usize],
                last_seen: now,
                last_drop_at: None,
            });
        e.last_seen = now;
        let b = &mut e.buckets[(now % WINDOW_S) as usize];
        if b.0 != now {
            *b = (now, 0);
        }
        b.1 += 1;
        if reply {
            e.replies += 1;
        } else if e.ports.len() < MAX_PORTS_LISTED {
            let port = if f.protocol.starts_with("ICMP") {
                f.protocol.clone()
            } else {
                format!("{}/{}", f.protocol, dst.port)
            };
            e.ports.insert(port);
        }
        if f.verdict == api::Verdict::Dropped as i32 {
            e.dropped += 1;
            e.last_drop_at = Some(now);
            let ingress = f.traffic_direction.eq_ignore_ascii_case("ingress");
            e.last_drop = Some(Drop {
                side: if ingress { "ingress" } else { "egress" },
                // The policy of the side that received (ingress) or sent (egress) it.
                by: if ingress { dst_key } else { src_key },
                reason: f.drop_reason_desc.clone(),
                policy_match: f.policy_match.clone(),
                src_identity: src.identity,
                dst_identity: dst.identity,
                node: node.to_owned(),
                time: observe::time(f.time_unix_nanos, true),
            });
        } else {
            e.forwarded += 1;
        }
        if self.edges.len() > MAX_EDGES {
            self.evict();
        }
    }

    /// Forgets the least recently seen quarter of the edges, then flow-only nodes no edge
    /// uses once there are too many.
    fn evict(&mut self) {
        let mut seen: Vec<u64> = self.edges.values().map(|e| e.last_seen).collect();
        seen.sort_unstable();
        let cut = seen[seen.len() / 4];
        let before = self.edges.len();
        self.edges.retain(|_, e| e.last_seen > cut);
        self.evicted_edges += (before - self.edges.len()) as u64;
        if self.nodes.len() > MAX_ENDPOINTS {
            let used: BTreeSet<&String> = self.edges.keys().flat_map(|(a, b)| [a, b]).collect();
            let keep: BTreeSet<String> = used.into_iter().cloned().collect();
            self.nodes.retain(|k, _| keep.contains(k));
        }
    }

    /// Replaces the inventory read from etcd.
    pub fn set_inventory(&mut self, inv: Inventory) {
        self.inventory = inv;
    }

    /// `/api/map` as JSON at second `now`.
    pub fn to_json(&self, now: u64) -> String {
        // Inventory nodes first; flows add pods and peers the inventory does not know.
        let mut owned: BTreeMap<String, Node> = BTreeMap::new();
        for w in &self.inventory.workloads {
            let key = workload_key(&w.cluster, w.identity);
            let mut n = Node::new(key.clone(), Kind::Workload, &w.cluster, w.identity);
            n.labels = short(&w.labels);
            for p in &w.pods {
                n.add_pod(p.clone());
            }
            owned.insert(key, n);
        }
        for s in &self.inventory.services {
            let key = format!("svc:{}/{}", s.cluster, s.name);
            let mut n = Node::new(key.clone(), Kind::Service, &s.cluster, 0);
            n.name.clone_from(&s.name);
            n.frontends.clone_from(&s.frontends);
            for b in &s.backends {
                match self.inventory.addresses.get(b) {
                    Some(w) if !n.backends.contains(w) => n.backends.push(w.clone()),
                    Some(_) => {}
                    None => n.unknown_backends.push(b.clone()),
                }
            }
            owned.insert(key, n);
        }
        for (k, n) in &self.nodes {
            match owned.get_mut(k) {
                Some(o) => {
                    for p in &n.pods {
                        o.add_pod(p.clone());
                    }
                    if o.labels.is_empty() {
                        o.labels.clone_from(&n.labels);
                    }
                }
                None => {
                    owned.insert(k.clone(), n.clone());
                }
            }
        }
        let mut edges: Vec<Edge> = self
            .edges
            .values()
            .map(|e| {
                let mut e = e.clone();
                let recent: u64 = e
                    .buckets
                    .iter()
                    .filter(|(s, _)| now.saturating_sub(*s) < WINDOW_S)
                    .map(|(_, c)| u64::from(*c))
                    .sum();
                e.rate = recent as f64 / WINDOW_S as f64;
                e.idle_s = now.saturating_sub(e.last_seen);
                e.verdict = match e.last_drop_at {
                    Some(t) if now.saturating_sub(t) < DROPPED_FOR_S => "dropped",
                    _ => "forwarded",
                };
                e
            })
            .collect();
        edges.sort_by(|a, b| (&a.from, &a.to).cmp(&(&b.from, &b.to)));
        let nodes: Vec<Node> = owned.into_values().collect();
        let view = View {
            nodes: &nodes,
            edges,
            flows: self.flows,
            evicted_edges: self.evicted_edges,
            window_s: WINDOW_S,
        };
        // Plain strings and numbers: serialising cannot fail.
        serde_json::to_string(&view).unwrap_or_else(|_| String::from("{}"))
    }

    /// Edges held.
    pub fn edge_count(&self) -> usize {
        self.edges.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::flow::tests::flow;

    fn view(g: &Graph, now: u64) -> serde_json::Value {
        serde_json::from_str(&g.to_json(now)).unwrap()
    }

    #[test]
    fn edges_count_verdicts_rates_and_who_dropped() {
        let mut g = Graph::default();
        let (a, b) = (("c1", "echo-2-1", 65538), ("c2", "echo-1-1", 131073));
        for s in 0..5 {
            g.observe(&flow(a, b, false), "c1/n2", 100 + s);
            g.observe(&flow(a, b, true), "c2/n1", 100 + s);
        }
        let v = view(&g, 104);
        let e = &v["edges"][0];
        assert_eq!(e["from"], "c1/65538");
        assert_eq!(e["to"], "c2/131073");
        assert_eq!(e["forwarded"], 5);
        assert_eq!(e["dropped"], 5);
        assert_eq!(e["rate"], 1.0, "10 events in the last 10 s");
        assert_eq!(e["verdict"], "dropped");
        assert_eq!(e["last_drop"]["side"], "ingress");
        assert_eq!(e["last_drop"]["by"], "c2/131073");
        assert_eq!(e["last_drop"]["src_identity"], 65538);
        assert_eq!(e["last_drop"]["node"], "c2/n1");
        assert_eq!(e["ports"][0], "TCP/8080");
        let nodes = v["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0]["pods"][0], "default/echo-2-1");
        assert!(
            !nodes[0]["labels"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| l.as_str().unwrap().contains("policy.cluster")),
            "cluster labels are shown as the group, not repeated"
        );
        // A minute without drops: forwarded again; the rate decays.
        let v = view(&g, 104 + DROPPED_FOR_S);
        assert_eq!(v["edges"][0]["verdict"], "forwarded");
        assert_eq!(v["edges"][0]["rate"], 0.0);
    }

    #[test]
    fn replies_count_on_the_connection_edge_not_as_a_reverse_edge() {
        let mut g = Graph::default();
        let (a, b) = (("c1", "echo-1-1", 65536), ("c2", "echo-1-1", 131072));
        let syn = flow(a, b, false);
        let mut syn_ack = syn.clone();
        std::mem::swap(&mut syn_ack.source, &mut syn_ack.destination);
        syn_ack.tcp_flags = 0x12;
        let mut fin_from_server = syn_ack.clone();
        fin_from_server.tcp_flags = 0x11;
        let mut udp = syn.clone();
        udp.protocol = "UDP".into();
        let mut udp_back = syn_ack.clone();
        udp_back.protocol = "UDP".into();
        for f in [&syn, &syn_ack, &fin_from_server, &udp, &udp_back] {
            g.observe(f, "c1/n1", 1);
        }
        let v = view(&g, 1);
        let edges = v["edges"].as_array().unwrap();
        assert_eq!(edges.len(), 1, "{edges:?}");
        assert_eq!(edges[0]["from"], "c1/65536");
        assert_eq!(edges[0]["forwarded"], 5);
        assert_eq!(edges[0]["replies"], 3);
        assert_eq!(
            edges[0]["ports"],
            serde_json::json!(["TCP/8080", "UDP/8080"])
        );
        // A server's SYN-ACK seen first (the SYN was before the UI started) is a reply too.
        let mut g = Graph::default();
        g.observe(&syn_ack, "c2/n1", 1);
        assert_eq!(view(&g, 1)["edges"][0]["from"], "c1/65536");
    }

    #[test]
    fn edges_stay_bounded() {
        let mut g = Graph::default();
        for i in 0..(MAX_EDGES as u32 + 100) {
            g.observe(
                &flow(("c1", "a", 70_000 + i), ("c2", "b", 131_073), false),
                "c1/n1",
                u64::from(i),
            );
        }
        assert!(g.edge_count() <= MAX_EDGES, "{}", g.edge_count());
        assert!(g.evicted_edges > 0);
        assert!(g.nodes.len() <= MAX_ENDPOINTS + 1);
    }

    #[test]
    fn inventory_gives_workloads_and_services_before_any_flow() {
        let mut inv = Inventory::default();
        let ids = BTreeMap::from([(
            65537,
            vec![
                "k8s:app=echo".to_owned(),
                "k8s:instance=echo-1-1".to_owned(),
            ],
        )]);
        inv.add_cluster(
            "c1",
            &ids,
            &[(
                "10.1.1.11".into(),
                65537,
                "default".into(),
                "echo-1-1".into(),
            )],
            vec![(
                "default/echo".into(),
                vec!["172.20.0.10:80/TCP".into()],
                vec!["10.1.1.11".into(), "10.9.9.9".into()],
            )],
        );
        let mut g = Graph::default();
        g.set_inventory(inv);
        let v = view(&g, 0);
        let nodes = v["nodes"].as_array().unwrap();
        assert_eq!(nodes[0]["key"], "c1/65537");
        assert_eq!(nodes[0]["pods"][0], "default/echo-1-1");
        assert_eq!(nodes[1]["key"], "svc:c1/default/echo");
        assert_eq!(nodes[1]["backends"][0], "c1/65537");
        assert_eq!(nodes[1]["unknown_backends"][0], "10.9.9.9");
    }
}
