//! `clustermesh connect | disconnect | status`, in the style of `cilium clustermesh`.
//!
//! A cluster is known by its state directory (`clustermesh enable`): `apiserver.yaml` gives
//! its name, ID, max-connected-clusters, etcd endpoint, health address and clustermesh config
//! directory; `certs/` its CA and client certificates. `connect` exchanges this "access
//! information" in both directions:
//!
//! * `<A>/clustermesh/<B>` — how A's KVStoreMesh reads B: B's endpoint, A's `remote-<A>`
//!   client certificate, and the CA that B's server certificate chains to (A's own `ca.crt`
//!   when the CA is shared; a bundle `<B>.etcd-client-ca.crt` of both CAs otherwise);
//! * the etcd user `remote-<A>` (role `remote`) in B's etcd, created with B's root
//!   certificate, and named in B's users file (`cluster-users-config-path`, Cilium's
//!   `users.yaml`; `enable` sets `<B>/cluster-users.yaml`) so that B's apiserver creates it
//!   again in an etcd that lost its data (a wiped or replaced member);
//! * and the same for B reading A.
//!
//! B's cluster CIDRs (`cluster-cidr` of its `apiserver.yaml`) go into `<A>/clustermesh/<B>`,
//! so A refuses B's entries outside them; a cluster without them is read without that rule.
//!
//! With `--allow-mismatching-ca` each side's `certs/ca.crt`, which its etcd trusts for
//! client certificates, also gets the peer's CA appended; etcd reads it at start, so the
//! apiservers must be restarted once (Cilium restarts the clustermesh-apiserver pods for the
//! same reason).
//!
//! `status` reads the apiserver's `/status` (`remote-clusters`: Cilium's `RemoteCluster`
//! JSON) and explains each problem with a hint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clustermesh_syncer::EtcdConfig;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http;

/// Flags of `clustermesh connect`.
#[derive(Debug, clap::Args)]
pub struct ConnectArgs {
    /// State directory of the local cluster (the lab's form; without it, --context is used).
    #[arg(long, requires = "destination_state_dir", conflicts_with_all = ["destination_context", "dry_run"])]
    pub state_dir: Option<PathBuf>,
    /// State directory of the cluster to connect to.
    #[arg(long, requires = "state_dir")]
    pub destination_state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::contexts::KubeArgs,
    /// kubeconfig context of the cluster to connect to.
    #[arg(long)]
    pub destination_context: Option<String>,
    /// The address (IP:PORT) the other cluster reaches this cluster's etcd on, instead of
    /// the one read from its Service.
    #[arg(long)]
    pub source_endpoint: Option<SocketAddr>,
    /// The address (IP:PORT) of the destination cluster's etcd, instead of the one read from
    /// its Service.
    #[arg(long)]
    pub destination_endpoint: Option<SocketAddr>,
    /// Connect even though the clusters use different CAs (each side then trusts both).
    #[arg(long)]
    pub allow_mismatching_ca: bool,
    /// Write nothing; say (or with -o yaml print) what would be sent.
    #[arg(long)]
    pub dry_run: bool,
    /// `yaml`: print every object that would be applied (with --dry-run).
    #[arg(short = 'o', long)]
    pub output: Option<String>,
}

/// Flags of `clustermesh disconnect`.
#[derive(Debug, clap::Args)]
pub struct DisconnectArgs {
    /// State directory of the local cluster (the lab's form; without it, --context is used).
    #[arg(long, requires = "destination_state_dir", conflicts_with_all = ["destination_context", "dry_run"])]
    pub state_dir: Option<PathBuf>,
    /// State directory of the cluster to disconnect from.
    #[arg(long, requires = "state_dir")]
    pub destination_state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::contexts::KubeArgs,
    /// kubeconfig context of the cluster to disconnect from.
    #[arg(long)]
    pub destination_context: Option<String>,
    /// Write nothing; say (or with -o yaml print) what would be sent.
    #[arg(long)]
    pub dry_run: bool,
    /// `yaml`: print every object that would be applied (with --dry-run).
    #[arg(short = 'o', long)]
    pub output: Option<String>,
}

