//! Issue 3 acceptance: clusters connected with the CLI, each with its own embedded etcd and
//! clustermesh-apiserver (KVStoreMesh on). Checks `clustermesh status -o json` against what
//! each cluster exports, the kvstoremesh cache in the local etcd (exact keys and bytes,
//! `cached: true` configs, canaries), an agent reading the whole mesh through the cache with
//! its `local-<c>` certificate, the drain after `disconnect` (cluster config first, cache
//! after the grace period), and the refusals of `connect` (different CA, equal IDs/names).
//! c3 exports its services as EndpointSlices only (`--clustermesh-service-v2=only-endpointslice`):
//! they are cached under `cilium/cache/endpointslices/v1/c3/` and read from there.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use clustermesh_syncer::remote::{Config, Manager, Metrics, Mode, Resource};
use clustermesh_syncer::EtcdConfig;
use clustermesh_tests::fixtures::{self, Shape};
use clustermesh_tests::process::{find_binary, free_port, TestApiserver};
use clustermesh_types::cluster::{ClusterInfo, ClusterName, MaxConnectedClusters};
use etcd_client::{Client, GetOptions};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const GRACE: &str = "4s";

struct Cluster {
    name: String,
    id: u32,
    state: PathBuf,
    api: Option<TestApiserver>,
    /// Extra apiserver flags.
    flags: Vec<&'static str>,
}

fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(find_binary("clustermesh").unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `clustermesh enable` (+ manifests); the apiserver is started by [`Cluster::start`].
fn prepare(root: &Path, ca: &str, name: &str, id: u32, nodes: u32, pods: u32) -> Cluster {
    let state = root.join(name);
    let (port, peer, health) = (free_port(), free_port(), free_port());
    let (ok, text) = cli(&[
        "enable",
        "--cluster-name",
        name,
        "--cluster-id",
        &id.to_string(),
        "--state-dir",
        state.to_str().unwrap(),
        "--ca-dir",
        root.join(ca).to_str().unwrap(),
        "--etcd-listen",
        &format!("127.0.0.1:{port}"),
        "--etcd-peer-port",
        &peer.to_string(),
        "--health-addr",
        &format!("127.0.0.1:{health}"),
    ]);
    assert!(ok, "{text}");
    std::fs::write(
        state.join("manifests/cluster.yaml"),
        fixtures::cluster(Shape {
            cluster_id: id,
            nodes,
            pods,
            services: 2,
        }),
    )
    .unwrap();
    Cluster {
        name: name.into(),
        id,
        state,
        api: None,
        flags: Vec::new(),
    }
}

impl Cluster {
    fn health(&self) -> SocketAddr {
        let text = std::fs::read_to_string(self.state.join("apiserver.yaml")).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        v["health-addr"].as_str().unwrap().parse().unwrap()
    }

    fn start(&mut self) {
        let config = self.state.join("apiserver.yaml");
        let mut args = vec![
            "--config",
            config.to_str().unwrap(),
            "--kvstoremesh-drain-grace",
            GRACE,
        ];
        args.extend(self.flags.iter().copied());
        let mut api =
            TestApiserver::start_at(&args, self.health(), &self.state.join("api.log")).unwrap();
        api.wait_ready(Duration::from_secs(30)).unwrap();
        self.api = Some(api);
    }

    fn dir(&self) -> &str {
        self.state.to_str().unwrap()
    }

    async fn etcd(&self, stem: &str) -> Client {
        let certs = self.state.join("certs");
        let text = std::fs::read_to_string(self.state.join("apiserver.yaml")).unwrap();
        let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let cfg = EtcdConfig {
            endpoints: vec![format!(
                "https://{}",
                v["embedded-etcd-listen"].as_str().unwrap()
            )],
            trusted_ca_file: Some(certs.join("ca.crt")),
            cert_file: Some(certs.join(format!("{stem}.crt"))),
            key_file: Some(certs.join(format!("{stem}.key"))),
            host_aliases: Vec::new(),
            cluster_cidrs: Default::default(),
        };
        clustermesh_tests::etcd::raw_client(&cfg).await.unwrap()
    }

    fn log_tail(&self) -> String {
        self.api
            .as_ref()
            .map(|a| a.log_tail(40))
            .unwrap_or_default()
    }
}

async fn list(c: &mut Client, prefix: &str) -> BTreeMap<String, Vec<u8>> {
    let resp = c
        .get(prefix, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(kv.key()).into_owned(),
                kv.value().to_vec(),
            )
        })
        .collect()
}

