//! Every object of one cluster's mesh install, as typed k8s-openapi values.
//!
//! [`install`] is the cluster's base (RBAC, the name/ID ConfigMap, the etcd Service, the
//! clustermesh-apiserver Deployment with its etcd sidecar and KVStoreMesh, the agent
//! DaemonSet); [`cert_secrets`] the certificate Secrets; [`remote_users`] and
//! [`remote_secrets`] what `clustermesh connect` writes. `deploy/kubernetes/` is rendered from
//! these functions ([`render_deploy_tree`]) and `clustermesh enable --context` applies the
//! same values, so the checked-in files are what a cluster receives.
//!
//! Names follow Cilium where Cilium has one (`cilium-ca`, `clustermesh-apiserver-*-cert`,
//! `cilium-clustermesh`, `cilium-kvstoremesh`, `clustermesh-remote-users`, Service
//! `clustermesh-apiserver` on 2379 with nodePort 32379), so operators recognise them.
//!
//! What the agent may do on a node, and why (its container's capabilities, nothing else;
//! not privileged):
//! - `BPF`: load the datapath programs and create, pin and update its maps;
//! - `PERFMON`: the verifier treats programs of a loader without it as unprivileged
//!   (Spectre hardening of pointer arithmetic) and rejects some of ours;
//! - `NET_ADMIN`: attach tc (TCX) programs to pod veths and the VXLAN/underlay devices,
//!   read links, routes and neighbours over netlink;
//! - `NET_BIND_SERVICE`: the clusterset.local DNS server listens on port 53.
//!
//! Its init step (`install-cni`, no capabilities) installs `clustermesh-cni`: it reads the
//! node's `spec.podCIDR` (which the downward API does not offer) with a token of its own
//! (ServiceAccount `clustermesh-agent`, allowed to `get` nodes and nothing else; the agent's
//! container gets no token), copies the plugin into `/opt/cni/bin` and runs `clustermesh-cni
//! write-config` into `/etc/cni/net.d/10-clustermesh.conf`.
//!
//! It must not talk to a cluster: it only builds values.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    DeploymentStrategy,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapKeySelector, ConfigMapProjection, ConfigMapVolumeSource,
    Container, ContainerPort, DownwardAPIProjection, DownwardAPIVolumeFile, EmptyDirVolumeSource,
    EnvVar, EnvVarSource, HTTPGetAction, HostPathVolumeSource, KeyToPath, ObjectFieldSelector,
    PodSpec, PodTemplateSpec, Probe, ProjectedVolumeSource, Secret, SecretProjection,
    SecretVolumeSource, SecurityContext, Service, ServiceAccount, ServiceAccountTokenProjection,
    ServicePort, ServiceSpec, Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;
use serde::Serialize;
use serde_json::Value;

/// The host's CNI network configuration directory (the init step writes into it).
pub const CNI_CONF_DIR: &str = "/etc/cni/net.d";
/// The file `clustermesh-cni write-config` writes there.
pub const CNI_CONF_FILE: &str = "10-clustermesh.conf";
/// The host's CNI plugin directory (the init step copies `clustermesh-cni` into it).
pub const CNI_BIN_DIR: &str = "/opt/cni/bin";
/// The plugin's state on the host (address allocations), as `clustermesh-cni` is told.
pub const CNI_STATE_DIR: &str = "/var/run/clustermesh";
/// Where kube-rs's in-cluster config reads the token, CA and namespace.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "clustermesh";
/// Cilium's namespace, the default.
pub const DEFAULT_NAMESPACE: &str = "kube-system";
/// Image repository of every container (the image holds `clustermesh-apiserver`,
/// `clustermesh-agent`, `clustermesh-cni` and Debian's `etcd`).
pub const DEFAULT_IMAGE_REPOSITORY: &str = "ghcr.io/clustermesh/clustermesh";
/// The apiserver's Deployment, ServiceAccount, ClusterRole(Binding) and etcd Service.
pub const APISERVER: &str = "clustermesh-apiserver";
/// The agent DaemonSet.
pub const AGENT: &str = "clustermesh-agent";
/// The cluster's name, ID, max-connected-clusters and etcd client configs.
pub const CLUSTER_CONFIG: &str = "clustermesh-config";
/// Cilium's ConfigMap whose `cluster-name`/`cluster-id` win when present.
pub const CILIUM_CONFIG: &str = "cilium-config";
/// Cilium's users ConfigMap (`users.yaml`): the `remote-<peer>` users the apiserver keeps.
pub const REMOTE_USERS: &str = "clustermesh-remote-users";
/// Remote cluster configs of KVStoreMesh (one key per peer).
pub const KVSTOREMESH_SECRET: &str = "cilium-kvstoremesh";
/// Remote cluster configs of the agents (one key per peer; they read the KVStoreMesh cache).
pub const AGENT_REMOTES_SECRET: &str = "cilium-clustermesh";
/// The mesh CA (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "cilium-ca";
/// Cilium's `tls.caBundle` ConfigMap (key `ca.crt`): every CA this cluster's etcd trusts for
/// client certificates, when `connect --allow-mismatching-ca` joined a cluster of another CA.
pub const CA_BUNDLE: &str = "cilium-root-ca.crt";
/// Pod-template annotation of the apiserver Deployment: the SHA-256 of its CA bundle, so a
/// changed bundle rolls the pod (etcd reads its trusted CAs at start; Cilium restarts the
/// pod with `cilium.io/caBundleChangeRestartedAt` for the same reason).
pub const CA_BUNDLE_ANNOTATION: &str = "clustermesh.io/ca-bundle-sha256";
/// etcd's server certificate.
pub const SERVER_CERT: &str = "clustermesh-apiserver-server-cert";
/// `admin-<cluster>`: the apiserver and KVStoreMesh writing their own etcd.
pub const ADMIN_CERT: &str = "clustermesh-apiserver-admin-cert";
/// `local-<cluster>`: the agents reading their own etcd.
pub const LOCAL_CERT: &str = "clustermesh-apiserver-local-cert";
/// `remote-<cluster>`: this cluster's KVStoreMesh reading its peers (authMode cluster).
pub const REMOTE_CERT: &str = "clustermesh-apiserver-remote-cert";
/// etcd's client port (container and Service).
pub const ETCD_PORT: i32 = 2379;
/// Cilium's default nodePort of the etcd Service.
pub const DEFAULT_NODE_PORT: i32 = 32379;
/// The apiserver's health port (`/readyz`, `/healthz`, `/status`).
pub const HEALTH_PORT: i32 = 9880;
/// The apiserver's metrics port.
pub const METRICS_PORT: i32 = 9962;
/// The agent's health port (host network, loopback only).
pub const AGENT_HEALTH_PORT: i32 = 9890;
/// Where the apiserver keeps its etcd client config and certificates in the pod.
pub const POD_CONFIG_DIR: &str = "/etc/clustermesh";
/// The DNS domain of peers' etcd endpoints (the server certificate has `*.mesh.cilium.io`).
pub const MESH_DOMAIN: &str = "mesh.cilium.io";