/// Flags of `clustermesh status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// State directory of the cluster (the lab's form; without it, --context is used).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kube: crate::contexts::KubeArgs,
    /// Wait until every configured remote cluster is ready.
    #[arg(long)]
    pub wait: bool,
    /// How long `--wait` waits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub wait_duration: Duration,
    /// `summary` or `json`.
    #[arg(short = 'o', long, default_value = "summary")]
    pub output: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct ApiserverFile {
    cluster_name: Option<String>,
    cluster_id: Option<u32>,
    max_connected_clusters: Option<u32>,
    etcd_config: Option<PathBuf>,
    embedded_etcd_listen: Option<String>,
    health_addr: Option<SocketAddr>,
    clustermesh_config: Option<PathBuf>,
    enable_kvstoremesh: Option<bool>,
    cluster_users_config_path: Option<PathBuf>,
    cluster_cidr: Option<clustermesh_types::cluster_cidrs::ClusterCidrs>,
}

/// What one cluster tells its peers (Cilium's `accessInformation`) plus local paths.
#[derive(Debug, Clone)]
pub struct Access {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// etcd endpoints.
    pub endpoints: Vec<String>,
    /// The cluster's own CA (PEM, first certificate of `certs/ca.crt`).
    pub ca_pem: String,
    /// The state dir.
    pub state_dir: PathBuf,
    /// Directory of remote cluster config files.
    pub clustermesh_dir: PathBuf,
    /// `/status` address.
    pub health_addr: SocketAddr,
    /// Whether KVStoreMesh runs.
    pub kvstoremesh: bool,
    /// The apiserver's users file (`cluster-users-config-path`), when it has one.
    pub users_file: Option<PathBuf>,
    /// The cluster's pod CIDRs (`cluster-cidr`): peers refuse its entries outside them.
    pub cluster_cidrs: clustermesh_types::cluster_cidrs::ClusterCidrs,
}

impl Access {
    fn certs(&self) -> PathBuf {
        self.state_dir.join("certs")
    }

    /// Reads a state dir prepared by `clustermesh enable`.
    pub fn load(state_dir: &Path) -> anyhow::Result<Self> {
        let state_dir = std::fs::canonicalize(state_dir)
            .with_context(|| format!("state dir {}", state_dir.display()))?;
        let path = state_dir.join("apiserver.yaml");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (prepare the cluster with `clustermesh enable` first)",
                path.display()
            )
        })?;
        // Unknown keys are fine here: only the access information is needed.
        let file: ApiserverFile =
            serde_yaml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let name = file
            .cluster_name
            .with_context(|| format!("{}: cluster-name missing", path.display()))?;
        let id = file
            .cluster_id
            .with_context(|| format!("{}: cluster-id missing", path.display()))?;
        let endpoints = match (&file.etcd_config, &file.embedded_etcd_listen) {
            (Some(p), _) => EtcdConfig::load(p)?.endpoints,
            (None, Some(listen)) => vec![format!("https://{listen}")],
            (None, None) => vec!["https://127.0.0.1:2379".into()],
        };
        let ca_all = std::fs::read_to_string(state_dir.join("certs/ca.crt"))
            .with_context(|| format!("reading the CA of {name}"))?;
        let ca_pem = pem_blocks(&ca_all)
            .into_iter()
            .next()
            .with_context(|| format!("no certificate in {name}'s certs/ca.crt"))?;
        Ok(Self {
            clustermesh_dir: file
                .clustermesh_config
                .unwrap_or_else(|| state_dir.join("clustermesh")),
            name,
            id,
            max_connected_clusters: file.max_connected_clusters.unwrap_or(255),
            endpoints,
            ca_pem,
            health_addr: file
                .health_addr
                .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9880))),
            kvstoremesh: file.enable_kvstoremesh.unwrap_or(true),
            users_file: file.cluster_users_config_path,
            cluster_cidrs: file.cluster_cidr.unwrap_or_default(),
            state_dir,
        })
    }

    /// Root client config of this cluster's etcd (user management).
    fn root_config(&self) -> EtcdConfig {
        let certs = self.certs();
        EtcdConfig {
            endpoints: self.endpoints.clone(),
            trusted_ca_file: Some(certs.join("ca.crt")),
            cert_file: Some(certs.join("root.crt")),
            key_file: Some(certs.join("root.key")),
            host_aliases: Vec::new(),
            cluster_cidrs: Default::default(),
        }
    }
}

/// The PEM blocks of a bundle, each normalised to end with a newline.
pub(crate) fn pem_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.starts_with("-----BEGIN") {
            cur.clear();
        }
        cur.push_str(line);
        cur.push('\n');
        if line.starts_with("-----END") {
            out.push(std::mem::take(&mut cur));
        }
    }
    out
}