/// What `c` exports for its peers: cache-relative key → bytes, per resource. EndpointSlices
/// count only from a cluster that announces them (`endpointSlicesExportMode`); the default
/// `prefer-legacy` writes them without telling, and readers then keep to `services/v1`.
async fn exported(c: &Cluster) -> BTreeMap<&'static str, BTreeMap<String, Vec<u8>>> {
    let mut e = c.etcd("root").await;
    let n = &c.name;
    let mut out = BTreeMap::new();
    let announced = c.flags.iter().any(|f| f.contains("endpointslice"));
    let mut stores = vec![
        ("nodes", format!("cilium/state/nodes/v1/{n}/")),
        ("endpoints", "cilium/state/ip/v1/default/".to_string()),
        ("identities", "cilium/state/identities/v1/id/".to_string()),
        ("services", format!("cilium/state/services/v1/{n}/")),
    ];
    if announced {
        stores.push((
            "endpointslices",
            format!("cilium/state/endpointslices/v1/{n}/"),
        ));
    } else {
        out.insert("endpointslices", BTreeMap::new());
    }
    for (res, prefix) in stores {
        let m = list(&mut e, &prefix)
            .await
            .into_iter()
            .map(|(k, v)| (k[prefix.len()..].to_string(), v))
            .collect();
        out.insert(res, m);
    }
    out
}

fn status_json(c: &Cluster, wait: bool) -> (bool, Value, String) {
    let mut args = vec!["status", "--state-dir", c.dir(), "-o", "json"];
    if wait {
        args.extend(["--wait", "--wait-duration", "60s"]);
    }
    let out = Command::new(find_binary("clustermesh").unwrap())
        .args(&args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    )
}

fn connect(a: &Cluster, b: &Cluster, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "connect",
        "--state-dir",
        a.dir(),
        "--destination-state-dir",
        b.dir(),
    ];
    args.extend(extra);
    cli(&args)
}