/// The image every container runs by default: this version of clustermesh.
pub fn default_image() -> String {
    format!("{DEFAULT_IMAGE_REPOSITORY}:{}", env!("CARGO_PKG_VERSION"))
}

/// How peers reach the cluster's etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceType {
    /// A port on every node (Cilium's default, 32379).
    NodePort,
    /// A cloud load balancer.
    LoadBalancer,
}

impl ServiceType {
    /// Kubernetes' spelling.
    pub fn as_str(&self) -> &'static str {
        match self {
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Where etcd keeps its data (it is stateless by design: the apiserver republishes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageMedium {
    /// tmpfs: stable tail latencies (measured in TOOLCHAIN.md).
    Memory,
    /// The node's disk.
    Disk,
}

/// Everything that varies between clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Values {
    /// Namespace of every namespaced object.
    pub namespace: String,
    /// Image of every container.
    pub image: String,
    /// Cluster name.
    pub cluster_name: String,
    /// Cluster ID.
    pub cluster_id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// The etcd Service's type.
    pub service_type: ServiceType,
    /// nodePort of the etcd Service (NodePort only).
    pub node_port: i32,
    /// etcd's emptyDir medium.
    pub etcd_storage: StorageMedium,
    /// Watch ServiceExports (and grant reading them).
    pub enable_mcs_api: bool,
    /// The CAs (PEM) etcd trusts for client certificates when they are more than the
    /// cluster's own ([`CA_BUNDLE`]); `None`: the server certificate Secret's `ca.crt`.
    pub ca_bundle: Option<String>,
    /// The cluster's pod CIDRs, IPv4 and IPv6 (the ConfigMap's `cluster-cidr`, the
    /// apiserver's `--cluster-cidr`): nothing outside them is exported, and `connect` tells
    /// peers to refuse anything outside them. Empty: no rule.
    pub cluster_cidrs: Vec<String>,
}

impl Default for Values {
    fn default() -> Self {
        Self {
            namespace: DEFAULT_NAMESPACE.into(),
            image: default_image(),
            cluster_name: "default".into(),
            cluster_id: 0,
            max_connected_clusters: 255,
            service_type: ServiceType::NodePort,
            node_port: DEFAULT_NODE_PORT,
            etcd_storage: StorageMedium::Memory,
            enable_mcs_api: false,
            ca_bundle: None,
            cluster_cidrs: Vec::new(),
        }
    }
}

/// One object, typed when built and kept as its JSON for applying and printing.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// `apiVersion`.
    pub api_version: String,
    /// `kind`.
    pub kind: String,
    /// Plural resource name (URL segment).
    pub plural: String,
    /// API group ("" for core).
    pub group: String,
    /// Version.
    pub version: String,
    /// Namespace; `None` for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// The whole object as JSON (`apiVersion` and `kind` included).
    pub value: Value,
}

impl Object {
    /// From a typed k8s-openapi object.
    pub fn new<K>(k: &K) -> Self
    where
        K: k8s_openapi::Resource + k8s_openapi::Metadata<Ty = ObjectMeta> + Serialize,
        K::Scope: 'static,
    {
        let meta = k.metadata();
        let namespaced = std::any::TypeId::of::<K::Scope>()
            == std::any::TypeId::of::<k8s_openapi::NamespaceResourceScope>();
        Self {
            api_version: K::API_VERSION.to_string(),
            kind: K::KIND.to_string(),
            plural: K::URL_PATH_SEGMENT.to_string(),
            group: K::GROUP.to_string(),
            version: K::VERSION.to_string(),
            namespace: if namespaced {
                meta.namespace.clone()
            } else {
                None
            },
            name: meta.name.clone().unwrap_or_default(),
            // Serializing a k8s-openapi value cannot fail (string keys, no non-finite floats).
            value: serde_json::to_value(k).unwrap_or(Value::Null),
        }
    }

    /// kube-rs' dynamic type for it.
    pub fn api_resource(&self) -> kube::core::ApiResource {
        kube::core::ApiResource {
            group: self.group.clone(),
            version: self.version.clone(),
            api_version: self.api_version.clone(),
            kind: self.kind.clone(),
            plural: self.plural.clone(),
        }
    }

    /// `Kind namespace/name` (or `Kind name`), as messages name it.
    pub fn describe(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} {ns}/{}", self.kind, self.name),
            None => format!("{} {}", self.kind, self.name),
        }
    }
}

