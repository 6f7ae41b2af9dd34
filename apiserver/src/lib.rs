//! clustermesh-apiserver: reads one cluster's source (the Kubernetes API, or a manifest
//! directory), allocates
//! security identities, and publishes nodes, identities, ipcache entries, global services and
//! MCS-API exports into the cluster's etcd in Cilium's kvstore v1 format, plus every service
//! and policy under `clustermesh/local/v1/` for the cluster's own agents. It can run that etcd
//! itself (embedded, supervised) or use an existing one.
//!
//! It must not talk to other clusters (that is the syncer's remote manager / kvstoremesh) and
//! never programs a datapath.

pub mod components;
pub mod config;
mod error;
pub mod etcd;
pub mod export;
pub mod health;
pub mod identity;
pub mod kvstoremesh;
pub mod source;
pub mod users;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clustermesh_syncer::remote::Backoff;
use clustermesh_syncer::{writer, EtcdConfig, Metrics as KvMetrics, Writer};
use clustermesh_types::{kvstore, model::format_rfc3339};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use config::{Config, EtcdMode};
use error::EtcdContext;
pub use error::{Error, Result};
use export::{Exporter, Store};
use health::Status;
use source::manifests::{self, Published};

/// How often the heartbeat is written (Cilium: 1 min).
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(60);
/// How often etcd is probed while idle.
pub const ETCD_PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// How often the cluster config is re-enforced (Cilium: 5 min).
pub const CLUSTER_CONFIG_INTERVAL: Duration = Duration::from_secs(5 * 60);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    source_cluster: String,
}

/// The apiserver's own metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// kvstore metrics.
    pub kv: Arc<KvMetrics>,
    bootstrap_seconds: Family<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    export_problems: Counter,
    outside_cluster_cidrs: Gauge,
    manifest_errors: Gauge,
    exported_keys: Family<StoreLabel, Gauge>,
    syncs: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreLabel {
    scope: String,
}

impl Metrics {
    /// Registers everything under `cilium_clustermesh_apiserver_`.
    pub fn registry(&self) -> Registry {
        let mut top = Registry::default();
        let root = top.sub_registry_with_prefix("cilium_clustermesh_apiserver");
        self.kv.register(root);
        root.register(
            "bootstrap_seconds",
            "Seconds from start until every store's initial sync completed",
            self.bootstrap_seconds.clone(),
        );
        root.register(
            "export_problems",
            "Objects that could not be exported",
            self.export_problems.clone(),
        );
        root.register(
            "export_outside_cluster_cidrs",
            "Endpoint IPs and node pod CIDRs currently left out of the export because they are outside --cluster-cidr",
            self.outside_cluster_cidrs.clone(),
        );
        root.register(
            "manifest_errors",
            "Manifest files that currently do not parse",
            self.manifest_errors.clone(),
        );
        root.register(
            "exported_keys",
            "Keys currently published, per store",
            self.exported_keys.clone(),
        );
        root.register(
            "syncs",
            "Completed synchronisations of the source to etcd",
            self.syncs.clone(),
        );
        top
    }
}

