//! Flow events: read from the `CM_FLOWS` ring buffer, enriched with identity labels,
//! cluster and pod names, kept in a bounded in-memory ring and fanned out to followers.
//!
//! The kernel writes fixed-size [`FlowEvent`]s (drops always, forwarded packets per
//! `CM_FLOW_CFG`); a full ring buffer loses events in the kernel (counted there, never
//! blocking a packet). The reader drains the ring on every wake-up of its async fd, so the
//! loss rate depends only on how fast this task runs.
//!
//! It must not decide verdicts or touch any map but the ring buffer and the flow settings.

use std::collections::{HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use aya::maps::{Array, MapData, RingBuf};
use clustermesh_ebpf_abi::{
    direction, drop_reason, observation, policy_map, verdict, FlowConfig, FlowEvent, PolicyMatch,
};
use clustermesh_observer_api as api;
use tokio::io::unix::AsyncFd;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::datapath::{self, Datapath};

/// Default number of flows kept per agent (Hubble's default ring is 4095; we keep more
/// because the lab merges few nodes).
pub const DEFAULT_CAPACITY: usize = 16 * 1024;

/// What the enrichment knows about identities and addresses, fed by the policy hook.
#[derive(Debug, Default)]
pub struct Directory {
    identities: HashMap<u32, (Arc<str>, Arc<[String]>)>,
    pods: HashMap<IpAddr, PodRef>,
}

/// A pod behind an address.
#[derive(Debug, Clone)]
pub struct PodRef {
    /// Its cluster.
    pub cluster: Arc<str>,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Directory {
    /// Identity `id` of `cluster` with `labels` (`None`: deleted).
    pub fn set_identity(&mut self, cluster: &Arc<str>, id: u32, labels: Option<Vec<String>>) {
        match labels {
            Some(l) => {
                self.identities.insert(id, (cluster.clone(), l.into()));
            }
            None => {
                self.identities.remove(&id);
            }
        }
    }

    /// The pod at `ip` (`None`: gone).
    pub fn set_pod(&mut self, ip: IpAddr, pod: Option<PodRef>) {
        match pod {
            Some(p) => {
                self.pods.insert(ip, p);
            }
            None => {
                self.pods.remove(&ip);
            }
        }
    }

    fn endpoint(&self, addr: IpAddr, port: u16, identity: u32) -> api::Endpoint {
        let mut e = api::Endpoint {
            ip: addr.to_string(),
            port: u32::from(u16::from_be(port)),
            identity,
            ..Default::default()
        };
        if let Some((cluster, labels)) = self.identities.get(&identity) {
            e.cluster = cluster.to_string();
            e.labels = labels.to_vec();
        } else if let Some(name) = reserved_name(identity) {
            e.labels = vec![format!("reserved:{name}")];
        }
        if let Some(p) = self.pods.get(&addr) {
            e.namespace.clone_from(&p.namespace);
            e.pod_name.clone_from(&p.name);
            if e.cluster.is_empty() {
                e.cluster = p.cluster.to_string();
            }
        }
        e
    }
}

fn reserved_name(id: u32) -> Option<&'static str> {
    Some(match id {
        1 => "host",
        2 => "world",
        3 => "unmanaged",
        4 => "health",
        5 => "init",
        6 => "remote-node",
        7 => "kube-apiserver",
        _ => return None,
    })
}

/// Shared directory handle.
pub type SharedDirectory = Arc<RwLock<Directory>>;

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length is checked above; FlowEvent is plain integers (every bit pattern
    // is valid) and read_unaligned copes with any alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

fn protocol(p: u8) -> String {
    match p {
        1 => "ICMPv4".into(),
        58 => "ICMPv6".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        132 => "SCTP".into(),
        n => n.to_string(),
    }
}

/// Hubble's name of a drop code.
pub fn drop_reason_desc(code: u8) -> &'static str {
    match code {
        0 => "",
        drop_reason::POLICY_DENIED => "POLICY_DENIED",
        drop_reason::INVALID_PACKET => "INVALID_PACKET_DROPPED",
        _ => "UNKNOWN_REASON",
    }
}

/// An event's address: IPv6 when the event says so, else IPv4 in the first 4 bytes.
pub fn event_addr(family: u8, a: [u8; 16]) -> IpAddr {
    if family == clustermesh_ebpf_abi::family::IPV6 {
        IpAddr::V6(Ipv6Addr::from(a))
    } else {
        IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))
    }
}