/// Subject key identifier of a CA certificate (its public key when the extension is absent).
pub fn subject_key_id(pem: &str) -> anyhow::Result<Vec<u8>> {
    use x509_parser::extensions::ParsedExtension;
    let (_, p) = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("CA certificate PEM: {e}"))?;
    let cert = p
        .parse_x509()
        .map_err(|e| anyhow::anyhow!("CA certificate: {e}"))?;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectKeyIdentifier(kid) = ext.parsed_extension() {
            return Ok(kid.0.to_vec());
        }
    }
    Ok(cert.public_key().raw.to_vec())
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// One side of a connection, as [`check_pair`] sees it.
#[derive(Debug, Clone)]
pub struct PairSide<'a> {
    /// Cluster name.
    pub name: &'a str,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// The cluster's CA (PEM).
    pub ca_pem: &'a str,
    /// Where the cluster was read (a state dir, a context), for messages.
    pub origin: String,
}

/// Refuses pairs Cilium refuses; `Ok(true)` when the CAs differ (and that is allowed).
pub fn validate_pair(a: &Access, b: &Access, allow_mismatching_ca: bool) -> anyhow::Result<bool> {
    fn side(c: &Access) -> PairSide<'_> {
        PairSide {
            name: &c.name,
            id: c.id,
            max_connected_clusters: c.max_connected_clusters,
            ca_pem: &c.ca_pem,
            origin: c.state_dir.display().to_string(),
        }
    }
    check_pair(&side(a), &side(b), allow_mismatching_ca)
}

/// [`validate_pair`] for any two sides.
pub fn check_pair(a: &PairSide, b: &PairSide, allow_mismatching_ca: bool) -> anyhow::Result<bool> {
    for c in [a, b] {
        if c.name == "default" {
            bail!(
                "cluster name \"default\" cannot be meshed: give {} a unique --cluster-name",
                c.origin
            );
        }
        if c.id == 0 || c.id > c.max_connected_clusters {
            bail!(
                "cluster {} has ID {}, outside 1..={}",
                c.name,
                c.id,
                c.max_connected_clusters
            );
        }
    }
    if a.name == b.name {
        bail!(
            "both clusters are named {:?}: every cluster of a mesh needs a unique name",
            a.name
        );
    }
    if a.id == b.id {
        bail!(
            "clusters {} and {} both have cluster ID {}: every cluster of a mesh needs a unique ID",
            a.name,
            b.name,
            a.id
        );
    }
    if a.max_connected_clusters != b.max_connected_clusters {
        bail!(
            "max-connected-clusters differs ({} has {}, {} has {}): it must be the same in the whole mesh \
             (it decides how identities split into cluster ID and cluster-local bits). It cannot change on a \
             running cluster: re-enable one of them with the other's --max-connected-clusters before connecting",
            a.name,
            a.max_connected_clusters,
            b.name,
            b.max_connected_clusters
        );
    }
    let (ka, kb) = (subject_key_id(a.ca_pem)?, subject_key_id(b.ca_pem)?);
    if ka != kb {
        if !allow_mismatching_ca {
            bail!(
                "clusters {} and {} use different CAs (subject key IDs {} and {}): share one CA (`clustermesh enable --ca-dir` with the same directory), or connect with --allow-mismatching-ca",
                a.name,
                b.name,
                hex(&ka),
                hex(&kb)
            );
        }
        return Ok(true);
    }
    Ok(false)
}

fn ca_bundle_file(reader: &Access, peer: &str) -> PathBuf {
    reader
        .clustermesh_dir
        .join(format!("{peer}.etcd-client-ca.crt"))
}

/// The config file `reader` uses to read `peer`.
fn remote_config(reader: &Access, peer: &Access, mismatched: bool) -> EtcdConfig {
    let certs = reader.certs();
    EtcdConfig {
        endpoints: peer.endpoints.clone(),
        trusted_ca_file: Some(if mismatched {
            ca_bundle_file(reader, &peer.name)
        } else {
            certs.join("ca.crt")
        }),
        cert_file: Some(certs.join(format!("remote-{}.crt", reader.name))),
        key_file: Some(certs.join(format!("remote-{}.key", reader.name))),
        host_aliases: Vec::new(),
        // The peer's own settings: the reader refuses what the peer does not own.
        cluster_cidrs: peer.cluster_cidrs.clone(),
    }
}

fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write(&tmp)?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