/// Runs the apiserver until `cancel`.
pub async fn run(cfg: Config, cancel: CancellationToken) -> Result<()> {
    let started = Instant::now();
    let metrics = Metrics::default();
    let remote_metrics = clustermesh_syncer::remote::Metrics::default();
    let mut registry = metrics.registry();
    let status = Arc::new(Status::default());
    status
        .reporters()
        .register(registry.sub_registry_with_prefix("cilium_clustermesh_apiserver"));
    let components = components::Components::new(status.reporters(), cfg.enable_mcs_api);
    let kube_metrics = source::kubernetes::Metrics::default();
    if matches!(cfg.source, config::Source::Kubernetes(_)) {
        kube_metrics.register(registry.sub_registry_with_prefix("cilium_clustermesh_apiserver"));
    }
    // The embedded etcd's certificates are ours to report: etcd reads them, not us.
    let certificate_files = match (&cfg.etcd, &cfg.state_dir) {
        (EtcdMode::Embedded { .. }, Some(state)) => clustermesh_health::certificates::Extra(vec![
            (state.join("certs").join("server.crt"), "server"),
            (state.join("certs").join("ca.crt"), "ca"),
        ]),
        _ => Default::default(),
    };
    clustermesh_health::certificates::register(&mut registry, certificate_files.clone());
    if cfg.kvstoremesh.is_some() {
        remote_metrics
            .register_kvstoremesh(registry.sub_registry_with_prefix("cilium_kvstoremesh"));
    }
    let registry = Arc::new(registry);
    status.update(|r| r.cluster = cfg.cluster.name.to_string());
    status.set_certificate_files(certificate_files);
    let mut tasks: JoinSet<Result<()>> = JoinSet::new();

    let listeners = [
        (
            Some(cfg.health_addr),
            "/readyz and /healthz",
            "--health-addr",
        ),
        (
            cfg.metrics_addr.filter(|a| *a != cfg.health_addr),
            "/metrics",
            "--metrics-addr",
        ),
    ];
    for (addr, what, flag) in listeners {
        let Some(addr) = addr else { continue };
        let listen_error = move |source| Error::Listen {
            what,
            addr,
            flag,
            source,
        };
        let server = health::serve(addr, status.clone(), registry.clone(), cancel.child_token())
            .await
            .map_err(listen_error)?;
        tasks.spawn(
            async move { server.await.map_err(listen_error) }
                .instrument(info_span!("health", what)),
        );
    }

    // etcd. `etcd_up` turns true once the embedded etcd serves with its users and roles in
    // place (always true for an external etcd), so readiness never precedes RBAC.
    let (up_tx, etcd_up) =
        watch::channel(matches!(cfg.etcd, EtcdMode::External(_)) && !cfg.etcd_init);
    let etcd_cfg = match &cfg.etcd {
        EtcdMode::External(path) => {
            let c = EtcdConfig::load(path).etcd("reading the --etcd-config file")?;
            if cfg.etcd_init {
                tasks.spawn(
                    users::etcd_init(
                        c.clone(),
                        cfg.cluster.name.to_string(),
                        up_tx,
                        cancel.child_token(),
                    )
                    .instrument(info_span!("etcd-init")),
                );
            }
            c
        }
        EtcdMode::Embedded { listen, peer_port } => {
            let state = cfg.state_dir.clone().ok_or(Error::NoStateDir)?;
            let certs = state.join("certs");
            if !certs.join("server.crt").exists() {
                return Err(Error::NoCertificates {
                    command: format!(
                        "clustermesh enable --cluster-name {} --cluster-id {} --state-dir {}",
                        cfg.cluster.name,
                        cfg.cluster.id,
                        state.display()
                    ),
                    certs,
                });
            }
            let e = etcd::Embedded {
                binary: std::env::var_os("CLUSTERMESH_ETCD_BIN")
                    .map(Into::into)
                    .unwrap_or_else(|| "/usr/bin/etcd".into()),
                data_dir: state.join("etcd"),
                listen: listen.clone(),
                peer_port: *peer_port,
                certs_dir: certs.clone(),
                cluster: cfg.cluster.name.to_string(),
                log_file: state.join("etcd.log"),
                pdeathsig_wrapper: etcd::find_setpriv(),
            };
            let client_cfg = e.client_config(&format!("admin-{}", cfg.cluster.name));
            let token = cancel.child_token();
            tasks.spawn(etcd::supervise(e, up_tx, token).instrument(info_span!("etcd")));
            client_cfg
        }
    };

    // Cilium's cluster users: the peers `clustermesh connect` let in.
    if let Some(path) = &cfg.cluster_users {
        tasks.spawn(
            users::run(
                path.clone(),
                etcd_cfg.clone(),
                cfg.cluster.name.to_string(),
                etcd_up.clone(),
                cancel.child_token(),
            )
            .instrument(info_span!("cluster-users")),
        );
    }

    // KVStoreMesh: remote clusters mirrored into the local etcd.
    if let Some(km) = &cfg.kvstoremesh {
        let opts = kvstoremesh::Options {
            local: cfg.cluster.clone(),
            config_dir: km.config_dir.clone(),
            local_etcd: etcd_cfg.clone(),
            lease_ttl: cfg.lease_ttl,
            drain_grace: km.drain_grace,
            per_cluster_ready_timeout: km.per_cluster_ready_timeout,
            global_ready_timeout: km.global_ready_timeout,
            cache_ttl: km.cache_ttl,
            connect: cfg.connect.clone(),
        };
        tasks.spawn(
            kvstoremesh::run(
                opts,
                remote_metrics.clone(),
                metrics.kv.clone(),
                status.clone(),
                cancel.child_token(),
            )
            .instrument(info_span!("kvstoremesh")),
        );
    }

    // Source.
    let (src_tx, src_rx) = watch::channel(Published::default());
    match &cfg.source {
        config::Source::Manifests(dir) => {
            let run = manifests::run(
                dir.clone(),
                Duration::from_millis(20),
                src_tx,
                cancel.child_token(),
            );
            tasks.spawn(
                async move { Ok(run.await?) }
                    .instrument(info_span!("source", dir = %dir.display())),
            );
        }
        config::Source::Kubernetes(client_cfg) => {
            let client = client_cfg.client().await?;
            let opts = source::kubernetes::Options {
                enable_mcs_api: cfg.enable_mcs_api,
                ..Default::default()
            };
            let source_status = status.clone();
            let source_metrics = kube_metrics.clone();
            let token = cancel.child_token();
            tasks.spawn(
                async move {
                    source::kubernetes::run(
                        client,
                        opts,
                        src_tx,
                        source_status,
                        source_metrics,
                        token,
                    )
                    .await
                }
                .instrument(info_span!("source", kind = "kubernetes")),
            );
        }
    }

    // Export.
    let allocator = identity::Allocator::new(
        cfg.cluster.identity_range(),
        cfg.state_dir.as_ref().map(|d| d.join("identities.json")),
    )?;
    if cfg.cluster_cidrs.is_empty() {
        info!(
            "no --cluster-cidr: endpoint IPs and node pod CIDRs are exported whatever their range"
        );
    } else {
        info!(cluster_cidrs = %cfg.cluster_cidrs, "exporting only addresses inside the cluster CIDRs");
    }
    let exporter = Exporter::new(
        export::Options {
            cluster: cfg.cluster.clone(),
            enable_mcs_api: cfg.enable_mcs_api,
            default_global_namespace: cfg.default_global_namespace,
            service_v2: cfg.service_v2,
            enable_cilium_endpoint_slice: cfg.enable_cilium_endpoint_slice,
            cluster_cidrs: cfg.cluster_cidrs.clone(),
        },
        allocator,
    );
    let ctx = ExportCtx {
        etcd_up: etcd_up.clone(),
        cfg: cfg.clone(),
        etcd: etcd_cfg,
        connect: cfg.connect.clone(),
        status: status.clone(),
        components,
        metrics: metrics.clone(),
        started,
    };
    tasks.spawn(
        export_loop(ctx, exporter, src_rx, cancel.child_token())
            .instrument(info_span!("export", cluster = %cfg.cluster.name)),
    );

    info!(cluster = %cfg.cluster.name, id = cfg.cluster.id, health = %cfg.health_addr, "clustermesh-apiserver started");
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                if !cancel.is_cancelled() {
                    warn!(error = %e, "task failed; shutting down");
                    result = Err(e);
                }
                cancel.cancel();
            }
            Err(e) => {
                cancel.cancel();
                result = Err(Error::Task {
                    task: "apiserver",
                    source: e,
                });
            }
        }
    }
    result
}

