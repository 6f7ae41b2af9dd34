//! The agent: start-up checks, the datapath bring-up ([`datapath::bring_up`]), the local and
//! remote readers, the reconcile loop and the health server, as tasks under one
//! cancellation token.
//!
//! Shutdown (the token is cancelled) stops the readers and the server and drops the
//! datapath handles. It never detaches programs and never clears maps: the pinned links and
//! maps keep forwarding with the last state until the next agent takes them over (Cilium's
//! agent does not drain on shutdown either). `clustermesh-agent --cleanup` removes them.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_syncer::remote::{self, Manager, Mode};
use clustermesh_syncer::{ConnectConfig, EtcdConfig};
use clustermesh_types::cluster::ClusterInfo;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn, Instrument as _};

use crate::datapath::{self, Program};
pub use crate::datapath::{Transmit, UnderlayDev};
use crate::flows::{FlowMaps, SharedDirectory};
use crate::health::{self, Metrics, Shared};
use crate::input::Input;
use crate::nodes::NodeTable;
use crate::policy::{hook::Hook, maps::PolicyMaps};
use crate::reconcile::Reconciler;
use crate::services::{self, LbMaps, ServiceMerger};
use crate::{discovery, dns, ifaces, kernel, local, Error, Result};
use crate::{flows, observer, policy};

/// Where remote clusters are read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteMode {
    /// Through the KVStoreMesh cache in the local etcd (default).
    KvstoreMesh,
    /// From each remote's etcd, with the endpoints and certificates of its file.
    Direct,
}

/// Settings of the agent (validated by [`Config::validate`]).
#[derive(Clone, Debug)]
pub struct Config {
    /// The local cluster.
    pub cluster: ClusterInfo,
    /// This node's name.
    pub node_name: String,
    /// This node's underlay IPv4 (pods with this `HostIP` are local); `None` on an
    /// IPv6-only node, which then needs `node_ip6`.
    pub node_ip: Option<Ipv4Addr>,
    /// This node's underlay IPv6, if any (IPv6 tunnel endpoints; `HostIP` of local pods).
    pub node_ip6: Option<Ipv6Addr>,
    /// Client config of the local etcd (user `local-<c>`).
    pub etcd_config: PathBuf,
    /// Directory with one file per remote cluster (may be empty or missing).
    pub clustermesh_config: PathBuf,
    /// KVStoreMesh or direct.
    pub remote_mode: RemoteMode,
    /// Pin directory on bpffs (maps, and `links/`).
    pub bpffs_dir: PathBuf,
    /// The VXLAN device (external mode).
    pub vxlan_dev: String,
    /// The VXLAN device's UDP port (what `from_underlay` decapsulates).
    pub vxlan_port: u16,
    /// Where `from_underlay` decapsulates VXLAN for local pods.
    pub underlay_dev: UnderlayDev,
    /// How `from_pod` sends packets into the tunnel.
    pub transmit: Transmit,
    /// `/readyz`, `/healthz`, `/status`, `/metrics`.
    pub health_addr: SocketAddr,
    /// The flow observer's gRPC address (`clustermesh observe`); Hubble's port 4245.
    pub observer_addr: SocketAddr,
    /// `/readyz` turns true at the latest after this long.
    pub sync_timeout: Duration,
    /// ipcache capacity.
    pub ipcache_max_entries: u32,
    /// Local endpoints capacity.
    pub local_endpoints_max_entries: u32,
    /// The `clusterset.local` DNS server (UDP); `None` = no DNS server.
    pub dns_addr: Option<SocketAddr>,
    /// Cilium's `policy-default-local-cluster`: a peer selector without the cluster label
    /// matches only the local cluster (default true, as in Cilium ≥ 1.19).
    pub policy_default_local_cluster: bool,
    /// Withdraw a disconnected remote's routes after this; `None` keeps them.
    pub cache_ttl: Option<Duration>,
    /// Connect timeout and keepalives of every etcd connection.
    pub connect: ConnectConfig,
}