#[derive(Debug, Default, Deserialize)]
struct UsersFile {
    #[serde(default)]
    users: Option<Vec<UserEntry>>,
}

#[derive(Debug, Deserialize)]
struct UserEntry {
    name: String,
    role: String,
}

/// Names (`add`) or no longer names `user` (role `remote`) in `c`'s users file, which its
/// apiserver keeps its etcd's `remote-*` users to; nothing when `c` has no users file.
fn update_users_file(c: &Access, user: &str, add: bool) -> anyhow::Result<()> {
    let Some(path) = &c.users_file else {
        return Ok(());
    };
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let file: UsersFile = serde_yaml::from_str(&text).with_context(|| {
        format!(
            "{} is not a users file (users: [{{name, role}}]): fix or remove it",
            path.display()
        )
    })?;
    let mut users: std::collections::BTreeMap<String, String> = file
        .users
        .unwrap_or_default()
        .into_iter()
        .map(|u| (u.name, u.role))
        .collect();
    let changed = if add {
        users.insert(user.to_owned(), "remote".into()).as_deref() != Some("remote")
    } else {
        users.remove(user).is_some()
    };
    if !changed {
        return Ok(());
    }
    let mut out = String::from(if users.is_empty() {
        "users: []\n"
    } else {
        "users:\n"
    });
    for (name, role) in &users {
        out.push_str(&format!("- name: {name}\n  role: {role}\n"));
    }
    write_atomic(path, |p| {
        std::fs::write(p, &out).with_context(|| format!("writing {}", p.display()))
    })
}

fn mkdir_private(p: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))?;
    Ok(())
}

/// Appends `ca` to `certs/ca.crt` of `to` unless it is there already; true if it changed.
fn trust_ca(to: &Access, ca: &str) -> anyhow::Result<bool> {
    let path = to.certs().join("ca.crt");
    let text = std::fs::read_to_string(&path)?;
    let blocks = pem_blocks(&text);
    if blocks.iter().any(|b| b.trim() == ca.trim()) {
        return Ok(false);
    }
    let mut out = blocks.concat();
    out.push_str(ca.trim_end());
    out.push('\n');
    write_atomic(&path, |p| Ok(std::fs::write(p, &out)?))?;
    Ok(true)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

async fn with_root<T>(
    c: &Access,
    f: impl AsyncFnOnce(&mut clustermesh_syncer::Client) -> clustermesh_syncer::Result<T>,
) -> anyhow::Result<T> {
    let cfg = c.root_config();
    let mut client = clustermesh_syncer::connect(&cfg, &Default::default())
        .await
        .with_context(|| format!("connecting to the etcd of {} as root", c.name))?;
    // A just-started apiserver may still be creating Cilium's roles: wait for them a little.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match clustermesh_syncer::auth::get_role(&mut client, clustermesh_syncer::auth::ROLE_REMOTE)
            .await
        {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "role remote not there yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                    "the etcd of {} has no role \"remote\": is its clustermesh-apiserver running?",
                    c.name
                )
                })
            }
        }
    }
    f(&mut client)
        .await
        .with_context(|| format!("managing users in the etcd of {}", c.name))
}

/// Connects `a` and `b` in both directions; returns whether the CAs differed.
pub fn connect_pair(a: &Access, b: &Access, allow_mismatching_ca: bool) -> anyhow::Result<bool> {
    let mismatched = validate_pair(a, b, allow_mismatching_ca)?;
    // Never overwrite the connection to another cluster that happens to share the name.
    for (reader, peer) in [(a, b), (b, a)] {
        let path = reader.clustermesh_dir.join(&peer.name);
        if let Ok(existing) = EtcdConfig::load(&path) {
            if existing.endpoints != peer.endpoints {
                bail!(
                    "{} is already connected to a cluster named {} at {}: disconnect it first, or give {} a unique name",
                    reader.name,
                    peer.name,
                    existing.endpoints.join(","),
                    peer.state_dir.display()
                );
            }
        }
    }
    let rt = runtime()?;
    // Users first: a config file whose user does not exist yet would only show errors. The
    // users file first of all: its apiserver removes `remote-*` users the file does not name.
    for (reader, peer) in [(a, b), (b, a)] {
        let user = format!("remote-{}", reader.name);
        update_users_file(peer, &user, true)?;
        rt.block_on(with_root(peer, async |c| {
            clustermesh_syncer::auth::ensure_user(c, &user, clustermesh_syncer::auth::ROLE_REMOTE)
                .await
        }))?;
    }
    let mut restart = Vec::new();
    for (reader, peer) in [(a, b), (b, a)] {
        mkdir_private(&reader.clustermesh_dir)?;
        if mismatched {
            let bundle = format!("{}{}", reader.ca_pem, peer.ca_pem);
            write_atomic(&ca_bundle_file(reader, &peer.name), |p| {
                Ok(std::fs::write(p, &bundle)?)
            })?;
            // The peer's etcd must accept the reader's client certificate.
            if trust_ca(peer, &reader.ca_pem)? {
                restart.push(peer.name.clone());
            }
        }
        let cfg = remote_config(reader, peer, mismatched);
        write_atomic(&reader.clustermesh_dir.join(&peer.name), |p| {
            Ok(cfg.save(p)?)
        })?;
    }
    if mismatched {
        println!(
            "⚠️  Clusters {} and {} use different CAs: each now trusts both",
            a.name, b.name
        );
        for name in restart {
            println!("ℹ️  Restart the clustermesh-apiserver of {name} so that its etcd trusts the new CA bundle");
        }
    }
    Ok(mismatched)
}