/// Objects as one YAML stream (`---` between documents), as `kubectl apply -f` reads it.
pub fn to_yaml(objects: &[Object]) -> String {
    let mut out = String::new();
    for o in objects {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&o.value).unwrap_or_default());
    }
    out
}

fn labels(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), component.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "clustermesh".to_string(),
        ),
        ("k8s-app".to_string(), component.to_string()),
    ])
}

fn selector(component: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("k8s-app".to_string(), component.to_string())])
}

fn meta(name: &str, namespace: Option<&str>, component: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(String::from),
        labels: Some(labels(component)),
        ..Default::default()
    }
}

fn env_config(name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: CLUSTER_CONFIG.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// [`env_config`] for a key that clusters enabled before it existed do not have (the
/// variable is then unset, which the apiserver reads as the setting's default).
fn env_config_optional(name: &str, key: &str) -> EnvVar {
    let mut e = env_config(name, key);
    if let Some(r) = e
        .value_from
        .as_mut()
        .and_then(|f| f.config_map_key_ref.as_mut())
    {
        r.optional = Some(true);
    }
    e
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                api_version: None,
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn key_to_path(key: &str, path: &str) -> KeyToPath {
    KeyToPath {
        key: key.into(),
        path: path.into(),
        mode: None,
    }
}

/// The remote cluster configs a process reads (one file per peer) next to the certificate
/// it reads them with: the projected volume of Cilium's `/var/lib/cilium/clustermesh`.
fn remotes_volume(name: &str, configs_secret: &str, cert_secret: &str, prefix: &str) -> Volume {
    Volume {
        name: name.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o400),
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: configs_secret.into(),
                        optional: Some(true),
                        items: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: cert_secret.into(),
                        optional: Some(true),
                        items: Some(vec![
                            key_to_path("tls.key", &format!("{prefix}.key")),
                            key_to_path("tls.crt", &format!("{prefix}.crt")),
                            key_to_path("ca.crt", &format!("{prefix}-ca.crt")),
                        ]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

/// What a pod with `automountServiceAccountToken: true` gets, for one container only: a
/// bound token, the cluster's CA and the namespace (what kube-rs's in-cluster config reads).
fn token_volume(name: &str) -> Volume {
    Volume {
        name: name.into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o444),
            sources: Some(vec![
                VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        path: "token".into(),
                        expiration_seconds: Some(3607),
                        audience: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: "kube-root-ca.crt".into(),
                        items: Some(vec![key_to_path("ca.crt", "ca.crt")]),
                        optional: None,
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    downward_api: Some(DownwardAPIProjection {
                        items: Some(vec![DownwardAPIVolumeFile {
                            path: "namespace".into(),
                            field_ref: Some(ObjectFieldSelector {
                                api_version: Some("v1".into()),
                                field_path: "metadata.namespace".into(),
                            }),
                            ..Default::default()
                        }]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

fn http_probe(path: &str, port: i32, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::Int(port),
            scheme: Some("HTTP".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(5),
        ..Default::default()
    }
}

fn port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

/// An etcd client config file (etcd's `clientv3/yaml` format, as the syncer reads it).
pub fn etcd_client_config(endpoint: &str, cert_dir: &str) -> String {
    format!(
        "endpoints:\n- {endpoint}\ntrusted-ca-file: {cert_dir}/ca.crt\ncert-file: {cert_dir}/tls.crt\nkey-file: {cert_dir}/tls.key\n"
    )
}

/// The cluster's name, ID and max-connected-clusters (Cilium's keys), its pod CIDRs
/// (`cluster-cidr`), and the etcd client configs of the apiserver (`admin-<c>`, on the pod's loopback) and of the agents
/// (`local-<c>`, through the Service).
pub fn cluster_config(v: &Values) -> ConfigMap {
    let svc = format!("https://{APISERVER}.{}.svc:{ETCD_PORT}", v.namespace);
    ConfigMap {
        metadata: meta(CLUSTER_CONFIG, Some(&v.namespace), APISERVER),
        data: Some(BTreeMap::from([
            ("cluster-name".into(), v.cluster_name.clone()),
            ("cluster-id".into(), v.cluster_id.to_string()),
            (
                "max-connected-clusters".into(),
                v.max_connected_clusters.to_string(),
            ),
            // Comma-separated; empty: no rule. `connect --context` reads it for the peers.
            ("cluster-cidr".into(), v.cluster_cidrs.join(",")),
            (
                "etcd-config.yaml".into(),
                etcd_client_config(
                    &format!("https://127.0.0.1:{ETCD_PORT}"),
                    &format!("{POD_CONFIG_DIR}/etcd-secrets"),
                ),
            ),
            (
                "local-etcd-config.yaml".into(),
                etcd_client_config(&svc, &format!("{POD_CONFIG_DIR}/etcd-secrets")),
            ),
        ])),
        ..Default::default()
    }
}

fn service_account(v: &Values) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(APISERVER, Some(&v.namespace), APISERVER),
        ..Default::default()
    }
}

fn cluster_role(v: &Values) -> ClusterRole {
    ClusterRole {
        metadata: meta(APISERVER, None, APISERVER),
        rules: Some(crate::resources::rbac_rules(v.enable_mcs_api)),
        ..Default::default()
    }
}

fn cluster_role_binding(v: &Values, component: &str) -> ClusterRoleBinding {
    ClusterRoleBinding {
        metadata: meta(component, None, component),
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: "ClusterRole".into(),
            name: component.into(),
        },
        subjects: Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: component.into(),
            namespace: Some(v.namespace.clone()),
            ..Default::default()
        }]),
    }
}

/// The agent's ServiceAccount: only its CNI init step mounts a token.
fn agent_service_account(v: &Values) -> ServiceAccount {
    ServiceAccount {
        metadata: meta(AGENT, Some(&v.namespace), AGENT),
        automount_service_account_token: Some(false),
        ..Default::default()
    }
}

/// `get` on nodes: the CNI init step reads its own Node's `spec.podCIDR`, nothing else.
fn agent_cluster_role() -> ClusterRole {
    ClusterRole {
        metadata: meta(AGENT, None, AGENT),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["nodes".into()]),
            verbs: vec!["get".into()],
            ..Default::default()
        }]),
        ..Default::default()
    }
}

