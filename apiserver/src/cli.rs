//! The apiserver binary's command line: the flags (clap, Cilium's names where they exist),
//! merged over the optional `--config` file and validated into the library's
//! [`Config`]. It must not hold logic beyond settings: the apiserver itself is the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Parser};
use clustermesh_apiserver::config::{
    duration, invalid, source, Config, Error, EtcdMode, File, KvstoreMesh, Result,
};
use clustermesh_apiserver::export::ServiceV2Mode;
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};
use clustermesh_types::cluster_cidrs::ClusterCidrs;

/// Command-line flags. Every flag may also come from `--config FILE` (same names, YAML,
/// kebab-case); flags win. Cilium's flags also come from the environment, as Cilium binds
/// them (upper case, `-` → `_`: `CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE=true` ≡
/// `--clustermesh-default-global-namespace=true`); a flag wins over the environment, the
/// environment over the file. Our own flags (paths, addresses) are not read from the
/// environment: their names are too generic (`CONFIG`, `MANIFESTS`).
#[derive(Debug, Parser, Default)]
#[command(
    name = "clustermesh-apiserver",
    version,
    about = "Publishes one cluster's state into its etcd, Cilium-compatible"
)]
pub struct Args {
    /// YAML file with any of the settings below.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Name of the local cluster.
    #[arg(long, env = "CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Numeric ID of the local cluster (1..=max-connected-clusters).
    #[arg(long, env = "CLUSTER_ID")]
    pub cluster_id: Option<u32>,
    /// 255 or 511.
    #[arg(long, env = "MAX_CONNECTED_CLUSTERS")]
    pub max_connected_clusters: Option<u32>,
    /// Directory of Kubernetes manifests to export (the cluster's source).
    #[arg(long)]
    pub manifests: Option<PathBuf>,
    /// Where the cluster's state comes from: `kubernetes` (the API server) or `manifests`.
    /// Default: `manifests` with --manifests, `kubernetes` with --kubeconfig/--context or
    /// inside a pod, else `manifests` from the state dir.
    #[arg(long, value_parser = ["kubernetes", "manifests"])]
    pub source: Option<String>,
    /// kubeconfig file for the Kubernetes source (default: $KUBECONFIG, ~/.kube/config;
    /// inside a pod without it: the pod's service account).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig context (default: the file's current context).
    #[arg(long)]
    pub context: Option<String>,
    /// Use an existing etcd described by this client config file (admin certificate).
    #[arg(long)]
    pub etcd_config: Option<PathBuf>,
    /// State directory (certificates, embedded etcd data, identity allocations).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Run an embedded etcd from the state dir (default when no --etcd-config is given).
    #[arg(long)]
    pub embedded_etcd_listen: Option<String>,
    /// Peer port of the embedded etcd (127.0.0.1 only).
    #[arg(long)]
    pub embedded_etcd_peer_port: Option<u16>,
    /// Export MCS-API ServiceExports.
    #[arg(long, env = "CLUSTERMESH_ENABLE_MCS_API", action = ArgAction::SetTrue)]
    pub clustermesh_enable_mcs_api: bool,
    /// Whether namespaces without the `clustermesh.cilium.io/global` annotation are global.
    #[arg(long, env = "CLUSTERMESH_DEFAULT_GLOBAL_NAMESPACE", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub clustermesh_default_global_namespace: Option<bool>,
    /// What global services export (Cilium's service v2): `prefer-legacy` (default: both
    /// `services/v1` and `endpointslices/v1`, readers use the first), `prefer-endpointslice`
    /// (both, readers told to use the slices), `only-endpointslice` (slices only), or
    /// `disabled` (ours: `services/v1` only).
    #[arg(long, env = "CLUSTERMESH_SERVICE_V2")]
    pub clustermesh_service_v2: Option<ServiceV2Mode>,
    /// Read endpoints from CiliumEndpointSlices instead of CiliumEndpoints.
    #[arg(long, env = "ENABLE_CILIUM_ENDPOINT_SLICE", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_cilium_endpoint_slice: Option<bool>,
    /// TTL of the etcd leases carrying every key (e.g. `15m`).
    #[arg(long, env = "KVSTORE_LEASE_TTL", value_parser = humantime::parse_duration)]
    pub kvstore_lease_ttl: Option<Duration>,
    /// Address for /readyz and /healthz.
    #[arg(long)]
    pub health_addr: Option<SocketAddr>,
    /// Address for Prometheus /metrics.
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Log filter (e.g. `info`, `clustermesh_apiserver=debug`).
    #[arg(long)]
    pub log_level: Option<String>,
    /// Mirror every remote cluster into the local etcd under `cilium/cache/` (KVStoreMesh).
    #[arg(long, env = "ENABLE_KVSTOREMESH", num_args = 0..=1, default_missing_value = "true", action = ArgAction::Set)]
    pub enable_kvstoremesh: Option<bool>,
    /// Directory of remote cluster config files (default `<state-dir>/clustermesh/`).
    #[arg(long, env = "CLUSTERMESH_CONFIG")]
    pub clustermesh_config: Option<PathBuf>,
    /// How long a disconnected remote's cache stays after its cluster config was removed,
    /// so agents disconnect first (Cilium: 3m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub kvstoremesh_drain_grace: Option<Duration>,
    /// A remote that never connected stops holding back readiness after this (Cilium: 15s).
    #[arg(long, env = "PER_CLUSTER_READY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub per_cluster_ready_timeout: Option<Duration>,
    /// Readiness stops waiting for remotes after this (Cilium: 10m).
    #[arg(long, env = "GLOBAL_READY_TIMEOUT", value_parser = humantime::parse_duration)]
    pub global_ready_timeout: Option<Duration>,
    /// With --etcd-config: if that etcd has no users yet (a fresh sidecar), create Cilium's
    /// users and roles and enable auth, as Cilium's `etcd-init` container does.
    #[arg(long, action = ArgAction::SetTrue)]
    pub etcd_init: bool,
    /// Cilium's users file (`users: [{name: remote-<peer>, role: remote}]`, the
    /// `clustermesh-remote-users` ConfigMap): those etcd users are kept present, and
    /// `remote-*` users it no longer names are removed.
    #[arg(long)]
    pub cluster_users_config_path: Option<PathBuf>,
    /// KVStoreMesh: withdraw a disconnected remote's entries after this long (Cilium's
    /// clustermesh-cache-ttl); 0 (the default) keeps them until it comes back.
    #[arg(long, visible_alias = "cache-ttl", value_parser = humantime::parse_duration)]
    pub clustermesh_cache_ttl: Option<Duration>,
    /// HTTP/2 keepalive interval of every etcd connection while it streams (default 1s); a
    /// dead peer is noticed after interval + timeout. An external etcd must accept pings
    /// that often (`--grpc-keepalive-min-time`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub etcd_keepalive_interval: Option<Duration>,
    /// HTTP/2 keepalive timeout of every etcd connection (default 2s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub etcd_keepalive_timeout: Option<Duration>,
    /// The cluster's pod CIDRs, IPv4 and IPv6 (repeat the flag or give a comma list, as
    /// kube-controller-manager's --cluster-cidr): an endpoint IP or a node pod CIDR outside
    /// them is not exported (named in /status `export-problems`, counted in
    /// `export_outside_cluster_cidrs`). Unset or empty: no rule.
    #[arg(long, env = "CLUSTER_CIDR", value_delimiter = ',')]
    pub cluster_cidr: Vec<String>,
}