/// `clustermesh connect`.
pub fn connect(a: ConnectArgs) -> anyhow::Result<()> {
    let (Some(state_dir), Some(destination_state_dir)) = (&a.state_dir, &a.destination_state_dir)
    else {
        let yaml = crate::contexts::yaml_output(&a.output, a.dry_run)?;
        let r = crate::contexts::connect::Request {
            destination_context: a.destination_context.clone().context(
                "--destination-context (or --state-dir and --destination-state-dir) is required",
            )?,
            kube: a.kube,
            source_endpoint: a.source_endpoint,
            destination_endpoint: a.destination_endpoint,
            allow_mismatching_ca: a.allow_mismatching_ca,
            dry_run: a.dry_run,
            yaml,
        };
        return crate::contexts::runtime()?.block_on(crate::contexts::connect::connect(r));
    };
    let local = Access::load(state_dir)?;
    let remote = Access::load(destination_state_dir)?;
    println!(
        "✨ Extracting access information of cluster {}...",
        local.name
    );
    println!(
        "✨ Extracting access information of cluster {}...",
        remote.name
    );
    for c in [&local, &remote] {
        println!(
            "🔑 Cluster {} (ID {}): {}",
            c.name,
            c.id,
            c.endpoints.join(",")
        );
    }
    connect_pair(&local, &remote, a.allow_mismatching_ca)?;
    println!("✅ Connected cluster {} <=> {}!", local.name, remote.name);
    Ok(())
}

/// Removes both directions of a connection.
pub fn disconnect_pair(a: &Access, b: &Access) -> anyhow::Result<()> {
    for (reader, peer) in [(a, b), (b, a)] {
        for p in [
            reader.clustermesh_dir.join(&peer.name),
            ca_bundle_file(reader, &peer.name),
        ] {
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
            }
        }
    }
    let rt = runtime()?;
    for (reader, peer) in [(a, b), (b, a)] {
        let user = format!("remote-{}", reader.name);
        update_users_file(peer, &user, false)?;
        if let Err(e) = rt.block_on(with_root(peer, async |c| {
            clustermesh_syncer::auth::remove_user(c, &user).await
        })) {
            eprintln!(
                "⚠️  Could not remove etcd user {user} from {}: {e:#}",
                peer.name
            );
        }
    }
    Ok(())
}

/// `clustermesh disconnect`.
pub fn disconnect(a: DisconnectArgs) -> anyhow::Result<()> {
    let (Some(state_dir), Some(destination_state_dir)) = (&a.state_dir, &a.destination_state_dir)
    else {
        let yaml = crate::contexts::yaml_output(&a.output, a.dry_run)?;
        let r = crate::contexts::connect::Request {
            destination_context: a.destination_context.clone().context(
                "--destination-context (or --state-dir and --destination-state-dir) is required",
            )?,
            kube: a.kube,
            source_endpoint: None,
            destination_endpoint: None,
            allow_mismatching_ca: false,
            dry_run: a.dry_run,
            yaml,
        };
        return crate::contexts::runtime()?.block_on(crate::contexts::connect::disconnect(r));
    };
    let local = Access::load(state_dir)?;
    let remote = Access::load(destination_state_dir)?;
    if local.name == remote.name {
        bail!("both state dirs belong to cluster {}", local.name);
    }
    disconnect_pair(&local, &remote)?;
    println!(
        "✅ Disconnected clusters {} <x> {}!",
        local.name, remote.name
    );
    Ok(())
}

