//! Shared fixture for the remote reader suites: a running `remote::Manager` on a temp config
//! directory, an event collector, and Cilium-format seed data (reference §2 literals).

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clustermesh_syncer::remote::{Caches, Config, Event, Manager, Metrics, Mode, Snapshot, Status};
use clustermesh_tests::etcd::TestEtcd;
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};
use etcd_client::Client;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const CONFIG3: &str = r#"{"id":3,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#;

pub const NODE1: &str = r#"{"Name":"test-node-1","Cluster":"cluster3","IPAddresses":[{"Type":"InternalIP","IP":"172.18.0.2"},{"Type":"InternalIP","IP":"fc00:c111::2"},{"Type":"CiliumInternalIP","IP":"10.244.0.10"},{"Type":"CiliumInternalIP","IP":"fd00:10:244::e2d6"}],"IPv4AllocCIDR":{"IP":"10.244.0.0","Mask":"////AA=="},"IPv4SecondaryAllocCIDRs":null,"IPv6AllocCIDR":{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="},"IPv6SecondaryAllocCIDRs":null,"IPv4HealthIP":"10.244.0.134","IPv6HealthIP":"fd00:10:244::d812","IPv4IngressIP":"","IPv6IngressIP":"","ClusterID":3,"Source":"custom-resource","EncryptionKey":0,"Labels":{"kubernetes.io/hostname":"test-node-1"},"Annotations":{"network.cilium.io/wg-pub-key":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI="},"WireguardPubKey":"VRksOB6ZNds4oXWIGfSVpvc0gBhcOWFmzvTDcyvULlI=","BootID":"570d3fd1-93db-4862-ba99-6a3c2c10c38f"}"#;

pub const IDENTITY: &str =
    "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";

pub const IP_POD: &str = r#"{"IP":"10.244.2.74","Mask":null,"HostIP":"172.18.0.2","ID":199475,"Key":5,"Metadata":"","K8sNamespace":"quixote","K8sPodName":"cep-002","K8sServiceAccount":"default"}"#;
pub const IP_HOST: &str =
    r#"{"IP":"172.18.0.2","Mask":null,"HostIP":"172.18.0.2","ID":1,"Key":0,"Metadata":""}"#;

pub const SERVICE: &str = r#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;

/// A node of `cluster` with `id`, named `name`.
pub fn node(cluster: &str, id: u32, name: &str) -> String {
    NODE1
        .replace("\"Name\":\"test-node-1\"", &format!("\"Name\":\"{name}\""))
        .replace(
            "\"Cluster\":\"cluster3\"",
            &format!("\"Cluster\":\"{cluster}\""),
        )
        .replace("\"ClusterID\":3", &format!("\"ClusterID\":{id}"))
}