impl Config {
    /// Checks ranges and names.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::InvalidConfig(s));
        if let Err(e) = self.cluster.validate() {
            return bad(format!("--cluster-id: {e}"));
        }
        if self.node_name.is_empty() {
            return bad("--node-name must not be empty".into());
        }
        match (self.node_ip, self.node_ip6) {
            (None, None) => {
                return bad(
                    "--node-ip (IPv4) or --node-ip6 (IPv6-only node) is required: this \
                     node's underlay address"
                        .into(),
                )
            }
            (Some(ip), _) if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() => {
                return bad(format!(
                    "--node-ip {ip} must be this node's unicast IPv4 underlay address"
                ))
            }
            _ => {}
        }
        if let Some(ip6) = self.node_ip6 {
            if ip6.is_unspecified() || ip6.is_loopback() || ip6.is_multicast() {
                return bad(format!(
                    "--node-ip6 {ip6} must be this node's unicast IPv6 underlay address"
                ));
            }
        }
        if self.vxlan_dev.is_empty() || self.vxlan_dev.len() > ifaces::IFNAME_MAX {
            return bad(format!(
                "--vxlan-dev {:?} is not an interface name",
                self.vxlan_dev
            ));
        }
        if let UnderlayDev::Named(dev) = &self.underlay_dev {
            if dev.is_empty() || dev.len() > ifaces::IFNAME_MAX {
                return bad(format!("--underlay-dev {dev:?} is not an interface name"));
            }
        }
        if self.vxlan_port == 0 {
            return bad("--vxlan-port must be the VXLAN device's UDP port (not 0)".into());
        }
        if self.ipcache_max_entries == 0 || self.local_endpoints_max_entries == 0 {
            return bad("map sizes must be > 0".into());
        }
        if self.connect.keepalive.0.is_zero() || self.connect.keepalive.1.is_zero() {
            return bad(
                "--etcd-keepalive-interval and --etcd-keepalive-timeout must be > 0".into(),
            );
        }
        Ok(())
    }
}

/// Removes every pin under `bpffs_dir` (programs detach, maps go): for `lab down`.
pub fn cleanup(bpffs_dir: &Path) -> Result<usize> {
    Ok(datapath::cleanup(bpffs_dir)?)
}