/// Turns a kernel event into an API flow. `mono_offset_ns` = realtime − monotonic.
pub fn enrich(ev: &FlowEvent, dir: &Directory, mono_offset_ns: i64, node: &str) -> api::Flow {
    let verdict = match ev.verdict {
        verdict::FORWARDED => api::Verdict::Forwarded,
        verdict::DROPPED => api::Verdict::Dropped,
        _ => api::Verdict::Unknown,
    };
    api::Flow {
        time_unix_nanos: (ev.ktime_ns as i64).saturating_add(mono_offset_ns),
        source: Some(dir.endpoint(event_addr(ev.family, ev.saddr), ev.sport, ev.src_identity)),
        destination: Some(dir.endpoint(event_addr(ev.family, ev.daddr), ev.dport, ev.dst_identity)),
        protocol: protocol(ev.proto),
        tcp_flags: u32::from(ev.tcp_flags),
        verdict: verdict as i32,
        drop_reason: u32::from(ev.drop_reason),
        drop_reason_desc: drop_reason_desc(ev.drop_reason).into(),
        traffic_direction: if ev.direction == direction::INGRESS {
            "ingress".into()
        } else {
            "egress".into()
        },
        node_name: node.to_owned(),
        policy_match: PolicyMatch::ALL
            .get(usize::from(ev.policy_match))
            .map_or("", |m| m.name())
            .into(),
        length: ev.len,
        observation_point: match ev.observation {
            observation::FROM_POD => "from-pod".into(),
            observation::FROM_OVERLAY => "from-overlay".into(),
            _ => String::new(),
        },
    }
}

/// A flow with its sequence number in this agent's ring.
pub type Seq = (u64, Arc<api::Flow>);

/// The bounded ring of recent flows plus a broadcast for followers.
pub struct Store {
    ring: Mutex<VecDeque<Seq>>,
    capacity: usize,
    tx: broadcast::Sender<Seq>,
    seq: AtomicU64,
    node: String,
}