/// The etcd Service peers connect to.
pub fn service(v: &Values) -> Service {
    Service {
        metadata: meta(APISERVER, Some(&v.namespace), APISERVER),
        spec: Some(ServiceSpec {
            type_: Some(v.service_type.as_str().into()),
            selector: Some(selector(APISERVER)),
            ports: Some(vec![ServicePort {
                name: Some("etcd".into()),
                port: ETCD_PORT,
                target_port: Some(IntOrString::String("etcd".into())),
                protocol: Some("TCP".into()),
                node_port: (v.service_type == ServiceType::NodePort).then_some(v.node_port),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Lower-case hex SHA-256 of `text`.
fn sha256_hex(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// etcd's certificate and the CAs it trusts for clients: the server certificate Secret, with
/// its `ca.crt` taken from the [`CA_BUNDLE`] ConfigMap when the cluster has one (Cilium's
/// `tls.caBundle.enabled`).
fn etcd_server_volume(v: &Values) -> Volume {
    if v.ca_bundle.is_none() {
        return secret_volume("etcd-server-secrets", SERVER_CERT);
    }
    Volume {
        name: "etcd-server-secrets".into(),
        projected: Some(ProjectedVolumeSource {
            default_mode: Some(0o400),
            sources: Some(vec![
                VolumeProjection {
                    secret: Some(SecretProjection {
                        name: SERVER_CERT.into(),
                        optional: Some(false),
                        items: Some(vec![
                            key_to_path("tls.crt", "tls.crt"),
                            key_to_path("tls.key", "tls.key"),
                        ]),
                    }),
                    ..Default::default()
                },
                VolumeProjection {
                    config_map: Some(ConfigMapProjection {
                        name: CA_BUNDLE.into(),
                        optional: Some(false),
                        items: Some(vec![key_to_path("ca.crt", "ca.crt")]),
                    }),
                    ..Default::default()
                },
            ]),
        }),
        ..Default::default()
    }
}

/// The [`CA_BUNDLE`] ConfigMap, when the cluster trusts more than its own CA.
pub fn ca_bundle(v: &Values) -> Option<ConfigMap> {
    let b = v.ca_bundle.as_ref()?;
    Some(ConfigMap {
        metadata: meta(CA_BUNDLE, Some(&v.namespace), APISERVER),
        data: Some(BTreeMap::from([("ca.crt".into(), b.clone())])),
        ..Default::default()
    })
}

/// The apiserver Deployment alone (what `connect --allow-mismatching-ca` re-applies with
/// the cluster's CA bundle).
pub fn apiserver_deployment(v: &Values) -> Object {
    Object::new(&deployment(v))
}

fn deployment(v: &Values) -> Deployment {
    let etcd_certs = "/var/lib/etcd-secrets";
    let etcd = Container {
        name: "etcd".into(),
        image: Some(v.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["etcd".into()]),
        // Cilium's sidecar arguments (reference §1.3): stateless, mTLS with client
        // certificates, clients on loopback (the apiserver) and the pod IP (the Service).
        args: Some(
            [
                "--name=clustermesh-apiserver",
                "--data-dir=/var/run/etcd",
                "--client-cert-auth",
                &format!("--trusted-ca-file={etcd_certs}/ca.crt"),
                &format!("--cert-file={etcd_certs}/tls.crt"),
                &format!("--key-file={etcd_certs}/tls.key"),
                &format!(
                    "--listen-client-urls=https://127.0.0.1:{ETCD_PORT},https://$(POD_IP):{ETCD_PORT}"
                ),
                &format!("--advertise-client-urls=https://$(POD_IP):{ETCD_PORT}"),
                "--listen-peer-urls=http://127.0.0.1:2380",
                "--initial-advertise-peer-urls=http://127.0.0.1:2380",
                "--initial-cluster=clustermesh-apiserver=http://127.0.0.1:2380",
                "--initial-cluster-state=new",
                "--auto-compaction-retention=1",
                "--listen-metrics-urls=http://$(POD_IP):9963",
                // Our etcd clients ping every second while they watch (to notice a dead
                // peer within seconds); etcd's default minimum (5 s) answers those pings
                // with GOAWAY "too_many_pings" and drops every watch.
                "--grpc-keepalive-min-time=500ms",
                // One member, on loopback: it elects itself after one election timeout, at
                // every (re)start of the pod or the container; 500 ms instead of 1 s puts
                // etcd back in service sooner and costs nothing without peers.
                "--heartbeat-interval=50",
                "--election-timeout=500",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        env: Some(vec![env_field("POD_IP", "status.podIP")]),
        ports: Some(vec![port("etcd", ETCD_PORT), port("etcd-metrics", 9963)]),
        volume_mounts: Some(vec![
            mount("etcd-data-dir", "/var/run/etcd", false),
            mount("etcd-server-secrets", etcd_certs, true),
        ]),
        ..Default::default()
    };
    let apiserver = Container {
        name: "apiserver".into(),
        image: Some(v.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["clustermesh-apiserver".into()]),
        args: Some(
            [
                "--source=kubernetes",
                "--cluster-name=$(CLUSTER_NAME)",
                "--cluster-id=$(CLUSTER_ID)",
                "--max-connected-clusters=$(MAX_CONNECTED_CLUSTERS)",
                &format!("--etcd-config={POD_CONFIG_DIR}/etcd-config.yaml"),
                // Cilium's etcd-init: users, roles and auth on the sidecar's fresh etcd.
                "--etcd-init",
                "--state-dir=/var/run/clustermesh",
                &format!("--health-addr=0.0.0.0:{HEALTH_PORT}"),
                &format!("--metrics-addr=0.0.0.0:{METRICS_PORT}"),
                "--enable-kvstoremesh=true",
                &format!("--clustermesh-config={POD_CONFIG_DIR}/clustermesh"),
                &format!("--cluster-users-config-path={POD_CONFIG_DIR}/users/users.yaml"),
            ]
            .iter()
            .map(|s| s.to_string())
            .chain(
                v.enable_mcs_api
                    .then(|| "--clustermesh-enable-mcs-api".to_string()),
            )
            .collect(),
        ),
        env: Some(vec![
            env_config("CLUSTER_NAME", "cluster-name"),
            env_config("CLUSTER_ID", "cluster-id"),
            env_config("MAX_CONNECTED_CLUSTERS", "max-connected-clusters"),
            // `--cluster-cidr` (read from the environment by the apiserver).
            env_config_optional("CLUSTER_CIDR", "cluster-cidr"),
        ]),
        ports: Some(vec![
            port("health", HEALTH_PORT),
            port("metrics", METRICS_PORT),
        ]),
        readiness_probe: Some(http_probe("/readyz", HEALTH_PORT, 5, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", HEALTH_PORT, 10, 6)
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                sub_path: Some("etcd-config.yaml".into()),
                ..mount(
                    "cluster-config",
                    &format!("{POD_CONFIG_DIR}/etcd-config.yaml"),
                    true,
                )
            },
            mount(
                "etcd-admin-secrets",
                &format!("{POD_CONFIG_DIR}/etcd-secrets"),
                true,
            ),
            mount(
                "kvstoremesh-remotes",
                &format!("{POD_CONFIG_DIR}/clustermesh"),
                true,
            ),
            mount("remote-users", &format!("{POD_CONFIG_DIR}/users"), true),
            mount("state", "/var/run/clustermesh", false),
        ]),
        ..Default::default()
    };
    let medium = match v.etcd_storage {
        StorageMedium::Memory => Some("Memory".to_string()),
        StorageMedium::Disk => None,
    };
    Deployment {
        metadata: meta(APISERVER, Some(&v.namespace), APISERVER),
        spec: Some(DeploymentSpec {
            // One replica: each replica would be its own etcd (Cilium's HA needs clients
            // that follow etcd cluster-ID changes across replicas behind one Service).
            replicas: Some(1),
            selector: LabelSelector {
                match_labels: Some(selector(APISERVER)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("Recreate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(APISERVER)),
                    annotations: v.ca_bundle.as_ref().map(|b| {
                        BTreeMap::from([(CA_BUNDLE_ANNOTATION.to_string(), sha256_hex(b))])
                    }),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(APISERVER.into()),
                    containers: vec![etcd, apiserver],
                    volumes: Some(vec![
                        Volume {
                            name: "etcd-data-dir".into(),
                            empty_dir: Some(EmptyDirVolumeSource {
                                medium,
                                size_limit: Some(Quantity("1Gi".into())),
                            }),
                            ..Default::default()
                        },
                        etcd_server_volume(v),
                        secret_volume("etcd-admin-secrets", ADMIN_CERT),
                        Volume {
                            name: "cluster-config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: CLUSTER_CONFIG.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        remotes_volume(
                            "kvstoremesh-remotes",
                            KVSTOREMESH_SECRET,
                            REMOTE_CERT,
                            "common-etcd-client",
                        ),
                        Volume {
                            name: "remote-users".into(),
                            projected: Some(ProjectedVolumeSource {
                                default_mode: Some(0o400),
                                sources: Some(vec![VolumeProjection {
                                    config_map: Some(ConfigMapProjection {
                                        name: REMOTE_USERS.into(),
                                        optional: Some(true),
                                        items: None,
                                    }),
                                    ..Default::default()
                                }]),
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "state".into(),
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn host_path(name: &str, path: &str, ty: &str) -> Volume {
    Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource {
            path: path.into(),
            type_: Some(ty.into()),
        }),
        ..Default::default()
    }
}

fn daemon_set(v: &Values) -> DaemonSet {
    let agent = Container {
        name: "agent".into(),
        image: Some(v.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["clustermesh-agent".into()]),
        args: Some(
            [
                "--cluster-name=$(CLUSTER_NAME)",
                "--cluster-id=$(CLUSTER_ID)",
                "--max-connected-clusters=$(MAX_CONNECTED_CLUSTERS)",
                "--node-name=$(NODE_NAME)",
                "--node-ip=$(NODE_IP)",
                &format!("--etcd-config={POD_CONFIG_DIR}/local-etcd-config.yaml"),
                &format!("--clustermesh-config={POD_CONFIG_DIR}/clustermesh"),
                "--remotes=kvstoremesh",
                "--bpffs-dir=/sys/fs/bpf/clustermesh",
                &format!("--health-addr=127.0.0.1:{AGENT_HEALTH_PORT}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        env: Some(vec![
            env_config("CLUSTER_NAME", "cluster-name"),
            env_config("CLUSTER_ID", "cluster-id"),
            env_config("MAX_CONNECTED_CLUSTERS", "max-connected-clusters"),
            env_field("NODE_NAME", "spec.nodeName"),
            env_field("NODE_IP", "status.hostIP"),
        ]),
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                add: Some(vec![
                    "BPF".into(),
                    "PERFMON".into(),
                    "NET_ADMIN".into(),
                    "NET_BIND_SERVICE".into(),
                ]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        readiness_probe: Some(http_probe("/readyz", AGENT_HEALTH_PORT, 5, 3)),
        liveness_probe: Some(Probe {
            initial_delay_seconds: Some(10),
            ..http_probe("/healthz", AGENT_HEALTH_PORT, 10, 6)
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                mount_propagation: Some("HostToContainer".into()),
                ..mount("bpf-maps", "/sys/fs/bpf", false)
            },
            mount("state", "/var/lib/clustermesh", false),
            VolumeMount {
                sub_path: Some("local-etcd-config.yaml".into()),
                ..mount(
                    "cluster-config",
                    &format!("{POD_CONFIG_DIR}/local-etcd-config.yaml"),
                    true,
                )
            },
            mount(
                "etcd-local-secrets",
                &format!("{POD_CONFIG_DIR}/etcd-secrets"),
                true,
            ),
            mount(
                "agent-remotes",
                &format!("{POD_CONFIG_DIR}/clustermesh"),
                true,
            ),
        ]),
        ..Default::default()
    };
    let install_cni = Container {
        name: "install-cni".into(),
        image: Some(v.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        command: Some(vec!["clustermesh".into()]),
        args: Some(
            [
                "cni",
                "install",
                "--in-cluster",
                "--node=$(NODE_NAME)",
                &format!("--state-dir={CNI_STATE_DIR}"),
                &format!("--out={CNI_CONF_DIR}/{CNI_CONF_FILE}"),
                &format!("--bin-dir={CNI_BIN_DIR}"),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        ),
        env: Some(vec![env_field("NODE_NAME", "spec.nodeName")]),
        // Root only to write the host's root-owned CNI directories, as their owner.
        security_context: Some(SecurityContext {
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            run_as_user: Some(0),
            capabilities: Some(Capabilities {
                add: None,
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("cni-conf", CNI_CONF_DIR, false),
            mount("cni-bin", CNI_BIN_DIR, false),
            mount("agent-token", SERVICE_ACCOUNT_DIR, true),
        ]),
        ..Default::default()
    };
    DaemonSet {
        metadata: meta(AGENT, Some(&v.namespace), AGENT),
        spec: Some(DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector(AGENT)),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                ..Default::default()
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels(AGENT)),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    // The datapath lives in the node's network namespace; the agent never
                    // talks to the Kubernetes API, so it gets no token (only the init step
                    // mounts one, to read its Node's pod CIDR).
                    host_network: Some(true),
                    dns_policy: Some("ClusterFirstWithHostNet".into()),
                    service_account_name: Some(AGENT.into()),
                    automount_service_account_token: Some(false),
                    priority_class_name: Some("system-node-critical".into()),
                    init_containers: Some(vec![install_cni]),
                    containers: vec![agent],
                    tolerations: Some(vec![k8s_openapi::api::core::v1::Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    volumes: Some(vec![
                        host_path("bpf-maps", "/sys/fs/bpf", "DirectoryOrCreate"),
                        host_path("state", "/var/lib/clustermesh", "DirectoryOrCreate"),
                        host_path("cni-conf", CNI_CONF_DIR, "DirectoryOrCreate"),
                        host_path("cni-bin", CNI_BIN_DIR, "DirectoryOrCreate"),
                        token_volume("agent-token"),
                        Volume {
                            name: "cluster-config".into(),
                            config_map: Some(ConfigMapVolumeSource {
                                name: CLUSTER_CONFIG.into(),
                                ..Default::default()
                            }),
                            ..Default::default()
                        },
                        secret_volume("etcd-local-secrets", LOCAL_CERT),
                        remotes_volume(
                            "agent-remotes",
                            AGENT_REMOTES_SECRET,
                            LOCAL_CERT,
                            "local-etcd-client",
                        ),
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The cluster's base install, in apply order (RBAC and config before the workloads).
pub fn install(v: &Values) -> Vec<Object> {
    vec![
        Object::new(&service_account(v)),
        Object::new(&cluster_role(v)),
        Object::new(&cluster_role_binding(v, APISERVER)),
        Object::new(&agent_service_account(v)),
        Object::new(&agent_cluster_role()),
        Object::new(&cluster_role_binding(v, AGENT)),
        Object::new(&cluster_config(v)),
        Object::new(&service(v)),
        Object::new(&deployment(v)),
        Object::new(&daemon_set(v)),
    ]
}

/// PEM text of the certificates [`cert_secrets`] puts into Secrets.
#[derive(Debug, Clone)]
pub struct CertPems {
    /// The CA certificate.
    pub ca_cert: String,
    /// The CA key (kept in `cilium-ca`, as Cilium does, so the CLI can issue more).
    pub ca_key: String,
    /// `(certificate, key)` of the etcd server.
    pub server: (String, String),
    /// `admin-<c>`.
    pub admin: (String, String),
    /// `local-<c>`.
    pub local: (String, String),
    /// `remote-<c>`.
    pub remote: (String, String),
}

fn tls_secret(v: &Values, name: &str, ca: &str, (cert, key): &(String, String)) -> Secret {
    Secret {
        metadata: meta(name, Some(&v.namespace), APISERVER),
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".into(), ByteString(ca.as_bytes().to_vec())),
            ("tls.crt".into(), ByteString(cert.as_bytes().to_vec())),
            ("tls.key".into(), ByteString(key.as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

/// The CA Secret (`cilium-ca`: `ca.crt`, `ca.key`).
pub fn ca_secret(v: &Values, ca_cert: &str, ca_key: &str) -> Secret {
    Secret {
        metadata: meta(CA_SECRET, Some(&v.namespace), APISERVER),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            ("ca.crt".into(), ByteString(ca_cert.as_bytes().to_vec())),
            ("ca.key".into(), ByteString(ca_key.as_bytes().to_vec())),
        ])),
        ..Default::default()
    }
}

/// The certificate Secrets, with Cilium's names and keys.
pub fn cert_secrets(v: &Values, p: &CertPems) -> Vec<Object> {
    vec![
        Object::new(&ca_secret(v, &p.ca_cert, &p.ca_key)),
        Object::new(&tls_secret(v, SERVER_CERT, &p.ca_cert, &p.server)),
        Object::new(&tls_secret(v, ADMIN_CERT, &p.ca_cert, &p.admin)),
        Object::new(&tls_secret(v, LOCAL_CERT, &p.ca_cert, &p.local)),
        Object::new(&tls_secret(v, REMOTE_CERT, &p.ca_cert, &p.remote)),
    ]
}

/// Everything `clustermesh enable --context` sends to a cluster, in apply order: the base
/// [`install`], then the certificate Secrets. The lab renders a cluster with the same
/// function and runs its processes from these objects ([`crate::kubelet`]), so what the lab
/// exercises is what a cluster receives.
pub fn cluster_install(v: &Values, pems: &CertPems) -> Vec<Object> {
    let mut out = install(v);
    out.extend(cert_secrets(v, pems));
    out.extend(ca_bundle(v).map(|c| Object::new(&c)));
    out
}

/// Cilium's `clustermesh-remote-users` (`users.yaml`): one `remote-<peer>` user with role
/// `remote` per connected peer, which the apiserver creates in its etcd (and removes when it
/// leaves the list).
pub fn remote_users(v: &Values, peers: &[String]) -> ConfigMap {
    let mut text = String::from("users:\n");
    if peers.is_empty() {
        text = "users: []\n".into();
    }
    for p in peers {
        text.push_str(&format!("- name: remote-{p}\n  role: remote\n"));
    }
    ConfigMap {
        metadata: meta(REMOTE_USERS, Some(&v.namespace), APISERVER),
        data: Some(BTreeMap::from([("users.yaml".into(), text)])),
        ..Default::default()
    }
}

/// How one peer is reached: the IPs of its etcd Service and the port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddress {
    /// Peer cluster name.
    pub name: String,
    /// Addresses (node or load-balancer IPs).
    pub ips: Vec<String>,
    /// Port (nodePort or 2379).
    pub port: i32,
    /// The peer's pod CIDRs (its `cluster-cidr`): written into both config files for it, so
    /// KVStoreMesh and the agents refuse its entries outside them. Empty: no rule.
    pub cluster_cidrs: Vec<String>,
}

/// The `cluster-cidr` line of a remote config file (nothing when there are none).
fn cidr_line(cidrs: &[String]) -> String {
    if cidrs.is_empty() {
        return String::new();
    }
    let quoted: Vec<String> = cidrs.iter().map(|c| format!("\"{c}\"")).collect();
    format!("cluster-cidr: [{}]\n", quoted.join(", "))
}

/// KVStoreMesh's config file for `peer`: `https://<peer>.mesh.cilium.io:<port>` with a host
/// alias to its IPs (so the server certificate's `*.mesh.cilium.io` name verifies), read
/// with this cluster's `remote-<c>` certificate.
pub fn kvstoremesh_remote_config(peer: &PeerAddress, ca_file: &str) -> String {
    let dir = format!("{POD_CONFIG_DIR}/clustermesh");
    let host = format!("{}.{MESH_DOMAIN}", peer.name);
    let mut s = format!(
        "endpoints:\n- https://{host}:{}\ntrusted-ca-file: {dir}/{ca_file}\ncert-file: {dir}/common-etcd-client.crt\nkey-file: {dir}/common-etcd-client.key\ncilium-host-aliases:\n- hostname: {host}\n  ips:\n",
        peer.port
    );
    for ip in &peer.ips {
        s.push_str(&format!("  - {ip}\n"));
    }
    s.push_str(&cidr_line(&peer.cluster_cidrs));
    s
}

/// The agents' config file for `peer`: they read it from the KVStoreMesh cache in the
/// local etcd (Cilium's layout with KVStoreMesh on), with the `local-<c>` certificate, and
/// refuse the peer's entries outside `peer_cidrs`.
pub fn agent_remote_config(v: &Values, peer_cidrs: &[String]) -> String {
    let dir = format!("{POD_CONFIG_DIR}/clustermesh");
    format!(
        "endpoints:\n- https://{APISERVER}.{}.svc:{ETCD_PORT}\ntrusted-ca-file: {dir}/local-etcd-client-ca.crt\ncert-file: {dir}/local-etcd-client.crt\nkey-file: {dir}/local-etcd-client.key\n{}",
        v.namespace,
        cidr_line(peer_cidrs)
    )
}

/// A remote-config Secret (`cilium-kvstoremesh` or `cilium-clustermesh`) holding `data`.
pub fn remote_config_secret(v: &Values, name: &str, data: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: meta(name, Some(&v.namespace), APISERVER),
        type_: Some("Opaque".into()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The `cilium-kvstoremesh` entries for one peer: its config file, and its CA bundle when the
/// peer has another CA (`bundle`).
pub fn kvstoremesh_entries(peer: &PeerAddress, bundle: Option<&str>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let ca_file = match bundle {
        Some(b) => {
            let f = format!("{}.etcd-client-ca.crt", peer.name);
            out.insert(f.clone(), b.to_string());
            f
        }
        None => "common-etcd-client-ca.crt".to_string(),
    };
    out.insert(peer.name.clone(), kvstoremesh_remote_config(peer, &ca_file));
    out
}

/// The two remote-config Secrets of a cluster connected to `peers`: `cilium-kvstoremesh`
/// (how KVStoreMesh reads each peer; with `ca_bundles[peer]` when the peer has another CA)
/// and `cilium-clustermesh` (the agents' files).
pub fn remote_secrets(
    v: &Values,
    peers: &[PeerAddress],
    ca_bundles: &BTreeMap<String, String>,
) -> Vec<Object> {
    let mut kvs = BTreeMap::new();
    let mut agents = BTreeMap::new();
    for p in peers {
        kvs.extend(kvstoremesh_entries(
            p,
            ca_bundles.get(&p.name).map(String::as_str),
        ));
        agents.insert(p.name.clone(), agent_remote_config(v, &p.cluster_cidrs));
    }
    vec![
        Object::new(&remote_config_secret(v, KVSTOREMESH_SECRET, &kvs)),
        Object::new(&remote_config_secret(v, AGENT_REMOTES_SECRET, &agents)),
    ]
}

/// The example clusters of `deploy/kubernetes/overlays/`: name, ID, service type.
pub const EXAMPLE_OVERLAYS: &[(&str, u32, ServiceType)] = &[
    ("east", 1, ServiceType::NodePort),
    ("west", 2, ServiceType::LoadBalancer),
];

fn file_name(o: &Object) -> String {
    // The agent's RBAC sits beside the apiserver's: same kinds, so a prefix.
    if o.name == AGENT && o.kind != "DaemonSet" {
        return format!("agent-{}.yaml", o.kind.to_lowercase());
    }
    format!("{}.yaml", o.kind.to_lowercase())
}

fn kustomization(body: &str) -> String {
    format!(
        "# Generated by `clustermesh manifests --out deploy/kubernetes` from k8s/src/objects.rs; do not edit.\napiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{body}"
    )
}

fn yaml_doc(o: &Object) -> String {
    format!(
        "# Generated by `clustermesh manifests --out deploy/kubernetes` from k8s/src/objects.rs; do not edit.\n{}",
        serde_yaml::to_string(&o.value).unwrap_or_default()
    )
}

/// The kustomize tree of `deploy/kubernetes/` as (relative path, contents): `base/` (one file
/// per object of [`install`] with [`Values::default`]) and one overlay per
/// [`EXAMPLE_OVERLAYS`] entry (the cluster's name and ID, its Service type, and the
/// certificate Secrets generated from the files `clustermesh certs issue` writes).
pub fn deploy_tree() -> Vec<(String, String)> {
    let base = Values::default();
    let objects = install(&base);
    let mut out = Vec::new();
    let mut resources = String::from("resources:\n");
    for o in &objects {
        resources.push_str(&format!("- {}\n", file_name(o)));
        out.push((format!("base/{}", file_name(o)), yaml_doc(o)));
    }
    out.push((
        "base/kustomization.yaml".into(),
        kustomization(&format!(
            "# Cluster name and ID come from the overlay's clustermesh-config patch.\nnamespace: {}\n{resources}",
            base.namespace
        )),
    ));
    for (name, id, ty) in EXAMPLE_OVERLAYS {
        let v = Values {
            cluster_name: name.to_string(),
            cluster_id: *id,
            service_type: *ty,
            ..Values::default()
        };
        let mut cm = cluster_config(&v);
        if let Some(d) = cm.data.as_mut() {
            d.retain(|k, _| {
                ["cluster-name", "cluster-id", "max-connected-clusters"].contains(&k.as_str())
            });
        }
        let cm = Object::new(&cm);
        let mut patches = String::from("patches:\n- path: clustermesh-config.yaml\n");
        out.push((
            format!("overlays/{name}/clustermesh-config.yaml"),
            yaml_doc(&cm),
        ));
        if *ty != ServiceType::NodePort {
            let svc = Object::new(&service(&v));
            patches.push_str("- path: service.yaml\n");
            out.push((format!("overlays/{name}/service.yaml"), yaml_doc(&svc)));
        }
        let mut gen = String::from(
            "# The certificate Secrets, from `clustermesh certs issue --ca-dir CA --cluster NAME --out certs`\n# (run in this directory; `clustermesh enable --context` issues them into the cluster instead).\ngeneratorOptions:\n  disableNameSuffixHash: true\nsecretGenerator:\n- name: cilium-ca\n  type: Opaque\n  files:\n  - ca.crt=certs/ca.crt\n",
        );
        for (secret, stem) in [
            (SERVER_CERT, "server".to_string()),
            (ADMIN_CERT, format!("admin-{name}")),
            (LOCAL_CERT, format!("local-{name}")),
            (REMOTE_CERT, format!("remote-{name}")),
        ] {
            gen.push_str(&format!(
                "- name: {secret}\n  type: kubernetes.io/tls\n  files:\n  - ca.crt=certs/ca.crt\n  - tls.crt=certs/{stem}.crt\n  - tls.key=certs/{stem}.key\n"
            ));
        }
        out.push((
            format!("overlays/{name}/kustomization.yaml"),
            kustomization(&format!(
                "# Example cluster {name}: ID {id}, etcd Service {}.\nresources:\n- ../../base\n{patches}{gen}",
                ty.as_str()
            )),
        ));
    }
    out
}

/// The Kubernetes version the objects are typed (and validated) for: k8s-openapi's feature.
pub const KUBERNETES_VERSION: &str = "1.34.0";
k8s_openapi::k8s_if_le_1_33! { compile_error!("objects::KUBERNETES_VERSION says 1.34: update it with k8s-openapi's feature"); }
k8s_openapi::k8s_if_ge_1_35! { compile_error!("objects::KUBERNETES_VERSION says 1.34: update it with k8s-openapi's feature"); }