/// Runs the agent until `token` is cancelled (or a subsystem fails).
pub async fn run(config: Config, token: CancellationToken) -> Result<()> {
    config.validate()?;
    let report = kernel::check(&config.bpffs_dir)?;
    info!(%report, "kernel check passed");
    if report.mounted_bpffs {
        warn!(dir = %config.bpffs_dir.display(),
            "mounted bpffs myself: if this process runs in its own mount namespace (ip netns exec), \
             the pins disappear with it and restarts are not hitless; mount bpffs there beforehand");
    }
    let datapath::Up {
        mut dp,
        underlay,
        receive_path,
        transmit_path,
    } = datapath::bring_up(&datapath::BringUp {
        bpffs_dir: config.bpffs_dir.clone(),
        attach: report.attach_mode,
        ipcache_max_entries: config.ipcache_max_entries,
        local_endpoints_max_entries: config.local_endpoints_max_entries,
        vxlan_dev: config.vxlan_dev.clone(),
        vxlan_port: config.vxlan_port,
        underlay_dev: config.underlay_dev.clone(),
        transmit: config.transmit,
        node_ip: config.node_ip,
        node_ip6: config.node_ip6,
    })?;
    // The LB maps belong to the services loop, not to the reconciler.
    let lb = LbMaps::take(&mut dp)?;
    // Policy and flows own their maps; the reconciler keeps the ipcache and endpoints.
    let policy_maps = PolicyMaps::take(&mut dp)?;
    let flow_maps = FlowMaps::take(&mut dp)?;
    let local_name: Arc<str> = Arc::from(config.cluster.name.as_str());
    let reconciler = Reconciler::new(
        dp,
        local_name.clone(),
        // 0.0.0.0: an IPv6-only node, whose local pods are found by --node-ip6.
        config.node_ip.unwrap_or(Ipv4Addr::UNSPECIFIED),
        config.ipcache_max_entries,
        config.local_endpoints_max_entries,
    )?;
    let mut reconciler = reconciler;
    reconciler.set_node_ip6(config.node_ip6);
    reconciler.set_own_devices(
        [
            Some(config.vxlan_dev.clone()),
            underlay.clone(),
            config.node_ip.and_then(ifaces::with_ipv4),
            config.node_ip6.and_then(|ip| ifaces::with_addr(ip.into())),
        ]
        .into_iter()
        .flatten(),
    );

    let etcd = EtcdConfig::load(&config.etcd_config)?;
    let (tx, local_rx) = mpsc::channel(4096);
    let (reader, local_status) = local::Reader::new(
        local::Config {
            cluster: config.cluster.clone(),
            etcd: etcd.clone(),
            connect: config.connect.clone(),
            backoff_min: Duration::from_millis(200),
            backoff_max: Duration::from_secs(10),
        },
        tx,
    );
    let (svc_tx, svc_rx) = mpsc::channel(4096);
    let reader = reader.with_services(svc_tx);
    let metrics = Arc::new(Metrics::default());
    let mode = match config.remote_mode {
        RemoteMode::KvstoreMesh => Mode::KvstoreMesh { local_etcd: etcd },
        RemoteMode::Direct => Mode::Direct,
    };
    let mut rconfig = remote::Config::new(
        config.cluster.clone(),
        config.clustermesh_config.clone(),
        mode,
    );
    rconfig.cache_ttl = config.cache_ttl;
    rconfig.connect = config.connect.clone();
    let (manager, remote_rx) = Manager::new(rconfig, metrics.remote.clone())?;
    let remote_status = manager.status();

    let shared = Arc::new(Shared::default());
    let server = health::serve(
        config.health_addr,
        shared.clone(),
        metrics.registry(),
        token.child_token(),
    )
    .await
    .map_err(|source| Error::Health {
        addr: config.health_addr,
        source,
    })?;
    info!(addr = %config.health_addr, "health server listening");

    let base = health::Report {
        cluster: config.cluster.name.to_string(),
        cluster_id: config.cluster.id,
        node: config.node_name.clone(),
        node_ip: config.node_ip.map(|ip| ip.to_string()).unwrap_or_default(),
        node_ip6: config.node_ip6.map(|ip| ip.to_string()),
        kernel: report.to_string(),
        attach_mode: format!("{:?}", report.attach_mode),
        receive_path,
        transmit_path,
        ..health::Report::default()
    };

    let mut tasks: JoinSet<Result<()>> = JoinSet::new();
    let (zone_tx, zone_rx) = watch::channel(Arc::new(dns::Zone::default()));
    let dns_status = match config.dns_addr {
        None => "off".to_owned(),
        // Without the address (an agent outside the lab) the agent still runs: DNS is not
        // the datapath, and /status says why it is missing.
        Some(addr) => match tokio::net::UdpSocket::bind(addr).await {
            Ok(sock) => {
                info!(%addr, "dns server listening");
                let t = token.child_token();
                tasks.spawn(
                    async move {
                        dns::serve(sock, zone_rx, dns::Config::default(), t)
                            .await
                            .map_err(|source| Error::Dns { addr, source })
                    }
                    .instrument(tracing::info_span!("dns", %addr)),
                );
                format!("listening on {addr}")
            }
            Err(error) => {
                warn!(%error, %addr, "dns server not started");
                format!("bind {addr} failed: {error}")
            }
        },
    };
    tasks.spawn(
        async move {
            server.await.map_err(|source| Error::Health {
                addr: config.health_addr,
                source,
            })
        }
        .instrument(tracing::info_span!("health")),
    );
    {
        let t = token.child_token();
        tasks.spawn(
            async move {
                reader.run(t).await;
                Ok(())
            }
            .instrument(tracing::info_span!("local_reader")),
        );
    }
    {
        let t = token.child_token();
        tasks.spawn(
            async move { manager.run(t).await.map_err(Error::from) }
                .instrument(tracing::info_span!("remote_reader")),
        );
    }
    let directory = SharedDirectory::default();
    let flows_lost = Arc::new(AtomicU64::new(0));
    {
        let store = flows::Store::new(flows::DEFAULT_CAPACITY, config.node_name.clone());
        let (s, d, t) = (store.clone(), directory.clone(), token.child_token());
        tasks.spawn(
            async move {
                flows::log_reader_exit(flow_maps.run(s, d, t).await);
                Ok(())
            }
            .instrument(tracing::info_span!("flows")),
        );
        let lost = flows_lost.clone();
        let service = observer::Service::new(store, Arc::new(move || lost.load(Ordering::Relaxed)));
        let addr = config.observer_addr;
        // Like DNS, flows are not the datapath: an agent whose address is unusable keeps
        // forwarding and enforcing, and says why it serves no flows.
        match tokio::net::TcpListener::bind(addr).await {
            Ok(listener) => {
                info!(%addr, "flow observer listening");
                let t = token.child_token();
                tasks.spawn(
                    async move {
                        if let Err(error) = observer::serve_on(listener, service, t).await {
                            warn!(%error, %addr, "flow observer stopped");
                        }
                        Ok(())
                    }
                    .instrument(tracing::info_span!("observer", %addr)),
                );
            }
            Err(error) => warn!(%error, %addr, "flow observer not started"),
        }
    }
    // Pod discovery follows the kernel's notifications (no poll).
    let (kernel_tx, kernel_rx) = mpsc::channel(1);
    {
        let watcher = discovery::Watcher::new().map_err(Error::Netlink)?;
        let t = token.child_token();
        tasks.spawn(
            async move {
                watcher.run(kernel_tx, t).await;
                Ok(())
            }
            .instrument(tracing::info_span!("discovery")),
        );
    }
    {
        let l = Loop {
            rec: reconciler,
            local_rx,
            remote_rx,
            remote_status,
            local_status,
            shared,
            metrics,
            base: health::Report {
                dns: dns_status,
                ..base
            },
            svc: ServiceLoop {
                services: ServiceMerger::new(local_name.to_string()),
                lb,
                rx: svc_rx,
                zone: zone_tx,
                listed: false,
                changed: false,
            },
            local: local_name,
            config_dir: config.clustermesh_config.clone(),
            sync_timeout: config.sync_timeout,
            kernel_rx,
            policy: Hook::new(
                policy::Config {
                    local_cluster: config.cluster.name.to_string(),
                    default_local_cluster: config.policy_default_local_cluster,
                },
                Some(policy_maps),
                directory,
            ),
            fed: Vec::new(),
            nodes: NodeTable::new(),
            flows_lost,
        };
        let t = token.child_token();
        tasks.spawn(
            async move {
                l.run(t).await;
                Ok(())
            }
            .instrument(tracing::info_span!("reconcile", node = %config.node_name)),
        );
    }
    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let r = match done {
            Ok(r) => r,
            Err(e) => Err(Error::Task(e.to_string())),
        };
        if let Err(e) = r {
            if result.is_ok() {
                error!(error = %e, "subsystem failed: stopping");
                result = Err(e);
            }
        }
        // Any subsystem ending ends the agent.
        token.cancel();
    }
    result
}