async fn eventually<F, Fut>(timeout: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_connected_with_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let mut c1 = prepare(root, "ca", "c1", 1, 2, 4);
    let mut c2 = prepare(root, "ca", "c2", 2, 3, 6);
    let mut c3 = prepare(root, "ca", "c3", 3, 4, 8);
    c3.flags = vec!["--clustermesh-service-v2=only-endpointslice"];
    for c in [&mut c1, &mut c2, &mut c3] {
        c.start();
    }

    // Connect pairwise with the CLI.
    for (a, b) in [(&c1, &c2), (&c1, &c3), (&c2, &c3)] {
        let (ok, text) = connect(a, b, &[]);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("✅ Connected cluster {} <=> {}!", a.name, b.name)),
            "{text}"
        );
    }
    assert!(c1.state.join("clustermesh/c2").is_file());
    assert!(c2.state.join("clustermesh/c1").is_file());

    // Every remote ready, with the counts each cluster exports.
    let t = Instant::now();
    let all = [&c1, &c2, &c3];
    for c in all {
        let (ok, v, text) = status_json(c, true);
        assert!(ok, "{}: {text}\n{}", c.name, c.log_tail());
        assert_eq!(v["connectivity"]["total"], 2, "{text}");
        assert_eq!(v["connectivity"]["ready"], 2, "{text}");
        for peer in all.iter().filter(|p| p.name != c.name) {
            let want = exported(peer).await;
            let r = &v["clusters"][&peer.name];
            assert_eq!(r["ready"], true, "{text}");
            assert_eq!(
                r["num-nodes"],
                want["nodes"].len(),
                "{}→{}: {text}",
                c.name,
                peer.name
            );
            assert_eq!(r["num-endpoints"], want["endpoints"].len(), "{text}");
            assert_eq!(r["num-identities"], want["identities"].len(), "{text}");
            assert_eq!(r["num-shared-services"], want["services"].len(), "{text}");
            assert_eq!(
                r["num-endpoint-slices"],
                want["endpointslices"].len(),
                "{text}"
            );
            assert_eq!(r["config"]["cluster-id"], peer.id, "{text}");
            assert!(want["nodes"].len() >= 2 && !want["endpoints"].is_empty());
        }
    }
    println!("mesh of 3 ready {:?} after the last connect", t.elapsed());
    // Human output: one line per remote.
    let (ok, text) = cli(&["status", "--state-dir", c1.dir()]);
    assert!(ok, "{text}");
    assert!(
        text.contains("KVStoreMesh is connected to all 2 clusters"),
        "{text}"
    );
    assert!(text.contains("  - c2: configured, ready"), "{text}");

    // The kvstoremesh cache in c1's etcd holds exactly c2's and c3's entries, byte for byte.
    let mut e1 = c1.etcd("root").await;
    let cache = list(&mut e1, "cilium/cache/").await;
    let mut expected = BTreeMap::new();
    for peer in [&c2, &c3] {
        let n = &peer.name;
        for (res, entries) in exported(peer).await {
            let prefix = match res {
                "nodes" => format!("cilium/cache/nodes/v1/{n}/"),
                "endpoints" => format!("cilium/cache/ip/v1/{n}/"),
                "identities" => format!("cilium/cache/identities/v1/{n}/id/"),
                "endpointslices" => format!("cilium/cache/endpointslices/v1/{n}/"),
                _ => format!("cilium/cache/services/v1/{n}/"),
            };
            for (k, v) in entries {
                expected.insert(format!("{prefix}{k}"), v);
            }
        }
    }
    assert_eq!(
        cache.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        cache, expected,
        "cache bytes differ from the remotes' bytes"
    );
    for peer in [&c2, &c3] {
        let cfg = list(&mut e1, &format!("cilium/cluster-config/{}", peer.name)).await;
        let v: Value = serde_json::from_slice(cfg.values().next().unwrap()).unwrap();
        assert_eq!(v["id"], peer.id);
        assert_eq!(v["capabilities"]["cached"], true, "{v}");
        assert_eq!(v["capabilities"]["syncedCanaries"], true, "{v}");
        let mode = if peer.name == "c3" {
            "endpointslices-only"
        } else {
            ""
        };
        assert_eq!(
            v["capabilities"]["endpointSlicesExportMode"]
                .as_str()
                .unwrap_or(""),
            mode,
            "{v}"
        );
        let synced = list(&mut e1, &format!("cilium/synced/{}/", peer.name)).await;
        for s in [
            "nodes/v1",
            "services/v1",
            "serviceexports/v1",
            "identities/v1",
            "ip/v1",
            "endpointslices/v1",
        ] {
            let key = format!("cilium/synced/{}/cilium/cache/{s}", peer.name);
            assert!(
                synced.contains_key(&key),
                "{key} missing: {:?}",
                synced.keys()
            );
        }
    }
    let own = list(&mut e1, "cilium/cluster-config/c1").await;
    assert!(!String::from_utf8_lossy(own.values().next().unwrap()).contains("cached"));
    let metrics = c1.api.as_ref().unwrap().metrics().unwrap();
    assert!(
        metrics.contains("cilium_kvstoremesh_remote_cluster_readiness_status{source_cluster=\"c1\",target_cluster=\"c2\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("cilium_kvstoremesh_remote_clusters{source_cluster=\"c1\"} 2"));

    // An agent of c1 reads the whole mesh from c1's etcd only, with the local-c1 certificate.
    {
        let agent_dir = tempfile::tempdir().unwrap();
        for peer in ["c2", "c3"] {
            std::fs::copy(
                c1.state.join("local-etcd-config.yaml"),
                agent_dir.path().join(peer),
            )
            .unwrap();
        }
        let local_etcd = EtcdConfig::load(&c1.state.join("local-etcd-config.yaml")).unwrap();
        assert!(local_etcd
            .cert_file
            .as_ref()
            .unwrap()
            .ends_with("local-c1.crt"));
        let info = ClusterInfo {
            name: ClusterName::new("c1").unwrap(),
            id: 1,
            max_connected_clusters: MaxConnectedClusters::Max255,
        };
        let config = Config::new(
            info,
            agent_dir.path().to_path_buf(),
            Mode::KvstoreMesh { local_etcd },
        );
        let (manager, _events) = Manager::new(config, Metrics::default()).unwrap();
        let mut status = manager.status();
        let caches = manager.caches();
        let token = CancellationToken::new();
        let run = tokio::spawn(manager.run(token.child_token()));
        tokio::time::timeout(
            Duration::from_secs(20),
            status.wait_for(|s| s.clusters.len() == 2 && s.clusters.iter().all(|c| c.ready)),
        )
        .await
        .expect("agent ready through kvstoremesh")
        .unwrap();
        let snap = status.borrow().clone();
        for peer in [&c2, &c3] {
            let want = exported(peer).await;
            let s = snap.get(&peer.name).unwrap();
            assert!(s.config.kvstoremesh, "{s:?}");
            assert_eq!(s.num_nodes, want["nodes"].len());
            assert_eq!(s.num_endpoints, want["endpoints"].len());
            assert_eq!(s.num_identities, want["identities"].len());
            assert_eq!(s.num_shared_services, want["services"].len());
            assert_eq!(s.num_endpoint_slices, want["endpointslices"].len());
            let n = caches.with(&peer.name, |c| c.len(Resource::Nodes)).unwrap();
            assert_eq!(n, want["nodes"].len());
        }
        token.cancel();
        run.await.unwrap().unwrap();
    }

    // Disconnect c3: the others delete its cluster config at once, its cache after the grace.
    let (ok, text) = cli(&[
        "disconnect",
        "--state-dir",
        c1.dir(),
        "--destination-state-dir",
        c3.dir(),
    ]);
    assert!(
        ok && text.contains("✅ Disconnected clusters c1 <x> c3!"),
        "{text}"
    );
    let (ok, text) = cli(&[
        "disconnect",
        "--state-dir",
        c2.dir(),
        "--destination-state-dir",
        c3.dir(),
    ]);
    assert!(ok, "{text}");
    let t = Instant::now();
    for c in [&c1, &c2] {
        let mut e = c.etcd("root").await;
        eventually(
            Duration::from_secs(10),
            "c3's cluster config deleted",
            || {
                let mut e = e.clone();
                async move { list(&mut e, "cilium/cluster-config/c3").await.is_empty() }
            },
        )
        .await;
        if c.name == "c1" {
            let config_gone = t.elapsed();
            assert!(
                !list(&mut e, "cilium/cache/nodes/v1/c3/").await.is_empty(),
                "cache drained together with the config ({config_gone:?}); the grace period must separate them"
            );
        }
    }
    for c in [&c1, &c2] {
        let mut e = c.etcd("root").await;
        eventually(Duration::from_secs(20), "c3's cache drained", || {
            let mut e = e.clone();
            async move {
                let cache = list(&mut e, "cilium/cache/").await;
                let synced = list(&mut e, "cilium/synced/c3/").await;
                synced.is_empty() && !cache.keys().any(|k| k.contains("/c3/"))
            }
        })
        .await;
        let drained = t.elapsed();
        assert!(
            drained >= Duration::from_secs(3),
            "drained after {drained:?}, before the grace"
        );
        let cache = list(&mut e, "cilium/cache/").await;
        let other = if c.name == "c1" { "c2" } else { "c1" };
        assert!(
            cache.keys().any(|k| k.contains(&format!("/{other}/"))),
            "the other remote is kept"
        );
    }
    let (_, v, text) = status_json(&c1, false);
    assert_eq!(v["connectivity"]["total"], 1, "{text}");
    assert!(v["clusters"].get("c3").is_none(), "{text}");
    // The users are gone too: c3's etcd no longer knows remote-c1, and c3's users file (which
    // its apiserver keeps the etcd's users to) no longer names it; remote-c2 left it too.
    let mut root3 = c3.etcd("root").await;
    assert!(root3.user_get("remote-c1").await.is_err());
    let users3 = std::fs::read_to_string(c3.state.join("cluster-users.yaml")).unwrap();
    assert_eq!(users3, "users: []\n");
    let users1 = std::fs::read_to_string(c1.state.join("cluster-users.yaml")).unwrap();
    assert_eq!(users1, "users:\n- name: remote-c2\n  role: remote\n");
    drop(c3.api.take());

    // A cluster with another CA is refused, then accepted with --allow-mismatching-ca.
    let mut c4 = prepare(root, "other-ca", "c4", 4, 1, 2);
    c4.start();
    let (ok, text) = connect(&c1, &c4, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("different CAs") && text.contains("--allow-mismatching-ca"),
        "{text}"
    );
    assert!(!c1.state.join("clustermesh/c4").exists());
    let (ok, text) = connect(&c1, &c4, &["--allow-mismatching-ca"]);
    assert!(ok, "{text}");
    assert!(text.contains("✅ Connected cluster c1 <=> c4!"), "{text}");
    // Each etcd reads its trusted CA bundle at start (Cilium restarts the apiserver too).
    for c in [&mut c1, &mut c4] {
        let api = c.api.as_mut().unwrap();
        api.restart().unwrap();
        api.wait_ready(Duration::from_secs(60)).unwrap();
    }
    for c in [&c1, &c4] {
        let (ok, v, text) = status_json(c, true);
        assert!(ok, "{}: {text}\n{}", c.name, c.log_tail());
        let peer = if c.name == "c1" { "c4" } else { "c1" };
        assert_eq!(v["clusters"][peer]["ready"], true, "{text}");
    }

    // Equal IDs and equal names are refused before anything is written.
    let c5 = prepare(root, "ca", "c5", 2, 1, 1);
    let (ok, text) = connect(&c2, &c5, &[]);
    assert!(!ok && text.contains("cluster ID 2"), "{text}");
    assert!(!c2.state.join("clustermesh/c5").exists());
    let same = prepare(&root.join("x"), "../ca", "c2", 9, 1, 1);
    let (ok, text) = connect(&c2, &same, &[]);
    assert!(!ok && text.contains("named \"c2\""), "{text}");
    // Another cluster named like an existing peer does not replace it.
    let twin = prepare(&root.join("y"), "../ca", "c1", 8, 1, 1);
    let (ok, text) = connect(&c2, &twin, &[]);
    assert!(
        !ok && text.contains("already connected to a cluster named c1"),
        "{text}"
    );
    assert_eq!(
        EtcdConfig::load(&c2.state.join("clustermesh/c1"))
            .unwrap()
            .endpoints,
        EtcdConfig::load(&c1.state.join("etcd-config.yaml"))
            .unwrap()
            .endpoints
    );

    // 511 clusters: IDs up to 511 with --max-connected-clusters 511 (0, 512, and 300 under
    // 255 refused), and a 511 cluster is never connected to a 255 one.
    let enable511 = |name: &str, id: &str, max: &str| {
        let state = root.join(name);
        cli(&[
            "enable",
            "--cluster-name",
            name,
            "--cluster-id",
            id,
            "--max-connected-clusters",
            max,
            "--state-dir",
            state.to_str().unwrap(),
            "--ca-dir",
            root.join("ca").to_str().unwrap(),
            "--etcd-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--etcd-peer-port",
            &free_port().to_string(),
            "--health-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
    };
    for (id, max, want) in [
        ("0", "511", "reserved"),
        ("512", "511", "between 1 and 511"),
        ("300", "255", "between 1 and 255"),
        ("300", "300", "255"),
    ] {
        let (ok, text) = enable511("bad", id, max);
        assert!(!ok && text.contains(want), "{id}/{max}: {text}");
    }
    let (ok, text) = enable511("c300", "300", "511");
    assert!(ok, "{text}");
    let yaml = std::fs::read_to_string(root.join("c300/apiserver.yaml")).unwrap();
    assert!(yaml.contains("max-connected-clusters: 511"), "{yaml}");
    let (ok, text) = enable511("c511", "511", "511");
    assert!(ok, "{text}");
    let c300 = root.join("c300");
    let (ok, text) = cli(&[
        "connect",
        "--state-dir",
        c2.dir(),
        "--destination-state-dir",
        c300.to_str().unwrap(),
    ]);
    assert!(
        !ok && text.contains("max-connected-clusters differs (c2 has 255, c300 has 511)")
            && text.contains("re-enable one of them"),
        "{text}"
    );
    assert!(!c2.state.join("clustermesh/c300").exists());
    assert!(!c300.join("clustermesh/c2").exists());
}