/// What to do about a remote that is not ready.
pub fn hint(local: &str, remote: &Value) -> Option<String> {
    if remote["ready"].as_bool() == Some(true) {
        return None;
    }
    let name = remote["name"].as_str().unwrap_or_default();
    let status = remote["status"].as_str().unwrap_or_default();
    let lower = status.to_lowercase();
    if remote["connected"].as_bool() != Some(true) {
        // The reader classified the failure by its cause (syncer::failure): trust that.
        if let (Some(class), Some(h)) = (remote["failure-class"].as_str(), remote["hint"].as_str())
        {
            return Some(format!("{class}: {h}"));
        }
        let what = if lower.contains("not reachable")
            || lower.contains("timed out")
            || lower.contains("connection refused")
        {
            format!("the etcd of {name} is not reachable: is its clustermesh-apiserver running, and is the endpoint right?")
        } else if lower.contains("chain")
            || lower.contains("certificate")
            || lower.contains("issuer")
        {
            "TLS failure: the clusters must share a CA, or connect with --allow-mismatching-ca"
                .to_string()
        } else if lower.contains("permission denied") || lower.contains("refused the user") {
            format!("the etcd of {name} does not know user remote-{local}: run `clustermesh connect` again")
        } else if lower.contains("not reachable") || lower.contains("resolve") {
            format!("the etcd of {name} is not reachable: is its clustermesh-apiserver running, and is the endpoint right?")
        } else if lower.contains("waiting for initial connection") {
            "connecting…".to_string()
        } else {
            "not connected".to_string()
        };
        return Some(format!("{what} ({status})"));
    }
    if remote["config"]["retrieved"].as_bool() != Some(true) {
        if lower.contains("not found") {
            return Some(format!(
                "the cluster configuration of {name} was not found: check that the cluster name matches the remote's --cluster-name (the config file must be named after it), or that its apiserver is running ({status})"
            ));
        }
        return Some(format!(
            "remote cluster configuration not retrieved: {status}"
        ));
    }
    let synced = &remote["synced"];
    let pending: Vec<&str> = [
        "nodes",
        "endpoints",
        "identities",
        "services",
        "service-exports",
    ]
    .into_iter()
    .filter(|k| synced[*k].as_bool() != Some(true))
    .collect();
    if !pending.is_empty() {
        return Some(format!(
            "synchronization in progress for {}",
            pending.join(", ")
        ));
    }
    Some(status.to_string())
}

/// The status document of one cluster (the `-o json` output).
pub fn status_json(c: &Access) -> Value {
    let configured: Vec<String> =
        clustermesh_syncer::remote::configured_remotes(&c.clustermesh_dir, &c.name)
            .remotes
            .into_keys()
            .collect();
    let report = match http::get(c.health_addr, "/status", Duration::from_secs(3)) {
        Ok((200, body)) => serde_json::from_str::<Value>(&body).ok(),
        _ => None,
    };
    status_doc(&StatusInput {
        name: c.name.clone(),
        id: c.id,
        max_connected_clusters: c.max_connected_clusters,
        endpoints: c.endpoints.clone(),
        configured,
        report,
        health: c.health_addr.to_string(),
        kvstoremesh: c.kvstoremesh,
    })
}

/// What a status document is made of, wherever it was read (a state dir, a context).
#[derive(Debug, Clone)]
pub struct StatusInput {
    /// Cluster name.
    pub name: String,
    /// Cluster ID.
    pub id: u32,
    /// 255 or 511.
    pub max_connected_clusters: u32,
    /// How peers reach the cluster's etcd.
    pub endpoints: Vec<String>,
    /// Remote clusters configured for KVStoreMesh.
    pub configured: Vec<String>,
    /// The apiserver's `/status`, if it answered.
    pub report: Option<Value>,
    /// Where `/status` was asked (an address, a pod through the API server's proxy).
    pub health: String,
    /// Whether KVStoreMesh runs.
    pub kvstoremesh: bool,
}