struct Loop {
    rec: Reconciler,
    local_rx: mpsc::Receiver<Input>,
    remote_rx: mpsc::Receiver<remote::Event>,
    remote_status: watch::Receiver<remote::Snapshot>,
    local_status: watch::Receiver<local::Status>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    base: health::Report,
    svc: ServiceLoop,
    local: Arc<str>,
    config_dir: PathBuf,
    sync_timeout: Duration,
    /// Link, route and neighbour changes ([`discovery::Watcher`]).
    kernel_rx: mpsc::Receiver<()>,
    /// Identities and policies into the policy maps; ipcache entries through its gate.
    policy: Hook,
    /// Reused buffer of what the policy hook passes on to the reconciler.
    fed: Vec<Input>,
    /// Every node of every cluster, for `/status`.
    nodes: NodeTable,
    /// The kernel's lost flow events, for the observer's status.
    flows_lost: Arc<AtomicU64>,
}

/// Services: local and remote services merged, written to the LB maps by diff, and the
/// DNS zone republished after every change.
struct ServiceLoop {
    services: ServiceMerger,
    lb: LbMaps,
    rx: mpsc::Receiver<services::LocalInput>,
    zone: watch::Sender<Arc<dns::Zone>>,
    /// The local services have been listed once: until then the maps keep what an
    /// earlier agent left (pinned), and nothing is written.
    listed: bool,
    /// A change since the zone was last built.
    changed: bool,
}