struct ExportCtx {
    etcd_up: watch::Receiver<bool>,
    cfg: Config,
    etcd: EtcdConfig,
    connect: clustermesh_syncer::ConnectConfig,
    status: Arc<Status>,
    components: components::Components,
    metrics: Metrics,
    started: Instant,
}

async fn export_loop(
    ctx: ExportCtx,
    mut exporter: Exporter,
    mut src: watch::Receiver<Published>,
    cancel: CancellationToken,
) -> Result<()> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    let mut seeded = false;
    let mut bootstrapped = false;
    // When the source's first scan was seen (the etcd session set-up overlaps with it).
    let mut source_ready: Option<Duration> = None;
    let mut etcd_up = ctx.etcd_up.clone();
    loop {
        if cancel.is_cancelled() {
            return Ok(());
        }
        // An embedded etcd that is (re)starting is not ours to write to until its users and
        // roles are in place.
        while !*etcd_up.borrow_and_update() {
            ctx.status.set_ready(false);
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                r = etcd_up.changed() => if r.is_err() { return Ok(()) },
            }
        }
        let connected = clustermesh_syncer::connect(&ctx.etcd, &ctx.connect).await;
        let client = match connected {
            Ok(c) => c,
            Err(e) => {
                ctx.status.set_ready(false);
                ctx.components.etcd_down(&e.to_string());
                ctx.status.update(|r| {
                    r.etcd_connected = false;
                    r.last_etcd_error = Some(e.to_string());
                });
                let wait = backoff.next_delay();
                warn!(error = %e, retry_in = ?wait, "etcd unreachable");
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(wait) => continue,
                }
            }
        };
        let session = cancel.child_token();
        let res = session_loop(
            &mut source_ready,
            &ctx,
            &mut exporter,
            &mut src,
            client,
            &session,
            &mut seeded,
            &mut bootstrapped,
            &mut backoff,
        )
        .await;
        session.cancel();
        if let Err(e) = res {
            ctx.status.set_ready(false);
            ctx.components.etcd_down(&format!("{e:#}"));
            ctx.status.update(|r| {
                r.etcd_connected = false;
                r.last_etcd_error = Some(e.to_string());
            });
            let wait = backoff.next_delay();
            warn!(error = %e, retry_in = ?wait, "etcd session ended; reconnecting");
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session_loop(
    source_ready: &mut Option<Duration>,
    ctx: &ExportCtx,
    exporter: &mut Exporter,
    src: &mut watch::Receiver<Published>,
    client: clustermesh_syncer::Client,
    session: &CancellationToken,
    seeded: &mut bool,
    bootstrapped: &mut bool,
    backoff: &mut Backoff,
) -> Result<()> {
    let cluster = ctx.cfg.cluster.name.to_string();
    let wcfg = writer::Config {
        lease_ttl: ctx.cfg.lease_ttl,
        ..Default::default()
    };
    let (mut w, keepalive) = Writer::new(client, wcfg, ctx.metrics.kv.clone(), session.clone())
        .etcd("creating the etcd writer")?;
    let mut tasks = JoinSet::new();
    tasks.spawn(keepalive.instrument(info_span!("leases")));

    // Reconcile with what is already there instead of rewriting it.
    let prefixes: Vec<String> = Store::ALL.iter().map(|s| s.prefix(&cluster)).collect();
    let mut keys: Vec<String> = Store::ALL.iter().map(|s| s.synced_key(&cluster)).collect();
    keys.push(kvstore::cluster_config_key(&cluster));
    keys.push(kvstore::HEARTBEAT_KEY.to_string());
    w.adopt_all(&prefixes, &keys)
        .await
        .etcd("reading what an earlier apiserver left in etcd")?;
    if !*seeded {
        // Identities already in etcd keep their numbers.
        let (kvs, _) =
            clustermesh_syncer::list::list_prefix(w.client(), &Store::Identities.prefix(&cluster))
                .await
                .etcd("reading the identities already in etcd")?;
        for kv in kvs {
            if let Ok(id) = kvstore::parse_identity_key(&kv.key) {
                if let Ok(labels) = String::from_utf8(kv.value) {
                    exporter.allocator_mut().seed(&labels, id);
                }
            }
        }
        *seeded = true;
    }
    ctx.status.update(|r| {
        r.etcd_connected = true;
        r.last_etcd_error = None;
    });
    ctx.components.etcd_up();
    w.enforce_key(
        &kvstore::cluster_config_key(&cluster),
        exporter.cluster_config(),
    )
    .await
    .etcd("writing the cluster config")?;
    w.force_put_key(
        kvstore::HEARTBEAT_KEY,
        format_rfc3339(std::time::SystemTime::now()).into_bytes(),
    )
    .await
    .etcd("writing the heartbeat")?;
    // Connecting and adopting above overlapped with the source's first scan (parsing
    // manifests takes tens of milliseconds for 10k pods); the export needs it from here on.
    let etcd_setup = ctx.started.elapsed();
    while src.borrow().generation == 0 {
        tokio::select! {
            _ = session.cancelled() => return Ok(()),
            r = src.changed() => if r.is_err() { return Ok(()) },
        }
    }
    let source_ready = *source_ready.get_or_insert_with(|| ctx.started.elapsed());
    let lease_lost = w.lease_lost();
    let mut heartbeat = tokio::time::interval(HEARTBEAT_INTERVAL);
    heartbeat.tick().await;
    let mut enforce = tokio::time::interval(CLUSTER_CONFIG_INTERVAL);
    enforce.tick().await;
    // etcd may vanish while we have nothing to write: probe it so /readyz tells the truth.
    let mut probe = tokio::time::interval(ETCD_PROBE_INTERVAL);
    probe.tick().await;
    let probe_client = w.client().clone();
    let mut synced: BTreeMap<Store, bool> = BTreeMap::new();
    for store in Store::ALL {
        synced.insert(store, w.knows(&store.synced_key(&cluster)));
    }

    // The snapshot of the last pass, what the next incremental pass starts from.
    let mut last: Option<Arc<source::Snapshot>> = None;
    let mut force_full = true;
    let mut problems: Vec<export::Problem> = Vec::new();
    loop {
        let published = src.borrow_and_update().clone();
        let snapshot = published.snapshot.clone();
        // One watch event changes a few keys: compute and write only those (see
        // `export::incremental`); a full pass when there is no earlier pass in this etcd
        // session to start from, or when the change is not local.
        let incremental = match last.as_ref().filter(|_| !force_full) {
            Some(prev) => export::Delta::between(prev, &snapshot, exporter.options())
                .and_then(|d| exporter.compute_incremental(prev, &snapshot, &d)),
            None => Err("first pass of this etcd session"),
        };
        force_full = false;
        match incremental {
            Ok(inc) => {
                let t = Instant::now();
                let keys = inc.changes.len();
                let st = w
                    .apply_changes(inc.changes.into_vec())
                    .await
                    .etcd("writing an incremental export")?;
                problems.retain(|p| !inc.recomputed.contains(&p.object));
                for p in &inc.problems {
                    warn!(object = %p.object, problem = %p.message, "not exported");
                }
                ctx.metrics
                    .export_problems
                    .inc_by(inc.problems.len() as u64);
                problems.extend(inc.problems);
                let mut counts = BTreeMap::new();
                for store in Store::ALL {
                    let n = w.count_prefix(&store.prefix(&cluster));
                    counts.insert(store.name().to_string(), n);
                    ctx.metrics
                        .exported_keys
                        .get_or_create(&StoreLabel {
                            scope: store.name().into(),
                        })
                        .set(n as i64);
                }
                if let Err(e) = exporter.allocator_mut().save() {
                    warn!(error = %e, "cannot save identity allocations");
                }
                ctx.metrics.syncs.inc();
                ctx.metrics
                    .manifest_errors
                    .set(published.errors.len() as i64);
                let source_errors: Vec<String> =
                    published.errors.iter().map(|e| e.to_string()).collect();
                ctx.components
                    .exported(&source_errors, exporter.service_export_crd(&snapshot));
                ctx.metrics
                    .outside_cluster_cidrs
                    .set(outside_cluster_cidrs(&problems));
                ctx.status.update(|r| {
                    r.stores = counts;
                    r.manifest_errors = source_errors;
                    r.export_problems = problems
                        .iter()
                        .map(|p| format!("{}: {}", p.object, p.message))
                        .collect();
                    r.source_objects = published.snapshot.len();
                });
                tracing::debug!(took = ?t.elapsed(), keys, put = st.put, deleted = st.deleted, generation = published.generation, "incremental export pass");
            }
            Err(why) => {
                if last.is_some() {
                    tracing::debug!(reason = why, "full export pass");
                }
                problems = full_pass(
                    ctx,
                    exporter,
                    &mut w,
                    &published,
                    &mut synced,
                    bootstrapped,
                    etcd_setup,
                    source_ready,
                )
                .await?;
                // For the incremental passes that follow.
                exporter.build_index(&snapshot);
            }
        }
        last = Some(snapshot);
        backoff.reset();

        // Wait for something that needs a new export pass; periodic work happens in place.
        loop {
            tokio::select! {
                _ = session.cancelled() => return Ok(()),
                r = src.changed() => {
                    if r.is_err() { return Ok(()); }
                    break;
                }
                _ = lease_lost.notified() => {
                    info!("re-writing keys of lost leases");
                    force_full = true;
                    break;
                }
                _ = heartbeat.tick() => {
                    w.force_put_key(kvstore::HEARTBEAT_KEY, format_rfc3339(std::time::SystemTime::now()).into_bytes()).await.etcd("writing the heartbeat")?;
                }
                _ = enforce.tick() => {
                    if w.enforce_key(&kvstore::cluster_config_key(&cluster), exporter.cluster_config()).await.etcd("re-enforcing the cluster config")? {
                        warn!("cluster config was missing or changed in etcd; re-written");
                    }
                }
                _ = probe.tick() => {
                    match tokio::time::timeout(ETCD_PROBE_INTERVAL, probe_client.probe()).await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return Err(Error::Probe(e)),
                        Err(_) => return Err(Error::ProbeTimeout(ETCD_PROBE_INTERVAL)),
                    }
                }
                Some(j) = tasks.join_next() => {
                    if let Err(source) = j {
                        return Err(Error::Task { task: "lease keep-alive", source });
                    }
                }
            }
        }
    }
}