/// The status document (see [`status_json`]).
pub fn status_doc(input: &StatusInput) -> Value {
    let c = input;
    let configured = &c.configured;
    let report = &c.report;
    let empty = Vec::new();
    let remotes = report
        .as_ref()
        .and_then(|r| r["remote-clusters"].as_array())
        .unwrap_or(&empty);
    let mut clusters = serde_json::Map::new();
    let mut errors = serde_json::Map::new();
    let (mut connected, mut ready) = (0, 0);
    for name in configured {
        let r = remotes.iter().find(|r| r["name"].as_str() == Some(name));
        let entry = match r {
            Some(r) => {
                connected += usize::from(r["connected"].as_bool() == Some(true));
                ready += usize::from(r["ready"].as_bool() == Some(true));
                if let Some(h) = hint(&c.name, r) {
                    errors.insert(name.clone(), json!(h));
                }
                json!({
                    "configured": true,
                    "connected": r["connected"], "ready": r["ready"], "status": r["status"],
                    "num-nodes": r["num-nodes"], "num-endpoints": r["num-endpoints"],
                    "num-identities": r["num-identities"], "num-shared-services": r["num-shared-services"],
                    "num-service-exports": r["num-service-exports"],
                    "num-endpoint-slices": r["num-endpoint-slices"],
                    "num-failures": r["num-failures"], "last-failure": r["last-failure"],
                    "failure-class": r["failure-class"], "hint": r["hint"],
                    "config": r["config"], "synced": r["synced"],
                })
            }
            None => {
                let h = if report.is_none() {
                    format!(
                        "the clustermesh-apiserver of {} does not answer on {}: is it running?",
                        c.name, c.health
                    )
                } else if !c.kvstoremesh {
                    "KVStoreMesh is disabled in this cluster: enable it (enable-kvstoremesh: true)"
                        .into()
                } else {
                    "the apiserver has not picked up the config file yet".into()
                };
                errors.insert(name.clone(), json!(h));
                json!({"configured": true, "connected": false, "ready": false})
            }
        };
        clusters.insert(name.clone(), entry);
    }
    json!({
        "cluster": c.name,
        "cluster-id": c.id,
        "access_information": {"endpoints": c.endpoints, "cluster_name": c.name, "cluster_id": c.id,
            "max_connected_clusters": c.max_connected_clusters},
        "apiserver": {"reachable": report.is_some(), "ready": report.as_ref().map(|r| r["ready"].clone()).unwrap_or(json!(false)),
            "health": c.health},
        "kvstoremesh": {"enabled": c.kvstoremesh},
        "connectivity": {"total": configured.len(), "connected": connected, "ready": ready,
            "not_ready": configured.len() - ready},
        "clusters": clusters,
        "errors": errors,
        // Certificates the apiserver and its etcd use that expire within 30 days.
        "certificate-warnings": report.as_ref().map(|r| r["certificates"]["warnings"].clone()).unwrap_or(json!([])),
    })
}

/// Human-readable status.
pub fn print_summary(v: &Value) {
    let name = v["cluster"].as_str().unwrap_or_default();
    let api = &v["apiserver"];
    if api["reachable"].as_bool() == Some(true) {
        let icon = if api["ready"].as_bool() == Some(true) {
            "✅"
        } else {
            "⚠️ "
        };
        println!(
            "{icon} clustermesh-apiserver of {name} is {} ({})",
            if api["ready"].as_bool() == Some(true) {
                "ready"
            } else {
                "not ready"
            },
            api["health"].as_str().unwrap_or_default()
        );
    } else {
        println!(
            "❌ clustermesh-apiserver of {name} does not answer on {}",
            api["health"].as_str().unwrap_or_default()
        );
    }
    println!(
        "✅ Cluster access information is available:\n  - {}",
        v["access_information"]["endpoints"]
            .as_array()
            .map(|e| e
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(", "))
            .unwrap_or_default()
    );
    if v["kvstoremesh"]["enabled"].as_bool() == Some(true) {
        println!("ℹ️  KVStoreMesh is enabled");
    }
    // Before the connections: it matters also for a cluster without remotes.
    if let Some(warnings) = v["certificate-warnings"]
        .as_array()
        .filter(|w| !w.is_empty())
    {
        println!();
        println!("⚠️  {} certificate warnings:", warnings.len());
        for w in warnings {
            println!("  ⚠️  {}", w.as_str().unwrap_or_default());
        }
    }
    let c = &v["connectivity"];
    let total = c["total"].as_u64().unwrap_or(0);
    let ready = c["ready"].as_u64().unwrap_or(0);
    println!();
    if total == 0 {
        println!("ℹ️  No remote clusters configured (`clustermesh connect` adds one)");
        return;
    }
    if ready == total {
        println!("✅ KVStoreMesh is connected to all {total} clusters");
    } else {
        println!("⚠️  KVStoreMesh is connected to {ready}/{total} clusters");
    }
    println!();
    println!("🔌 Cluster Connections:");
    if let Some(clusters) = v["clusters"].as_object() {
        for (n, r) in clusters {
            let state = if r["ready"].as_bool() == Some(true) {
                "ready"
            } else if r["connected"].as_bool() == Some(true) {
                "connected, not ready"
            } else {
                "not connected"
            };
            print!("  - {n}: configured, {state}");
            if r["connected"].as_bool() == Some(true) {
                print!(
                    " — {} nodes, {} endpoints, {} identities, {} services, {} failures",
                    r["num-nodes"],
                    r["num-endpoints"],
                    r["num-identities"],
                    r["num-shared-services"],
                    r["num-failures"]
                );
                // A remote exporting services as EndpointSlices (service v2).
                if let Some(n) = r["num-endpoint-slices"].as_u64().filter(|n| *n > 0) {
                    print!(", {n} endpoint slices");
                }
            }
            println!();
        }
    }
    if let Some(errors) = v["errors"].as_object().filter(|e| !e.is_empty()) {
        println!();
        println!("❌ {} Errors:", errors.len());
        for (n, e) in errors {
            println!(
                "  ❌ {name} is not connected to cluster {n}: {}",
                e.as_str().unwrap_or_default()
            );
        }
    }
}