impl Args {
    /// Merges the flags over the `--config` file and validates the result.
    pub fn into_config(self) -> Result<Config> {
        let args = self;
        let file = match &args.config {
            Some(p) => File::load(p)?,
            None => File::default(),
        };
        let name = args
            .cluster_name
            .or(file.cluster_name)
            .ok_or(Error::Missing("--cluster-name"))?;
        let name = ClusterName::new(name).map_err(|e| invalid("--cluster-name", e))?;
        let max = MaxConnectedClusters::from_u32(
            args.max_connected_clusters
                .or(file.max_connected_clusters)
                .unwrap_or(255),
        )
        .map_err(|e| invalid("--max-connected-clusters", e))?;
        let id = args
            .cluster_id
            .or(file.cluster_id)
            .ok_or(Error::Missing("--cluster-id"))?;
        let cluster = ClusterInfo {
            name,
            id,
            max_connected_clusters: max,
        };
        cluster.validate().map_err(|e| invalid("--cluster-id", e))?;
        let state_dir = args.state_dir.or(file.state_dir);
        let source = source(
            args.source.or(file.source),
            args.manifests.or(file.manifests),
            args.kubeconfig.or(file.kubeconfig),
            args.context.or(file.context),
            state_dir.as_deref(),
        )?;
        let etcd = match args.etcd_config.or(file.etcd_config) {
            Some(p) => EtcdMode::External(p),
            None => {
                if state_dir.is_none() {
                    return Err(Error::Missing(
                        "either --etcd-config (existing etcd) or --state-dir (embedded etcd)",
                    ));
                }
                EtcdMode::Embedded {
                    listen: args
                        .embedded_etcd_listen
                        .or(file.embedded_etcd_listen)
                        .unwrap_or_else(|| "127.0.0.1:2379".into()),
                    peer_port: args
                        .embedded_etcd_peer_port
                        .or(file.embedded_etcd_peer_port)
                        .unwrap_or(2380),
                }
            }
        };
        let lease_ttl = match args.kvstore_lease_ttl {
            Some(d) => d,
            None => match file.kvstore_lease_ttl {
                Some(s) => humantime::parse_duration(&s)
                    .map_err(|e| invalid(format!("kvstore-lease-ttl {s:?}"), e))?,
                None => Duration::from_secs(15 * 60),
            },
        };
        let kvstoremesh = if args
            .enable_kvstoremesh
            .or(file.enable_kvstoremesh)
            .unwrap_or(true)
        {
            args.clustermesh_config
                .or(file.clustermesh_config)
                .or_else(|| state_dir.as_ref().map(|s| s.join("clustermesh")))
                .map(|config_dir| -> Result<KvstoreMesh> {
                    Ok(KvstoreMesh {
                        config_dir,
                        drain_grace: duration(
                            args.kvstoremesh_drain_grace,
                            file.kvstoremesh_drain_grace,
                            "--kvstoremesh-drain-grace",
                            Duration::from_secs(180),
                        )?,
                        per_cluster_ready_timeout: duration(
                            args.per_cluster_ready_timeout,
                            file.per_cluster_ready_timeout,
                            "--per-cluster-ready-timeout",
                            Duration::from_secs(15),
                        )?,
                        global_ready_timeout: duration(
                            args.global_ready_timeout,
                            file.global_ready_timeout,
                            "--global-ready-timeout",
                            Duration::from_secs(600),
                        )?,
                        cache_ttl: Some(duration(
                            args.clustermesh_cache_ttl,
                            file.clustermesh_cache_ttl.clone(),
                            "--clustermesh-cache-ttl",
                            Duration::ZERO,
                        )?)
                        .filter(|d| !d.is_zero()),
                    })
                })
                .transpose()?
        } else {
            None
        };
        let service_v2 = match (args.clustermesh_service_v2, file.clustermesh_service_v2) {
            (Some(mode), _) => mode,
            (None, Some(text)) => text
                .parse()
                .map_err(|e| invalid("clustermesh-service-v2", e))?,
            (None, None) => ServiceV2Mode::default(),
        };
        let etcd_init = args.etcd_init || file.etcd_init.unwrap_or(false);
        let cluster_users = args
            .cluster_users_config_path
            .or(file.cluster_users_config_path);
        let connect = clustermesh_syncer::ConnectConfig {
            keepalive: (
                duration(
                    args.etcd_keepalive_interval,
                    file.etcd_keepalive_interval,
                    "--etcd-keepalive-interval",
                    clustermesh_syncer::client::KEEPALIVE_INTERVAL,
                )?,
                duration(
                    args.etcd_keepalive_timeout,
                    file.etcd_keepalive_timeout,
                    "--etcd-keepalive-timeout",
                    clustermesh_syncer::client::KEEPALIVE_TIMEOUT,
                )?,
            ),
            ..Default::default()
        };
        let cluster_cidrs = if args.cluster_cidr.iter().any(|c| !c.trim().is_empty()) {
            ClusterCidrs::parse(&args.cluster_cidr).map_err(|e| invalid("--cluster-cidr", e))?
        } else {
            file.cluster_cidr.unwrap_or_default()
        };
        let cfg = Config {
            cluster_cidrs,
            etcd_init,
            cluster_users,
            service_v2,
            enable_cilium_endpoint_slice: args
                .enable_cilium_endpoint_slice
                .or(file.enable_cilium_endpoint_slice)
                .unwrap_or(false),
            kvstoremesh,
            connect,
            cluster,
            source,
            etcd,
            state_dir,
            enable_mcs_api: args.clustermesh_enable_mcs_api
                || file.clustermesh_enable_mcs_api.unwrap_or(false),
            default_global_namespace: args
                .clustermesh_default_global_namespace
                .or(file.clustermesh_default_global_namespace)
                .unwrap_or(true),
            lease_ttl,
            health_addr: args
                .health_addr
                .or(file.health_addr)
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9880))),
            metrics_addr: args.metrics_addr.or(file.metrics_addr),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_apiserver::config::Source;

    fn parse(flags: &[&str]) -> anyhow::Result<Config> {
        let dir = tempfile::tempdir().unwrap();
        let mut v = vec!["clustermesh-apiserver".to_string()];
        v.extend(flags.iter().map(|s| s.to_string()));
        v.push("--manifests".into());
        v.push(dir.path().display().to_string());
        v.push("--etcd-config".into());
        v.push("/nonexistent".into());
        Ok(Args::try_parse_from(v)?.into_config()?)
    }

    #[test]
    fn cilium_flags() {
        let c = parse(&[
            "--cluster-id=3",
            "--cluster-name=cluster3",
            "--clustermesh-default-global-namespace=false",
            "--clustermesh-enable-mcs-api",
        ])
        .unwrap();
        assert!(!c.default_global_namespace);
        assert!(c.enable_mcs_api);
        assert_eq!(c.cluster.id, 3);
        let c = parse(&["--cluster-id=3", "--cluster-name=cluster3"]).unwrap();
        assert!(c.default_global_namespace);
    }

    #[test]
    fn service_v2_and_cilium_endpoint_slices() {
        let c = parse(&["--cluster-id=3", "--cluster-name=c"]).unwrap();
        assert_eq!(c.service_v2, ServiceV2Mode::PreferLegacy);
        assert!(!c.enable_cilium_endpoint_slice);
        let c = parse(&[
            "--cluster-id=3",
            "--cluster-name=c",
            "--clustermesh-service-v2=only-endpointslice",
            "--enable-cilium-endpoint-slice=true",
        ])
        .unwrap();
        assert_eq!(c.service_v2, ServiceV2Mode::OnlyEndpointSlice);
        assert!(c.enable_cilium_endpoint_slice);
        let e = parse(&[
            "--cluster-id=3",
            "--cluster-name=c",
            "--clustermesh-service-v2=only-endpointslices",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--clustermesh-service-v2")
                && e.contains("prefer-legacy, prefer-endpointslice, only-endpointslice, disabled"),
            "{e}"
        );
    }

    #[test]
    fn kubernetes_source_checks_kubeconfig_and_context_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.yaml");
        let base = |extra: &[String]| {
            let mut v: Vec<String> = [
                "clustermesh-apiserver",
                "--cluster-id=1",
                "--cluster-name=c1",
                "--etcd-config=/nonexistent",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            v.extend(extra.iter().cloned());
            Args::try_parse_from(v).unwrap().into_config()
        };
        let e = base(&[format!("--kubeconfig={}", missing.display())]).unwrap_err();
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        let kc = dir.path().join("kubeconfig");
        std::fs::write(
            &kc,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'https://127.0.0.1:1'}\nusers:\n- name: u\n  user: {}\ncontexts:\n- name: prod\n  context: {cluster: c, user: u}\ncurrent-context: prod\n",
        )
        .unwrap();
        let e = base(&[
            format!("--kubeconfig={}", kc.display()),
            "--context=staging".into(),
        ])
        .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("staging")
                && msg.contains(&kc.display().to_string())
                && msg.contains("prod"),
            "{msg}"
        );
        let c = base(&[
            format!("--kubeconfig={}", kc.display()),
            "--context=prod".into(),
        ])
        .unwrap();
        assert!(matches!(c.source, Source::Kubernetes(_)));
        let e = base(&[
            format!("--kubeconfig={}", kc.display()),
            format!("--manifests={}", dir.path().display()),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("--source"), "{e}");
        let c = base(&[
            format!("--kubeconfig={}", kc.display()),
            format!("--manifests={}", dir.path().display()),
            "--source=manifests".into(),
        ])
        .unwrap();
        assert_eq!(c.source, Source::Manifests(dir.path().to_path_buf()));
    }

    #[test]
    fn cache_ttl_and_keepalives() {
        let dir = tempfile::tempdir().unwrap();
        let with = |extra: &[&str]| {
            let mut v = vec![
                "clustermesh-apiserver".to_string(),
                "--cluster-id=3".into(),
                "--cluster-name=cluster3".into(),
                "--state-dir".into(),
                dir.path().display().to_string(),
                "--manifests".into(),
                dir.path().display().to_string(),
            ];
            v.extend(extra.iter().map(|s| s.to_string()));
            Args::try_parse_from(v).unwrap().into_config()
        };
        let c = with(&[]).unwrap();
        assert_eq!(
            c.kvstoremesh.as_ref().unwrap().cache_ttl,
            None,
            "keep forever"
        );
        assert_eq!(
            c.connect.keepalive,
            (Duration::from_secs(1), Duration::from_secs(2))
        );
        let c = with(&["--cache-ttl=5m", "--etcd-keepalive-interval=3s"]).unwrap();
        assert_eq!(
            c.kvstoremesh.as_ref().unwrap().cache_ttl,
            Some(Duration::from_secs(300))
        );
        assert_eq!(c.connect.keepalive.0, Duration::from_secs(3));
        let c = with(&["--clustermesh-cache-ttl=0s"]).unwrap();
        assert_eq!(c.kvstoremesh.as_ref().unwrap().cache_ttl, None);
        let e = with(&["--etcd-keepalive-timeout=0s"]).unwrap_err();
        assert!(e.to_string().contains("--etcd-keepalive"), "{e}");
    }

    #[test]
    fn cluster_cidrs_from_flags_and_file() {
        let c = parse(&["--cluster-id=3", "--cluster-name=c"]).unwrap();
        assert!(c.cluster_cidrs.is_empty(), "no setting, no rule");
        let c = parse(&[
            "--cluster-id=3",
            "--cluster-name=c",
            "--cluster-cidr=10.3.0.0/16,fd00:3::/64",
            "--cluster-cidr=10.4.0.0/16",
        ])
        .unwrap();
        assert_eq!(
            c.cluster_cidrs.to_strings(),
            ["10.3.0.0/16", "fd00:3::/64", "10.4.0.0/16"]
        );
        let e = parse(&[
            "--cluster-id=3",
            "--cluster-name=c",
            "--cluster-cidr=10.3.0.1/16",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("--cluster-cidr") && e.contains("10.3.0.1/16"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("apiserver.yaml");
        std::fs::write(&file, "cluster-cidr: [10.5.0.0/16, \"fd00:5::/64\"]\n").unwrap();
        let c = parse(&[
            "--cluster-id=3",
            "--cluster-name=c",
            &format!("--config={}", file.display()),
        ])
        .unwrap();
        assert_eq!(c.cluster_cidrs.to_strings(), ["10.5.0.0/16", "fd00:5::/64"]);
    }

    #[test]
    fn bad_values_are_named() {
        let e = parse(&["--cluster-id=0", "--cluster-name=c"]).unwrap_err();
        assert!(e.to_string().contains("--cluster-id"), "{e}");
        let e = parse(&["--cluster-id=1", "--cluster-name=Bad_Name"]).unwrap_err();
        assert!(e.to_string().contains("--cluster-name"), "{e}");
        let e = parse(&[
            "--cluster-id=1",
            "--cluster-name=c",
            "--max-connected-clusters=300",
        ])
        .unwrap_err();
        assert!(e.to_string().contains("max-connected-clusters"), "{e}");
    }
}
