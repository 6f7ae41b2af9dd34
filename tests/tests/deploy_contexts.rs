//! `clustermesh enable/connect/status/disconnect --context` against two instances of the test
//! Kubernetes API server (real kube-rs client, real TLS), with real clustermesh-apiservers and
//! etcds answering behind them.
//!
//! No kubelet runs here, so the test plays it, as documented: after each command it projects
//! the Secrets and ConfigMaps the CLI wrote into each "pod"'s files the way the Deployment's
//! volumes do (paths under `/etc/clustermesh` and `/var/lib/etcd-secrets` move into the pod's
//! temp dir; the pod's loopback etcd port 2379 becomes a free port, since both pods share this
//! machine's loopback), starts the etcd sidecar and the apiserver with the Deployment's flags
//! (`--etcd-config`, `--etcd-init`, `--cluster-users-config-path`, KVStoreMesh on), has the
//! etcd listen on the Node's InternalIP and the Service's nodePort (kube-proxy's job), and
//! registers the pod (`status.podIP`) so `status --context` reaches `/status` through the API
//! server's pod proxy. The apiservers read an empty manifest directory as their source.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use clustermesh_tests::kubeapi::{KubeApi, Outage};
use clustermesh_tests::process::{find_binary, free_port, TestApiserver};
use serde_json::{json, Value};

const NS: &str = "kube-system";

struct Cli {
    kubeconfig: PathBuf,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        let out = Command::new(find_binary("clustermesh").unwrap())
            .args(args)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        eprintln!(
            "$ clustermesh {}\n{}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "clustermesh {args:?} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(!out.status.success(), "clustermesh {args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }
}

/// The real writes (dry runs left out) as `op Kind ns/name`, sorted.
fn writes(api: &KubeApi) -> Vec<String> {
    let mut w: Vec<String> = api
        .take_writes()
        .into_iter()
        .filter(|w| !w.dry_run)
        .map(|w| w.line())
        .collect();
    w.sort();
    w
}

fn sorted(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

fn enable_objects(op: &str) -> Vec<String> {
    sorted(&[
        &format!("{op} ServiceAccount {NS}/clustermesh-apiserver"),
        &format!("{op} ClusterRole clustermesh-apiserver"),
        &format!("{op} ClusterRoleBinding clustermesh-apiserver"),
        &format!("{op} ServiceAccount {NS}/clustermesh-agent"),
        &format!("{op} ClusterRole clustermesh-agent"),
        &format!("{op} ClusterRoleBinding clustermesh-agent"),
        &format!("{op} ConfigMap {NS}/clustermesh-config"),
        &format!("{op} Service {NS}/clustermesh-apiserver"),
        &format!("{op} Deployment {NS}/clustermesh-apiserver"),
        &format!("{op} DaemonSet {NS}/clustermesh-agent"),
        &format!("{op} Secret {NS}/cilium-ca"),
        &format!("{op} Secret {NS}/clustermesh-apiserver-server-cert"),
        &format!("{op} Secret {NS}/clustermesh-apiserver-admin-cert"),
        &format!("{op} Secret {NS}/clustermesh-apiserver-local-cert"),
        &format!("{op} Secret {NS}/clustermesh-apiserver-remote-cert"),
    ])
}

fn connect_objects(op: &str) -> Vec<String> {
    sorted(&[
        &format!("{op} Secret {NS}/cilium-kvstoremesh"),
        &format!("{op} Secret {NS}/cilium-clustermesh"),
        &format!("{op} ConfigMap {NS}/clustermesh-remote-users"),
    ])
}

fn node(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}})
}

fn b64(v: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .unwrap()
}