fn all_ready(v: &Value) -> bool {
    v["apiserver"]["reachable"].as_bool() == Some(true)
        && v["connectivity"]["not_ready"].as_u64() == Some(0)
}

/// `clustermesh status`.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let Some(state_dir) = &a.state_dir else {
        return crate::contexts::status::run(&a);
    };
    let c = Access::load(state_dir)?;
    report_status(&a, &c.name, || Ok(status_json(&c)))
}

/// Polls `doc` until every remote is ready (with `--wait`), then prints the report.
pub fn report_status(
    a: &StatusArgs,
    name: &str,
    mut doc: impl FnMut() -> anyhow::Result<Value>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + a.wait_duration;
    let mut v = doc()?;
    if a.wait {
        let mut announced = false;
        while !all_ready(&v) && Instant::now() < deadline {
            if !announced && a.output != "json" {
                println!(
                    "⌛ Waiting (max {}) for the mesh of {name} to be ready…",
                    humantime::format_duration(a.wait_duration),
                );
                announced = true;
            }
            std::thread::sleep(Duration::from_millis(250));
            v = doc()?;
        }
    }
    if a.output == "json" {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_summary(&v);
    }
    if a.wait && !all_ready(&v) {
        bail!(
            "timed out after {} waiting for every remote cluster of {name} to be ready",
            humantime::format_duration(a.wait_duration),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_name_the_fix() {
        let h = |v: Value| hint("c1", &v).unwrap_or_default();
        assert!(h(json!({"name":"c2","connected":false,"status":"cannot connect: the server certificate does not chain to trusted-ca-file"}))
            .contains("--allow-mismatching-ca"));
        assert!(h(json!({"name":"c2","connected":true,"status":"remote cluster configuration required but not found","config":{"retrieved":false}}))
            .contains("cluster name matches"));
        assert_eq!(
            h(
                json!({"name":"c2","connected":true,"status":"ok","config":{"retrieved":true},
                "synced":{"nodes":true,"endpoints":false,"identities":false,"services":true,"service-exports":true}})
            ),
            "synchronization in progress for endpoints, identities"
        );
        assert!(hint("c1", &json!({"ready": true})).is_none());
        // The reader's classification wins over the words of the status.
        let h = h(json!({"name":"c2","connected":false,
            "status":"watch of cilium/state/nodes/v1/c2/ ended: h2 protocol error: keep-alive timed out",
            "failure-class":"unreachable","hint":"etcd at https://198.18.2.1:2379 is not reachable (no answer to keepalive pings)"}));
        assert!(h.starts_with("unreachable: etcd at"), "{h}");
        assert!(!h.contains("CA"), "{h}");
    }

    #[test]
    fn pem_bundles_split() {
        let a = "-----BEGIN CERTIFICATE-----\nAAA\n-----END CERTIFICATE-----\n";
        let b = "-----BEGIN CERTIFICATE-----\nBBB\n-----END CERTIFICATE-----";
        assert_eq!(pem_blocks(&format!("{a}{b}")).len(), 2);
    }
}