impl Store {
    /// A store of `capacity` flows for node `node`.
    pub fn new(capacity: usize, node: impl Into<String>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(4096);
        Arc::new(Self {
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1 << 16))),
            capacity: capacity.max(1),
            tx,
            seq: AtomicU64::new(0),
            node: node.into(),
        })
    }

    /// The node name flows are tagged with.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Appends a flow (evicting the oldest when full) and sends it to followers.
    pub fn push(&self, flow: api::Flow) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let item = (seq, Arc::new(flow));
        {
            let mut r = self.ring.lock().unwrap_or_else(PoisonError::into_inner);
            if r.len() == self.capacity {
                r.pop_front();
            }
            r.push_back(item.clone());
        }
        // No receivers is fine.
        let _ = self.tx.send(item);
    }

    /// Flows in the ring, oldest first.
    pub fn snapshot(&self) -> Vec<Seq> {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }

    /// New flows from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Seq> {
        self.tx.subscribe()
    }

    /// Flows pushed since start.
    pub fn seen(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Flows in the ring now.
    pub fn len(&self) -> usize {
        self.ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// `true` if no flow is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Capacity of the ring.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// `CLOCK_REALTIME − CLOCK_MONOTONIC` in nanoseconds (to date kernel timestamps).
pub fn monotonic_offset_ns() -> i64 {
    let now = |clock| {
        // SAFETY: `ts` is a valid out-parameter for clock_gettime.
        let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
        // SAFETY: see above; the clocks exist on every Linux.
        unsafe { libc::clock_gettime(clock, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    now(libc::CLOCK_REALTIME) - now(libc::CLOCK_MONOTONIC)
}

/// The flow ring buffer and the flow settings of one datapath.
pub struct FlowMaps {
    ring: RingBuf<MapData>,
    config: Array<MapData, FlowConfig>,
}

impl FlowMaps {
    /// Takes the flow maps out of `dp`.
    pub fn take(dp: &mut Datapath) -> datapath::Result<Self> {
        let ring = dp
            .take_map(policy_map::FLOWS)
            .ok_or(datapath::Error::MissingMap(policy_map::FLOWS))?;
        let config = dp
            .take_map(policy_map::FLOW_CONFIG)
            .ok_or(datapath::Error::MissingMap(policy_map::FLOW_CONFIG))?;
        Ok(Self {
            ring: RingBuf::try_from(ring).map_err(|source| datapath::Error::Map {
                map: policy_map::FLOWS,
                op: "open",
                source,
            })?,
            config: Array::try_from(config).map_err(|source| datapath::Error::Map {
                map: policy_map::FLOW_CONFIG,
                op: "open",
                source,
            })?,
        })
    }

    /// Sets the flow settings ([`clustermesh_ebpf_abi::flow_flags`]).
    pub fn set_flags(&mut self, flags: u32) -> datapath::Result<()> {
        self.config
            .set(0, FlowConfig { flags, pad: 0 }, 0)
            .map_err(|source| datapath::Error::Map {
                map: policy_map::FLOW_CONFIG,
                op: "update",
                source,
            })
    }

    /// Drains every pending event into `f` without waiting; returns how many.
    pub fn drain(&mut self, mut f: impl FnMut(&FlowEvent)) -> usize {
        let mut n = 0;
        while let Some(item) = self.ring.next() {
            if let Some(ev) = decode(&item) {
                f(&ev);
                n += 1;
            }
        }
        n
    }

    /// Reads events until cancelled: waits on the ring buffer's fd, drains, enriches with
    /// `directory` and pushes into `store`. Returns the maps (for reuse in tests).
    pub async fn run(
        self,
        store: Arc<Store>,
        directory: SharedDirectory,
        token: CancellationToken,
    ) -> std::io::Result<Self> {
        let offset = monotonic_offset_ns();
        // SAFETY: the fd is the ring buffer map's, owned by `self`, which the AsyncFd owns
        // until `into_inner`: it stays open for as long as it is registered.
        let mut fd =
            unsafe { AsyncFd::register_with_interest(self, tokio::io::Interest::READABLE) }
                .map_err(std::io::Error::from)?;
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                guard = fd.readable_mut() => {
                    let mut guard = guard?;
                    let maps = guard.get_inner_mut();
                    let mut batch = Vec::new();
                    maps.drain(|ev| batch.push(*ev));
                    guard.clear_ready();
                    if batch.is_empty() {
                        continue;
                    }
                    let dir = directory.read().unwrap_or_else(PoisonError::into_inner);
                    for ev in &batch {
                        store.push(enrich(ev, &dir, offset, store.node()));
                    }
                    debug!(events = batch.len(), "flow events read");
                }
            }
        }
        Ok(fd.into_inner())
    }
}

impl std::os::fd::AsRawFd for FlowMaps {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// Logs and swallows a reader failure (the datapath keeps working without flows).
pub fn log_reader_exit(r: std::io::Result<FlowMaps>) {
    if let Err(error) = r {
        warn!(%error, "flow reader stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hubble's names: an IPv6 ping or neighbour solicitation says `ICMPv6`, not `58`
    /// (`observe` prints it, the UI groups ICMP by name).
    #[test]
    fn protocols_have_hubbles_names() {
        let names: Vec<String> = [1, 6, 17, 58, 132, 47].into_iter().map(protocol).collect();
        assert_eq!(names, ["ICMPv4", "TCP", "UDP", "ICMPv6", "SCTP", "47"]);
    }

    #[test]
    fn pods_of_either_family_are_named() {
        let mut dir = Directory::default();
        let c: Arc<str> = "c2".into();
        let pod = |name: &str| PodRef {
            cluster: c.clone(),
            namespace: "default".into(),
            name: name.into(),
        };
        let v4: IpAddr = "10.2.1.11".parse().unwrap();
        let v6: IpAddr = "fd00:10:2:1::11".parse().unwrap();
        dir.set_pod(v4, Some(pod("b1")));
        dir.set_pod(v6, Some(pod("b1")));
        for addr in [v4, v6] {
            let e = dir.endpoint(addr, 80u16.to_be(), 131_073);
            assert_eq!((e.pod_name.as_str(), e.cluster.as_str()), ("b1", "c2"));
            assert_eq!(e.ip, addr.to_string());
            assert_eq!(e.port, 80);
        }
        dir.set_pod(v6, None);
        assert!(dir.endpoint(v6, 0, 131_073).pod_name.is_empty());
        assert_eq!(dir.endpoint(v4, 0, 131_073).pod_name, "b1");
    }
}