impl ServiceLoop {
    fn apply(&mut self, diff: &services::Diff) {
        if diff.is_empty() {
            return;
        }
        self.changed = true;
        if !self.listed {
            return;
        }
        if let Err(error) = self.lb.apply(diff) {
            error!(%error, "LB map update failed");
        }
    }

    fn on_local(&mut self, input: services::LocalInput) {
        if matches!(input, services::LocalInput::Listed) {
            if !self.listed {
                self.listed = true;
                self.changed = true;
                // Write the whole table, then remove what an earlier agent left behind.
                let full = self.services.reprogram();
                let applied = self.lb.apply(&full);
                match applied.and_then(|()| self.lb.sweep(&full)) {
                    Ok(stale) => info!(
                        frontends = self.services.table().frontends(),
                        stale, "local services listed: LB maps programmed"
                    ),
                    Err(error) => error!(%error, "LB maps programming failed"),
                }
            }
            return;
        }
        if let services::LocalInput::Export { .. } = &input {
            self.changed = true;
        }
        let diff = self.services.on_local_input(input);
        self.apply(&diff);
    }

    fn on_remote(&mut self, e: &remote::Event) {
        if let Some(diff) = self.services.on_remote_event(e) {
            self.apply(&diff);
        }
        if matches!(
            e,
            remote::Event::Change {
                resource: remote::Resource::ServiceExports,
                ..
            }
        ) {
            self.changed = true;
        }
    }

    /// Republishes the DNS zone if anything changed; true if it did.
    fn publish_zone(&mut self) -> bool {
        if !std::mem::take(&mut self.changed) {
            return false;
        }
        self.zone
            .send_replace(Arc::new(dns::Zone::build(&self.services)));
        true
    }
}

/// Inputs taken per wake-up before flushing: big lists become few batched syscalls, single
/// changes are flushed at once.
const DRAIN: usize = 65_536;

impl Loop {
    async fn run(mut self, token: CancellationToken) {
        let started = Instant::now();
        // What the manager will read, until its first status names them.
        let initial_remotes: BTreeSet<String> =
            remote::configured_remotes(&self.config_dir, &self.local)
                .remotes
                .into_keys()
                .collect();
        let deadline = tokio::time::sleep(self.sync_timeout);
        tokio::pin!(deadline);
        let mut timed_out = false;
        let mut ready = false;
        let mut ready_reason = String::from("waiting for the initial sync");
        let mut status_tick = tokio::time::interval(Duration::from_secs(1));
        status_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut remote_open = true;
        loop {
            let mut publish = false;
            tokio::select! {
                _ = token.cancelled() => break,
                i = self.local_rx.recv() => match i {
                    Some(i) => { self.feed(i); self.drain(remote_open); }
                    None => break,
                },
                e = self.remote_rx.recv(), if remote_open => match e {
                    Some(e) => {
                        self.svc.on_remote(&e);
                        if let Some(i) = Input::from_remote(e) { self.feed(i); }
                        self.drain(remote_open);
                    }
                    None => remote_open = false,
                },
                Some(()) = self.kernel_rx.recv() => self.rec.sync_pods(),
                i = self.svc.rx.recv() => if let Some(i) = i {
                    self.svc.on_local(i);
                    while let Ok(i) = self.svc.rx.try_recv() {
                        self.svc.on_local(i);
                    }
                },
                _ = status_tick.tick() => publish = true,
                _ = &mut deadline, if !timed_out => {
                    timed_out = true;
                }
            }
            // Entries the policy gate holds for their identity are wanted, just not yet in
            // the reconciler: removing what they back now (an adopted entry, endpoint or pod
            // link after a restart) would delete live state and write it back a moment
            // later. Wait for them, up to the sync timeout; the identity's arrival is an
            // event that brings the loop back here.
            let gate_holding = self.policy.stats().held > 0 && !timed_out;
            self.rec.hold_removals(gate_holding);
            // Policy first: an identity's entries are in the maps before its endpoints.
            self.policy.flush();
            self.rec.flush();
            // A service change shows in /status at once (tests time propagation with it).
            publish |= self.svc.publish_zone();
            // So does a pod's discovery or loss (the CNI benchmark times it).
            publish |= self.rec.take_pods_changed();

            // Readiness: the local cluster and every configured remote synced into the maps,
            // or the sync timeout passed.
            let snapshot = self.remote_status.borrow().clone();
            let mut expected: BTreeSet<String> =
                snapshot.clusters.iter().map(|s| s.name.clone()).collect();
            if snapshot.clusters.is_empty() && started.elapsed() < Duration::from_secs(10) {
                expected.extend(initial_remotes.iter().cloned());
            }
            let synced = self.rec.synced();
            let local_synced = synced.contains(&self.local);
            let missing: Vec<&String> = expected
                .iter()
                .filter(|r| !synced.contains(r.as_str()))
                .collect();
            let all = local_synced && missing.is_empty();
            let (swept_local, swept_remote) = self.rec.swept();
            if all && !swept_remote && !gate_holding {
                self.rec.sweep(true);
            } else if local_synced && timed_out && !swept_local {
                self.rec.sweep(false);
            }
            if !ready && (all || timed_out) {
                ready = true;
                ready_reason = if all {
                    format!("every cluster synced after {:?}", started.elapsed())
                } else {
                    let mut m: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
                    if !local_synced {
                        m.insert(0, self.local.to_string());
                    }
                    format!(
                        "sync timeout ({:?}) passed; not synced: {}",
                        self.sync_timeout,
                        m.join(", ")
                    )
                };
                info!(reason = %ready_reason, "ready");
                self.shared.set_ready(true);
                publish = true;
            }
            if publish {
                self.publish(&ready_reason, ready, &snapshot);
            }
        }
        info!("reconcile loop stopped: maps and programs stay in place");
    }