/// One cluster's control-plane "pod": its files, etcd sidecar and apiserver.
struct Pod {
    dir: PathBuf,
    name: String,
    node_ip: String,
    pod_ip: String,
    etcd_port: u16,
    etcd: Option<Child>,
    apiserver: Option<TestApiserver>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(c) = &mut self.etcd {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Pod {
    fn etc(&self) -> PathBuf {
        self.dir.join("etc-clustermesh")
    }

    /// What `/etc/clustermesh/...` means inside this pod.
    fn rewrite(&self, text: &str) -> String {
        text.replace("/etc/clustermesh", &self.etc().display().to_string())
            .replace(
                "https://127.0.0.1:2379",
                &format!("https://127.0.0.1:{}", self.etcd_port),
            )
    }

    fn write(path: &Path, data: &[u8]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let tmp = path.with_extension("projecting");
        std::fs::write(&tmp, data).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    /// The kubelet's part: Secrets and ConfigMaps into the pod's volumes, as the
    /// Deployment's volumes and items say (a key gone from a Secret is a file gone).
    fn project(&self, api: &KubeApi) {
        let secret = |n: &str| api.get("Secret", NS, n).map(|s| s["data"].clone());
        let server = secret("clustermesh-apiserver-server-cert").expect("server cert Secret");
        for k in ["ca.crt", "tls.crt", "tls.key"] {
            Self::write(&self.dir.join("etcd-secrets").join(k), &b64(&server[k]));
        }
        // With a CA bundle (--allow-mismatching-ca), etcd's ca.crt is the bundle's.
        if let Some(bundle) = api.get("ConfigMap", NS, "cilium-root-ca.crt") {
            Self::write(
                &self.dir.join("etcd-secrets/ca.crt"),
                bundle["data"]["ca.crt"].as_str().unwrap().as_bytes(),
            );
        }
        let admin = secret("clustermesh-apiserver-admin-cert").expect("admin cert Secret");
        for k in ["ca.crt", "tls.crt", "tls.key"] {
            Self::write(&self.etc().join("etcd-secrets").join(k), &b64(&admin[k]));
        }
        let cm = api.get("ConfigMap", NS, "clustermesh-config").unwrap();
        Self::write(
            &self.etc().join("etcd-config.yaml"),
            self.rewrite(cm["data"]["etcd-config.yaml"].as_str().unwrap())
                .as_bytes(),
        );
        let remotes = self.etc().join("clustermesh");
        std::fs::create_dir_all(&remotes).unwrap();
        let mut want = std::collections::BTreeMap::new();
        if let Some(data) = secret("cilium-kvstoremesh") {
            for (k, v) in data.as_object().unwrap() {
                let text = String::from_utf8(b64(v)).unwrap();
                want.insert(k.clone(), self.rewrite(&text).into_bytes());
            }
        }
        if let Some(remote) = secret("clustermesh-apiserver-remote-cert") {
            for (k, f) in [
                ("tls.key", "common-etcd-client.key"),
                ("tls.crt", "common-etcd-client.crt"),
                ("ca.crt", "common-etcd-client-ca.crt"),
            ] {
                want.insert(f.to_string(), b64(&remote[k]));
            }
        }
        for e in std::fs::read_dir(&remotes).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !want.contains_key(&n) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
        for (k, v) in want {
            Self::write(&remotes.join(k), &v);
        }
        let users = self.etc().join("users/users.yaml");
        match api.get("ConfigMap", NS, "clustermesh-remote-users") {
            Some(cm) => Self::write(
                &users,
                cm["data"]["users.yaml"].as_str().unwrap().as_bytes(),
            ),
            None => {
                let _ = std::fs::remove_file(&users);
            }
        }
    }

    /// Starts the etcd sidecar and the apiserver with the Deployment's flags, and registers
    /// the pod with the API server.
    fn start(&mut self, api: &KubeApi) {
        let cm = api.get("ConfigMap", NS, "clustermesh-config").unwrap();
        let svc = api.get("Service", NS, "clustermesh-apiserver").unwrap();
        let node_port = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap();
        let peer = free_port();
        let s = |p: &str| self.dir.join(p).display().to_string();
        let etcd_log = std::fs::File::create(self.dir.join("etcd.log")).unwrap();
        self.etcd = Some(
            Command::new("etcd")
                .args([
                    "--name=clustermesh-apiserver",
                    &format!("--data-dir={}", s("etcd-data")),
                    "--client-cert-auth",
                    &format!("--trusted-ca-file={}", s("etcd-secrets/ca.crt")),
                    &format!("--cert-file={}", s("etcd-secrets/tls.crt")),
                    &format!("--key-file={}", s("etcd-secrets/tls.key")),
                    &format!(
                        "--listen-client-urls=https://127.0.0.1:{},https://{}:{node_port}",
                        self.etcd_port, self.node_ip
                    ),
                    &format!(
                        "--advertise-client-urls=https://{}:{node_port}",
                        self.node_ip
                    ),
                    &format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                    &format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                    &format!("--initial-cluster=clustermesh-apiserver=http://127.0.0.1:{peer}"),
                    "--initial-cluster-state=new",
                    "--heartbeat-interval=10",
                    "--election-timeout=100",
                ])
                .stdin(Stdio::null())
                .stdout(etcd_log.try_clone().unwrap())
                .stderr(etcd_log)
                .spawn()
                .expect("etcd (apt-get install etcd-server)"),
        );
        std::fs::create_dir_all(self.dir.join("manifests")).unwrap();
        let etc = self.etc();
        let e = |p: &str| etc.join(p).display().to_string();
        let d = cm["data"].clone();
        let args: Vec<String> = vec![
            format!("--cluster-name={}", d["cluster-name"].as_str().unwrap()),
            format!("--cluster-id={}", d["cluster-id"].as_str().unwrap()),
            format!(
                "--max-connected-clusters={}",
                d["max-connected-clusters"].as_str().unwrap()
            ),
            format!("--etcd-config={}", e("etcd-config.yaml")),
            "--etcd-init".into(),
            format!("--state-dir={}", s("run")),
            format!("--manifests={}", s("manifests")),
            "--enable-kvstoremesh=true".into(),
            format!("--clustermesh-config={}", e("clustermesh")),
            format!("--cluster-users-config-path={}", e("users/users.yaml")),
            "--kvstoremesh-drain-grace=1s".into(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let health = format!("{}:9880", self.pod_ip).parse().unwrap();
        let mut a =
            TestApiserver::start_at(&args, health, &self.dir.join("apiserver.log")).unwrap();
        a.wait_ready(Duration::from_secs(30)).unwrap();
        self.apiserver = Some(a);
        api.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("clustermesh-apiserver-{}", self.name), "namespace": NS,
                         "labels": {"k8s-app": "clustermesh-apiserver"}},
            "spec": {"containers": [{"name": "apiserver"}]},
            "status": {"phase": "Running", "podIP": self.pod_ip},
        }))
        .unwrap();
    }

    /// The etcd's users, read with the admin certificate (role root).
    fn etcd_users(&self) -> Vec<String> {
        let out = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                &format!("--endpoints=https://127.0.0.1:{}", self.etcd_port),
                &format!(
                    "--cacert={}",
                    self.etc().join("etcd-secrets/ca.crt").display()
                ),
                &format!(
                    "--cert={}",
                    self.etc().join("etcd-secrets/tls.crt").display()
                ),
                &format!(
                    "--key={}",
                    self.etc().join("etcd-secrets/tls.key").display()
                ),
                "user",
                "list",
            ])
            .output()
            .expect("etcdctl (apt-get install etcd-client)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    }
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enable_connect_status_disconnect_on_two_clusters() {
    let east = KubeApi::start().await.unwrap();
    let west = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    KubeApi::write_kubeconfig_multi(&kubeconfig, &[(&east, "east"), (&west, "west")]).unwrap();
    let cli = Cli { kubeconfig };
    // A loopback block of our own for the nodes and pods of this test.
    let block = 100 + (std::process::id() % 100) as u8;
    east.apply(node("east-n1", &format!("127.{block}.1.1")))
        .unwrap();
    west.apply(node("west-n1", &format!("127.{block}.2.1")))
        .unwrap();
    let ca_dir = dir.path().join("ca");
    let ca = ca_dir.display().to_string();
    let (np_east, np_west) = (free_port().to_string(), free_port().to_string());

    // enable × 2, each twice: everything created once, then nothing changes.
    for (api, ctx, id, np) in [
        (&east, "east", "1", &np_east),
        (&west, "west", "2", &np_west),
    ] {
        let args = [
            "enable",
            "--context",
            ctx,
            "--cluster-name",
            ctx,
            "--cluster-id",
            id,
            "--ca-dir",
            &ca,
            "--node-port",
            np,
        ];
        let out = cli.ok(&args);
        assert!(out.contains("15 changes"), "{out}");
        assert_eq!(writes(api), enable_objects("created"));
        // The server's dry run of every object came first.
        let out = cli.ok(&args);
        assert!(out.contains("0 changes"), "{out}");
        assert_eq!(writes(api), enable_objects("unchanged"));
        // Without the flags the cluster's ConfigMap says who it is; other flags are refused.
        assert!(cli.ok(&["enable", "--context", ctx]).contains("0 changes"));
        writes(api);
        let err = cli.fails(&["enable", "--context", ctx, "--cluster-id", "9"]);
        assert!(err.contains("renaming or renumbering"), "{err}");
        assert!(writes(api).is_empty());
    }
    // Both clusters share the CA from --ca-dir.
    assert_eq!(
        east.get("Secret", NS, "cilium-ca").unwrap()["data"]["ca.crt"],
        west.get("Secret", NS, "cilium-ca").unwrap()["data"]["ca.crt"]
    );

    // --dry-run -o yaml shows every object and writes nothing.
    let yaml = cli.ok(&["enable", "--context", "east", "--dry-run", "-o", "yaml"]);
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    assert_eq!(docs.len(), 15, "{yaml}");
    assert!(east.take_writes().is_empty(), "a dry run sent writes");

    // The control planes, from what the API servers hold.
    let mut pods = Vec::new();
    for (api, name, i) in [(&east, "east", 1), (&west, "west", 2)] {
        let d = dir.path().join(format!("pod-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut p = Pod {
            dir: d,
            name: name.into(),
            node_ip: format!("127.{block}.{i}.1"),
            pod_ip: format!("127.{block}.{i}.2"),
            etcd_port: free_port(),
            etcd: None,
            apiserver: None,
        };
        p.project(api);
        p.start(api);
        pods.push(p);
    }
    // etcd-init made Cilium's users; no peer may read yet.
    let users = pods[0].etcd_users();
    assert!(
        users.contains(&"admin-east".to_string()) && users.contains(&"local-east".to_string()),
        "{users:?}"
    );
    assert!(!users.iter().any(|u| u.starts_with("remote-")), "{users:?}");

    // connect --dry-run -o yaml: every object of both sides, and nothing sent to either API
    // server (not even the server-side dry runs).
    let yaml = cli.ok(&[
        "connect",
        "--context",
        "east",
        "--destination-context",
        "west",
        "--dry-run",
        "-o",
        "yaml",
    ]);
    let docs: Vec<Value> = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    let mut names: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{} {}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "ConfigMap clustermesh-remote-users",
            "ConfigMap clustermesh-remote-users",
            "Secret cilium-clustermesh",
            "Secret cilium-clustermesh",
            "Secret cilium-kvstoremesh",
            "Secret cilium-kvstoremesh",
        ],
        "{yaml}"
    );
    assert!(
        yaml.contains("# context east") && yaml.contains("# context west"),
        "{yaml}"
    );
    for api in [&east, &west] {
        assert!(
            api.take_writes().is_empty(),
            "a connect dry run sent writes"
        );
        assert!(api.get("Secret", NS, "cilium-kvstoremesh").is_none());
        assert!(api
            .get("ConfigMap", NS, "clustermesh-remote-users")
            .is_none());
    }

    // connect, twice.
    let out = cli.ok(&[
        "connect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ]);
    assert!(out.contains("Connected cluster east <=> west"), "{out}");
    assert_eq!(writes(&east), connect_objects("created"));
    assert_eq!(writes(&west), connect_objects("created"));
    let out = cli.ok(&[
        "connect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ]);
    assert!(out.contains("0 changes"), "{out}");
    assert_eq!(writes(&east), connect_objects("unchanged"));
    assert_eq!(writes(&west), connect_objects("unchanged"));
    let kvs = east.get("Secret", NS, "cilium-kvstoremesh").unwrap();
    let west_cfg = String::from_utf8(b64(&kvs["data"]["west"])).unwrap();
    assert!(
        west_cfg.contains(&format!("https://west.mesh.cilium.io:{np_west}"))
            && west_cfg.contains(&format!("127.{block}.2.1")),
        "{west_cfg}"
    );

    // The kubelet brings the new Secrets and ConfigMaps into the pods.
    pods[0].project(&east);
    pods[1].project(&west);
    wait_for(
        "user remote-west in east's etcd",
        Duration::from_secs(20),
        || pods[0].etcd_users().contains(&"remote-west".to_string()),
    );

    // status --wait, through the pod proxy, with real apiservers behind it.
    let out = cli.ok(&[
        "status",
        "--context",
        "east",
        "--wait",
        "--wait-duration",
        "90s",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cluster"], "east");
    assert_eq!(v["apiserver"]["reachable"], true, "{v:#}");
    assert_eq!(v["connectivity"]["ready"], 1, "{v:#}");
    assert_eq!(v["clusters"]["west"]["ready"], true, "{v:#}");
    let summary = cli.ok(&[
        "status",
        "--context",
        "west",
        "--wait",
        "--wait-duration",
        "90s",
    ]);
    assert!(summary.contains("east: configured, ready"), "{summary}");

    // disconnect --dry-run names every delete and sends nothing; the objects stay.
    let out = cli.ok(&[
        "disconnect",
        "--context",
        "east",
        "--destination-context",
        "west",
        "--dry-run",
        "-o",
        "yaml",
    ]);
    for ctx in ["east", "west"] {
        for what in [
            "Secret kube-system/cilium-kvstoremesh",
            "Secret kube-system/cilium-clustermesh",
            "ConfigMap kube-system/clustermesh-remote-users",
        ] {
            assert!(
                out.contains(&format!("# delete {what} (context {ctx})")),
                "{out}"
            );
        }
    }
    for api in [&east, &west] {
        assert!(
            api.take_writes().is_empty(),
            "a disconnect dry run sent writes"
        );
        assert!(api.get("Secret", NS, "cilium-kvstoremesh").is_some());
    }

    // disconnect, twice: exactly what connect wrote goes.
    let out = cli.ok(&[
        "disconnect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ]);
    assert!(out.contains("Disconnected clusters east <x> west"), "{out}");
    assert_eq!(writes(&east), connect_objects("deleted"));
    assert_eq!(writes(&west), connect_objects("deleted"));
    let out = cli.ok(&[
        "disconnect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ]);
    assert!(out.contains("0 changes"), "{out}");
    assert!(writes(&east).is_empty() && writes(&west).is_empty());
    pods[0].project(&east);
    wait_for(
        "user remote-west removed from east's etcd",
        Duration::from_secs(20),
        || !pods[0].etcd_users().contains(&"remote-west".to_string()),
    );
    let out = cli.ok(&["status", "--context", "east", "-o", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["connectivity"]["total"], 0, "{v:#}");
}

/// Two clusters with different CAs: `connect` refuses them with the hint, and with
/// `--allow-mismatching-ca` does what Cilium's does — each side's etcd trusts both CAs (the
/// CA bundle ConfigMap `cilium-root-ca.crt`, mounted as its `ca.crt`, and a Deployment
/// rollout through the bundle's checksum annotation), each KVStoreMesh verifies the peer with
/// both CAs (`<peer>.etcd-client-ca.crt`) — and the two control planes then sync each other.
/// `disconnect` takes the peer's CA out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_mismatching_cas_trusts_both_and_syncs() {
    let east = KubeApi::start().await.unwrap();
    let west = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    KubeApi::write_kubeconfig_multi(&kubeconfig, &[(&east, "east"), (&west, "west")]).unwrap();
    let cli = Cli { kubeconfig };
    let block = 100 + ((std::process::id() + 37) % 100) as u8;
    east.apply(node("east-n1", &format!("127.{block}.1.1")))
        .unwrap();
    west.apply(node("west-n1", &format!("127.{block}.2.1")))
        .unwrap();
    for (ctx, id) in [("east", "1"), ("west", "2")] {
        let ca = dir.path().join(format!("ca-{ctx}")).display().to_string();
        let np = free_port().to_string();
        cli.ok(&[
            "enable",
            "--context",
            ctx,
            "--cluster-name",
            ctx,
            "--cluster-id",
            id,
            "--ca-dir",
            &ca,
            "--node-port",
            &np,
        ]);
    }
    let ca_of = |api: &KubeApi| {
        String::from_utf8(b64(
            &api.get("Secret", NS, "cilium-ca").unwrap()["data"]["ca.crt"]
        ))
        .unwrap()
    };
    let (ca_east, ca_west) = (ca_of(&east), ca_of(&west));
    assert_ne!(ca_east, ca_west);
    east.take_writes();
    west.take_writes();

    let connect = [
        "connect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ];
    let err = cli.fails(&connect);
    assert!(
        err.contains("use different CAs") && err.contains("--allow-mismatching-ca"),
        "{err}"
    );
    assert!(east.take_writes().is_empty() && west.take_writes().is_empty());

    let mut allow = connect.to_vec();
    allow.push("--allow-mismatching-ca");
    let out = cli.ok(&allow);
    assert!(out.contains("Connected cluster east <=> west"), "{out}");
    let mut want = connect_objects("created");
    want.push(format!("created ConfigMap {NS}/cilium-root-ca.crt"));
    want.push(format!("configured Deployment {NS}/clustermesh-apiserver"));
    want.sort();
    assert_eq!(writes(&east), want);
    assert_eq!(writes(&west), want);
    for (api, own, peer, peer_name) in [
        (&east, &ca_east, &ca_west, "west"),
        (&west, &ca_west, &ca_east, "east"),
    ] {
        // The etcd trusts both CAs, and restarts for it (the checksum of its bundle).
        let bundle = api.get("ConfigMap", NS, "cilium-root-ca.crt").unwrap();
        let bundle = bundle["data"]["ca.crt"].as_str().unwrap().to_string();
        assert!(
            bundle.contains(own.trim()) && bundle.contains(peer.trim()),
            "{bundle}"
        );
        let dep = api.get("Deployment", NS, "clustermesh-apiserver").unwrap();
        assert!(
            dep["spec"]["template"]["metadata"]["annotations"]["clustermesh.io/ca-bundle-sha256"]
                .is_string(),
            "{dep:#}"
        );
        // KVStoreMesh verifies the peer with both.
        let kvs = api.get("Secret", NS, "cilium-kvstoremesh").unwrap();
        let cfg = String::from_utf8(b64(&kvs["data"][peer_name])).unwrap();
        assert!(
            cfg.contains(&format!("{peer_name}.etcd-client-ca.crt")),
            "{cfg}"
        );
        let peer_bundle =
            String::from_utf8(b64(&kvs["data"][format!("{peer_name}.etcd-client-ca.crt")]))
                .unwrap();
        assert!(peer_bundle.contains(peer.trim()), "{peer_bundle}");
    }
    // Again: nothing changes.
    assert!(cli.ok(&allow).contains("0 changes"));
    for api in [&east, &west] {
        assert!(writes(api).iter().all(|w| w.starts_with("unchanged")));
    }
    // enable keeps the bundle (and with it the Deployment).
    assert!(cli
        .ok(&["enable", "--context", "east"])
        .contains("0 changes"));
    writes(&east);

    // The control planes, as the kubelet runs them after the rollout: they sync each other.
    let mut pods = Vec::new();
    for (api, name, i) in [(&east, "east", 1), (&west, "west", 2)] {
        let d = dir.path().join(format!("pod-{name}"));
        std::fs::create_dir_all(&d).unwrap();
        let mut p = Pod {
            dir: d,
            name: name.into(),
            node_ip: format!("127.{block}.{i}.1"),
            pod_ip: format!("127.{block}.{i}.2"),
            etcd_port: free_port(),
            etcd: None,
            apiserver: None,
        };
        p.project(api);
        p.start(api);
        pods.push(p);
    }
    for ctx in ["east", "west"] {
        let out = cli.ok(&[
            "status",
            "--context",
            ctx,
            "--wait",
            "--wait-duration",
            "90s",
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["connectivity"]["ready"], 1, "{v:#}");
    }

    // disconnect: the peer's CA leaves; with only its own CA left, the bundle goes.
    cli.ok(&[
        "disconnect",
        "--context",
        "east",
        "--destination-context",
        "west",
    ]);
    let mut want = connect_objects("deleted");
    want.push(format!("deleted ConfigMap {NS}/cilium-root-ca.crt"));
    want.push(format!("configured Deployment {NS}/clustermesh-apiserver"));
    want.sort();
    assert_eq!(writes(&east), want);
    assert_eq!(writes(&west), want);
    let dep = east.get("Deployment", NS, "clustermesh-apiserver").unwrap();
    assert!(
        dep["spec"]["template"]["metadata"]["annotations"]["clustermesh.io/ca-bundle-sha256"]
            .is_null(),
        "{dep:#}"
    );
    assert!(cli
        .ok(&[
            "disconnect",
            "--context",
            "east",
            "--destination-context",
            "west"
        ])
        .contains("0 changes"));
}

/// The failure is one line (`❌ …`), the last thing printed.
fn assert_one_error_line(err: &str) {
    let lines: Vec<&str> = err.trim().lines().collect();
    assert!(
        lines.last().is_some_and(|l| l.starts_with("❌"))
            && lines.iter().filter(|l| l.starts_with("❌")).count() == 1,
        "{err}"
    );
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_contexts_unreachable_servers_and_weak_rbac_are_one_clear_line() {
    let ok = KubeApi::start().await.unwrap();
    let down = KubeApi::start().await.unwrap();
    let weak = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    KubeApi::write_kubeconfig_multi(
        &kubeconfig,
        &[(&ok, "ok"), (&down, "down"), (&weak, "weak")],
    )
    .unwrap();
    let cli = Cli { kubeconfig };
    let enable = |ctx: &str| {
        vec![
            "enable".to_string(),
            "--context".into(),
            ctx.into(),
            "--cluster-name".into(),
            "c1".into(),
            "--cluster-id".into(),
            "1".into(),
        ]
    };

    let err = cli.fails(&strs(&enable("nope")));
    assert!(
        err.contains("has no context \"nope\"") && err.contains("ok, down, weak"),
        "{err}"
    );
    assert_one_error_line(&err);

    down.set_outage(Some(Outage::Refuse));
    let err = cli.fails(&strs(&enable("down")));
    assert!(
        err.contains("context down: cannot reach the Kubernetes API server at https://127.0.0.1:"),
        "{err}"
    );
    assert_one_error_line(&err);

    // RBAC that may read but not write Secrets: refused before anything is written.
    weak.forbid_verbs("", "secrets", &["create", "patch"]);
    let err = cli.fails(&strs(&enable("weak")));
    assert!(
        err.contains("context weak: not allowed to")
            && err.contains("Secret kube-system/cilium-ca")
            && err.contains("secrets in namespace kube-system"),
        "{err}"
    );
    assert_one_error_line(&err);
    let all = weak.writes();
    assert!(
        all.iter().all(|w| w.dry_run),
        "something was written for real: {all:?}"
    );
    assert_eq!(weak.count("ConfigMap") + weak.count("Deployment"), 0);

    // connect refuses equal names; nothing is written.
    let c2 = KubeApi::start().await.unwrap();
    let kubeconfig2 = dir.path().join("kubeconfig2");
    let big = KubeApi::start().await.unwrap();
    KubeApi::write_kubeconfig_multi(&kubeconfig2, &[(&ok, "ok"), (&c2, "c2"), (&big, "big")])
        .unwrap();
    let cli2 = Cli {
        kubeconfig: kubeconfig2,
    };
    let ca = dir.path().join("ca").display().to_string();
    for ctx in ["ok", "c2"] {
        cli2.ok(&[
            "enable",
            "--context",
            ctx,
            "--cluster-name",
            "same",
            "--cluster-id",
            if ctx == "ok" { "1" } else { "2" },
            "--ca-dir",
            &ca,
        ]);
    }
    ok.take_writes();
    c2.take_writes();
    let err = cli2.fails(&["connect", "--context", "ok", "--destination-context", "c2"]);
    assert!(err.contains("both clusters are named \"same\""), "{err}");
    assert!(ok.take_writes().is_empty() && c2.take_writes().is_empty());

    // 511 clusters: ID 512 is refused, 300 accepted; a 255 and a 511 cluster are not
    // connected, not even in a dry run, and the error says what to do.
    let big_enable = |id: &str| {
        vec![
            "enable".to_string(),
            "--context".into(),
            "big".into(),
            "--cluster-name".into(),
            "big".into(),
            "--cluster-id".into(),
            id.into(),
            "--max-connected-clusters".into(),
            "511".into(),
            "--ca-dir".into(),
            ca.clone(),
        ]
    };
    let err = cli2.fails(&strs(&big_enable("512")));
    assert!(err.contains("between 1 and 511"), "{err}");
    assert_one_error_line(&err);
    cli2.ok(&strs(&big_enable("300")));
    big.take_writes();
    for dry in [true, false] {
        let mut args = vec!["connect", "--context", "ok", "--destination-context", "big"];
        if dry {
            args.push("--dry-run");
        }
        let err = cli2.fails(&args);
        assert!(
            err.contains("max-connected-clusters differs (same has 255, big has 511)")
                && err.contains("re-enable one of them"),
            "{err}"
        );
        assert_one_error_line(&err);
    }
    assert!(ok.take_writes().is_empty() && big.take_writes().is_empty());
}

/// The agent DaemonSet's init step, `clustermesh cni install`, against the test API server:
/// it reads the Node's pod CIDR, installs the plugin (which then answers VERSION) and has it
/// write the network configuration; a node without a pod CIDR, a missing node and RBAC that
/// may not get nodes are each one line, with nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cni_install_writes_the_plugin_and_the_nodes_network_config() {
    use std::os::unix::fs::PermissionsExt as _;
    let api = KubeApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    KubeApi::write_kubeconfig_multi(&kubeconfig, &[(&api, "c1")]).unwrap();
    let cli = Cli { kubeconfig };
    let mut n1 = node("n1", "127.0.0.1");
    n1["spec"] = json!({"podCIDR": "10.244.3.0/24", "podCIDRs": ["10.244.3.0/24", "fd00:3::/64"]});
    api.apply(n1).unwrap();
    api.apply(node("n2", "127.0.0.2")).unwrap();
    let bin = dir.path().join("opt/cni/bin");
    let state = dir.path().join("run/clustermesh");
    let conf = |n: &str| {
        dir.path()
            .join(format!("etc/cni/net.d/{n}/10-clustermesh.conf"))
    };
    let install = |n: &str| -> Vec<String> {
        [
            "cni",
            "install",
            "--context",
            "c1",
            "--node",
            n,
            "--state-dir",
            &state.display().to_string(),
            "--out",
            &conf(n).display().to_string(),
            "--bin-dir",
            &bin.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };

    let out = cli.ok(&strs(&install("n1")));
    assert!(out.contains("pod CIDR 10.244.3.0/24"), "{out}");
    let c: Value = serde_json::from_str(&std::fs::read_to_string(conf("n1")).unwrap()).unwrap();
    assert_eq!(c["type"], "clustermesh-cni", "{c}");
    assert_eq!(c["podCIDR"], "10.244.3.0/24", "{c}");
    assert_eq!(c["stateDir"], state.display().to_string(), "{c}");
    // The pods' MTU: n1's InternalIP is held by `lo` here, so lo's MTU less VXLAN over IPv4.
    let lo: u64 = std::fs::read_to_string("/sys/class/net/lo/mtu")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(c["mtu"], lo - 50, "{c}\n{out}");
    assert!(out.contains("lo holds 127.0.0.1"), "{out}");
    // A node address no interface holds: 1500 assumed, less 50; `--mtu` wins over both.
    let mut n3 = node("n3", "192.0.2.1");
    n3["spec"] = json!({"podCIDR": "10.244.4.0/24"});
    api.apply(n3).unwrap();
    let out = cli.ok(&strs(&install("n3")));
    let c: Value = serde_json::from_str(&std::fs::read_to_string(conf("n3")).unwrap()).unwrap();
    assert_eq!(c["mtu"], 1450, "{c}\n{out}");
    assert!(out.contains("no interface holds 192.0.2.1"), "{out}");
    let mut args = install("n3");
    args.extend(["--mtu".to_string(), "1400".to_string()]);
    cli.ok(&strs(&args));
    let c: Value = serde_json::from_str(&std::fs::read_to_string(conf("n3")).unwrap()).unwrap();
    assert_eq!(c["mtu"], 1400, "{c}");
    let plugin = bin.join("clustermesh-cni");
    let mode = std::fs::metadata(&plugin).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o755, "{}", plugin.display());
    let v = Command::new(&plugin)
        .env("CNI_COMMAND", "VERSION")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&v.stdout).unwrap();
    assert!(
        v["supportedVersions"]
            .as_array()
            .is_some_and(|a| !a.is_empty()),
        "{v}"
    );
    // A restarted pod runs it again: the same file.
    let first = std::fs::read_to_string(conf("n1")).unwrap();
    cli.ok(&strs(&install("n1")));
    assert_eq!(std::fs::read_to_string(conf("n1")).unwrap(), first);

    let err = cli.fails(&strs(&install("n2")));
    assert!(
        err.contains("node \"n2\" has no IPv4 spec.podCIDR")
            && err.contains("--allocate-node-cidrs"),
        "{err}"
    );
    assert_one_error_line(&err);
    assert!(!conf("n2").exists());

    let err = cli.fails(&strs(&install("n9")));
    assert!(err.contains("node \"n9\" does not exist"), "{err}");
    assert_one_error_line(&err);

    api.forbid_verbs("", "nodes", &["get"]);
    let err = cli.fails(&strs(&install("n1")));
    assert!(
        err.contains("context c1: not allowed to get") && err.contains("nodes"),
        "{err}"
    );
    assert_one_error_line(&err);
}