/// An ipcache host entry.
pub fn ip_entry(ip: &str, id: u32) -> String {
    format!(r#"{{"IP":"{ip}","Mask":null,"HostIP":"172.18.0.2","ID":{id},"Key":0,"Metadata":""}}"#)
}

pub const STORES: [&str; 5] = [
    "nodes/v1",
    "services/v1",
    "serviceexports/v1",
    "identities/v1",
    "ip/v1",
];

/// Writes what a Cilium clustermesh-apiserver of `cluster3` writes.
pub async fn seed_cluster3(c: &mut Client) -> anyhow::Result<()> {
    c.put("cilium/.heartbeat", "2025-01-01T00:00:00Z", None)
        .await?;
    c.put("cilium/cluster-config/cluster3", CONFIG3, None)
        .await?;
    c.put("cilium/state/nodes/v1/cluster3/test-node-1", NODE1, None)
        .await?;
    c.put("cilium/state/identities/v1/id/196915", IDENTITY, None)
        .await?;
    c.put("cilium/state/ip/v1/default/10.244.2.74", IP_POD, None)
        .await?;
    c.put("cilium/state/ip/v1/default/172.18.0.2", IP_HOST, None)
        .await?;
    c.put(
        "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
        SERVICE,
        None,
    )
    .await?;
    write_canaries(c, "cluster3", "state").await
}

/// A new etcd holding what cluster3's apiserver writes ([`seed_cluster3`]), and its root
/// client.
pub async fn seeded_cluster3() -> anyhow::Result<(TestEtcd, Client)> {
    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    seed_cluster3(&mut c).await?;
    Ok((etcd, c))
}

pub async fn write_canaries(c: &mut Client, cluster: &str, root: &str) -> anyhow::Result<()> {
    for s in STORES {
        c.put(
            format!("cilium/synced/{cluster}/cilium/{root}/{s}"),
            "2025-01-01T00:00:00Z",
            None,
        )
        .await?;
    }
    Ok(())
}

pub fn local() -> ClusterInfo {
    ClusterInfo {
        name: ClusterName::new("cluster1").unwrap(),
        id: 1,
        max_connected_clusters: MaxConnectedClusters::Max255,
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub token: CancellationToken,
    pub events: Arc<Mutex<Vec<(Instant, Event)>>>,
    pub status: watch::Receiver<Snapshot>,
    pub caches: Caches,
    pub metrics: Metrics,
    task: tokio::task::JoinHandle<()>,
    collector: tokio::task::JoinHandle<()>,
}

impl Fixture {
    pub fn start(tune: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        Self::start_mode(Mode::Direct, tune)
    }

    pub fn start_mode(mode: Mode, tune: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut config = Config::new(local(), dir.path().to_path_buf(), mode);
        config.backoff_min = Duration::from_millis(50);
        config.backoff_max = Duration::from_millis(500);
        config.rescan_interval = Duration::from_millis(500);
        tune(&mut config);
        let metrics = Metrics::default();
        let (manager, mut rx) = Manager::new(config, metrics.clone())?;
        let status = manager.status();
        let caches = manager.caches();
        let token = CancellationToken::new();
        let task = tokio::spawn({
            let token = token.clone();
            async move {
                manager.run(token).await.unwrap();
            }
        });
        let events = Arc::new(Mutex::new(Vec::new()));
        let collector = tokio::spawn({
            let events = events.clone();
            async move {
                while let Some(ev) = rx.recv().await {
                    events.lock().unwrap().push((Instant::now(), ev));
                }
            }
        });
        Ok(Self {
            dir,
            token,
            events,
            status,
            caches,
            metrics,
            task,
            collector,
        })
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes the config file for remote `name` pointing at `etcd`.
    pub fn connect(&self, name: &str, etcd: &TestEtcd) -> anyhow::Result<()> {
        write_atomic(&self.path(name), |p| etcd.write_client_config("remote", p))
    }

    /// Connects remote `name` to `etcd` and waits until it is ready.
    pub async fn connect_ready(&mut self, name: &str, etcd: &TestEtcd) -> anyhow::Result<Status> {
        self.connect(name, etcd)?;
        self.wait_ready(name).await
    }

    pub async fn wait_status(
        &mut self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Status) -> bool,
    ) -> anyhow::Result<Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.status.borrow_and_update().get(name) {
                if pred(s) {
                    return Ok(s.clone());
                }
            }
            match tokio::time::timeout_at(deadline, self.status.changed()).await {
                Ok(r) => r?,
                Err(_) => {
                    let snap = self.status.borrow().clone();
                    anyhow::bail!(
                        "timed out waiting for status of {name}: {}",
                        serde_json::to_string_pretty(&snap)?
                    )
                }
            }
        }
    }

    pub async fn wait_ready(&mut self, name: &str) -> anyhow::Result<Status> {
        self.wait_status(name, Duration::from_secs(20), |s| s.ready)
            .await
    }

    /// Events about `cluster` so far.
    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .map(|(_, e)| e.clone())
            .collect()
    }

    pub fn clear_events(&self) {
        self.events.lock().unwrap().clear();
    }

    pub async fn stop(self) {
        self.token.cancel();
        let _ = self.task.await;
        self.collector.abort();
    }
}

/// Writes via a temp file + rename, as Kubernetes secret mounts and careful tools do.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap().to_string_lossy()
    ));
    write(&tmp)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Polls `f` until it returns true.
pub async fn eventually(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!("timed out after {timeout:?} waiting for {what}")
}