    fn drain(&mut self, remote_open: bool) {
        for _ in 0..DRAIN {
            let mut any = false;
            if let Ok(i) = self.local_rx.try_recv() {
                self.feed(i);
                any = true;
            }
            if remote_open {
                if let Ok(e) = self.remote_rx.try_recv() {
                    self.svc.on_remote(&e);
                    if let Some(i) = Input::from_remote(e) {
                        self.feed(i);
                    }
                    any = true;
                }
            }
            if !any {
                break;
            }
        }
    }

    fn publish(&self, reason: &str, ready: bool, snapshot: &remote::Snapshot) {
        let mut report = self.base.clone();
        report.ready = ready;
        report.ready_reason = reason.to_owned();
        report.local = self.local_status.borrow().clone();
        report.remote_clusters = snapshot.clusters.clone();
        report.datapath = self.rec.report();
        report.services = self.svc.services.status();
        report.policy = self.policy.stats();
        report.nodes = self.nodes.report();
        let maps = &self.rec.datapath_ref().maps;
        for program in Program::ALL {
            if let Ok(values) = maps.counters(program).read() {
                report.programs.insert(
                    program.name().to_owned(),
                    clustermesh_ebpf_abi::Counter::ALL
                        .iter()
                        .map(|c| (c.name().to_owned(), values.get(*c)))
                        .collect(),
                );
            }
        }
        if let Some(v) = self.policy.verdicts() {
            report.policy.ct_replies = v.ct_replies;
            self.flows_lost.store(v.flows_lost, Ordering::Relaxed);
            self.metrics.observe_policy(&v);
        }
        self.metrics.observe(&report);
        self.shared.publish(report);
    }
}

impl Loop {
    /// Nodes go to the node table; every other input passes the policy hook (identities,
    /// policies, the identity gate) before the reconciler sees what it lets through.
    fn feed(&mut self, input: Input) {
        match &input {
            Input::Node {
                cluster,
                name,
                node,
            } => {
                self.nodes.apply(cluster, name, node.clone());
                return;
            }
            Input::Drained { cluster } => self.nodes.remove_cluster(cluster),
            _ => {}
        }
        let mut out = std::mem::take(&mut self.fed);
        self.policy.input(input, &mut out);
        for i in out.drain(..) {
            self.rec.handle(i);
        }
        self.fed = out;
    }
}