/// One full export pass: every store computed from `published` and synced by diff against
/// what the writer knows is in etcd; then the canaries still missing. Returns the problems.
#[allow(clippy::too_many_arguments)]
async fn full_pass(
    ctx: &ExportCtx,
    exporter: &mut Exporter,
    w: &mut Writer,
    published: &Published,
    synced: &mut BTreeMap<Store, bool>,
    bootstrapped: &mut bool,
    etcd_setup: Duration,
    source_ready: Duration,
) -> Result<Vec<export::Problem>> {
    let cluster = ctx.cfg.cluster.name.to_string();
    let t = Instant::now();
    // Endpoint stores first; while they are written, compute the service stores.
    let snapshot = published.snapshot.clone();
    let (mut desired, mut problems) = exporter.compute_endpoints(&snapshot);
    let computed = t.elapsed();
    let services_compute;
    let empty = BTreeMap::new();
    let prefixes: Vec<String> = Store::ALL.iter().map(|s| s.prefix(&cluster)).collect();
    let first = [Store::Nodes, Store::Identities, Store::Ip];
    let part = |stores: &[Store]| -> Vec<(usize, Store)> {
        Store::ALL
            .iter()
            .enumerate()
            .filter(|(_, s)| stores.contains(s))
            .map(|(i, s)| (i, *s))
            .collect()
    };
    let rest: Vec<Store> = Store::ALL
        .iter()
        .copied()
        .filter(|s| !first.contains(s))
        .collect();
    let (stats_a, stats_b, services) = {
        let batch_a: Vec<(&str, &BTreeMap<String, Vec<u8>>)> = part(&first)
            .into_iter()
            .map(|(i, s)| (prefixes[i].as_str(), desired.get(&s).unwrap_or(&empty)))
            .collect();
        // The endpoint stores' transactions run in a task of their own while the
        // service stores are computed here.
        let pending_a = w
            .begin_sync(&batch_a)
            .await
            .etcd("writing nodes, identities and ipcache entries")?;
        let ts = Instant::now();
        let (services, more) = exporter.compute_services(&snapshot);
        services_compute = ts.elapsed();
        problems.extend(more);
        // Streamed: the service stores' transactions start as soon as they are computed,
        // beside the endpoint stores' still in flight, instead of after them (the prefixes
        // are disjoint; the writer accounts leases when a sync begins and records keys when
        // it finishes). The canaries still wait for both.
        let batch_b: Vec<(&str, &BTreeMap<String, Vec<u8>>)> = part(&rest)
            .into_iter()
            .map(|(i, s)| (prefixes[i].as_str(), services.get(&s).unwrap_or(&empty)))
            .collect();
        let pending_b = w
            .begin_sync(&batch_b)
            .await
            .etcd("writing services, service exports and endpoint slices")?;
        let res_a = w.finish(pending_a).await;
        let res_b = w.finish(pending_b).await;
        (
            res_a.etcd("writing nodes, identities and ipcache entries")?,
            res_b.etcd("writing services, service exports and endpoint slices")?,
            services,
        )
    };
    desired.extend(services);
    let batch: Vec<(&str, &BTreeMap<String, Vec<u8>>)> = Store::ALL
        .iter()
        .zip(&prefixes)
        .map(|(store, prefix)| (prefix.as_str(), desired.get(store).unwrap_or(&empty)))
        .collect();
    let mut stats = vec![writer::Stats::default(); Store::ALL.len()];
    for ((i, _), st) in part(&first).into_iter().zip(stats_a) {
        stats[i] = st;
    }
    for ((i, _), st) in part(&rest).into_iter().zip(stats_b) {
        stats[i] = st;
    }
    let mut counts = BTreeMap::new();
    for ((store, (_, want)), st) in Store::ALL.iter().zip(&batch).zip(&stats) {
        counts.insert(store.name().to_string(), want.len());
        ctx.metrics
            .exported_keys
            .get_or_create(&StoreLabel {
                scope: store.name().into(),
            })
            .set(want.len() as i64);
        if st.put + st.deleted > 0 {
            tracing::debug!(
                store = store.name(),
                put = st.put,
                deleted = st.deleted,
                "synced"
            );
        }
    }
    // Every store's initial write is complete: publish the canaries still missing.
    let now = format_rfc3339(std::time::SystemTime::now());
    let missing: Vec<(String, Vec<u8>)> = Store::ALL
        .iter()
        .filter(|s| !synced.get(s).copied().unwrap_or(false))
        .map(|s| (s.synced_key(&cluster), now.clone().into_bytes()))
        .collect();
    if !missing.is_empty() {
        w.put_keys(missing)
            .await
            .etcd("writing the synced canaries")?;
        for store in Store::ALL {
            synced.insert(store, true);
        }
    }
    if let Err(e) = exporter.allocator_mut().save() {
        warn!(error = %e, "cannot save identity allocations");
    }
    ctx.metrics.syncs.inc();
    ctx.metrics.export_problems.inc_by(problems.len() as u64);
    ctx.metrics
        .manifest_errors
        .set(published.errors.len() as i64);
    let source_errors: Vec<String> = published.errors.iter().map(|e| e.to_string()).collect();
    ctx.components
        .exported(&source_errors, exporter.service_export_crd(&snapshot));
    ctx.metrics
        .outside_cluster_cidrs
        .set(outside_cluster_cidrs(&problems));
    ctx.status.update(|r| {
        r.stores = counts;
        r.manifest_errors = published.errors.iter().map(|e| e.to_string()).collect();
        r.export_problems = problems
            .iter()
            .map(|p| format!("{}: {}", p.object, p.message))
            .collect();
        r.source_objects = published.snapshot.len();
    });
    if !*bootstrapped {
        let secs = ctx.started.elapsed().as_secs_f64();
        ctx.metrics
            .bootstrap_seconds
            .get_or_create(&ClusterLabel {
                source_cluster: cluster.clone(),
            })
            .set(secs);
        info!(
            seconds = secs,
            etcd_setup = etcd_setup.as_secs_f64(),
            source_read = source_ready.as_secs_f64(),
            compute = computed.as_secs_f64(),
            services_compute_overlapped = services_compute.as_secs_f64(),
            write = (t.elapsed() - computed).as_secs_f64(),
            keys = w.known_keys(),
            leases = w.lease_count(),
            "initial sync complete"
        );
        *bootstrapped = true;
    }
    ctx.status.set_ready(true);
    info!(took = ?t.elapsed(), compute = ?computed, generation = published.generation, objects = published.snapshot.len(), "export pass");
    Ok(problems)
}

/// How many of `problems` are refusals of the cluster-CIDR rule (`export::cidrs`).
fn outside_cluster_cidrs(problems: &[export::Problem]) -> i64 {
    let n = problems
        .iter()
        .filter(|p| p.kind == export::ProblemKind::OutsideClusterCidrs)
        .count();
    i64::try_from(n).unwrap_or(i64::MAX)
}
