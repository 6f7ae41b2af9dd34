//! End-to-end checks of clustermesh-apiserver against a real etcd over mTLS (issue 2's
//! acceptance list): Cilium's layout as read by Debian's etcdctl with the remote
//! certificate, RBAC, propagation of manifest edits, restarts without rewrites, etcd outages,
//! and broken manifests.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clustermesh_tests::etcd::TestEtcd;
use clustermesh_tests::fixtures::{self, Shape};
use clustermesh_tests::process::{find_binary, free_port, TestApiserver};
use etcd_client::{EventType, GetOptions, WatchOptions};

fn small_cluster() -> String {
    fixtures::cluster(Shape {
        cluster_id: 1,
        nodes: 2,
        pods: 4,
        services: 2,
    })
}

/// Runs Debian's etcdctl with the given certificate stem from `certs`.
fn etcdctl(endpoint: &str, certs: &Path, stem: Option<&str>, args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoint)
        .arg("--dial-timeout=2s")
        .arg("--command-timeout=3s")
        .arg("--cacert")
        .arg(certs.join("ca.crt"));
    if let Some(stem) = stem {
        cmd.arg("--cert").arg(certs.join(format!("{stem}.crt")));
        cmd.arg("--key").arg(certs.join(format!("{stem}.key")));
    }
    let out = cmd
        .args(args)
        .output()
        .expect("etcdctl is installed (scripts/install-deps.sh)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Parses `etcdctl get` output (key line, value line) into pairs.
fn pairs(text: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = text.lines().collect();
    lines
        .chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].to_string(), c[1].to_string()))
        .collect()
}

/// `clustermesh enable` for cluster c1 on free loopback ports, the small cluster's manifests,
/// and its apiserver (embedded etcd) started and ready. Returns (tempdir, state dir, etcd
/// port, apiserver).
fn enabled_cluster() -> (tempfile::TempDir, std::path::PathBuf, u16, TestApiserver) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("c1");
    let (port, peer, health) = (free_port(), free_port(), free_port());
    let out = Command::new(find_binary("clustermesh").unwrap())
        .args(["enable", "--cluster-name", "c1", "--cluster-id", "1"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--ca-dir")
        .arg(dir.path().join("ca"))
        .arg("--etcd-listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--etcd-peer-port")
        .arg(peer.to_string())
        .arg("--health-addr")
        .arg(format!("127.0.0.1:{health}"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(state.join("manifests/c1.yaml"), small_cluster()).unwrap();
    let config = state.join("apiserver.yaml");
    // At the address in apiserver.yaml, which `clustermesh status` reads.
    let mut api = TestApiserver::start_at(
        &["--config", config.to_str().unwrap()],
        std::net::SocketAddr::from(([127, 0, 0, 1], health)),
        &dir.path().join("api.log"),
    )
    .unwrap();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    (dir, state, port, api)
}

#[test]
fn embedded_etcd_serves_cilium_layout_with_rbac() {
    let (dir, state, port, mut api) = enabled_cluster();

    let certs = state.join("certs");
    let ep = format!("https://127.0.0.1:{port}");
    // Key files are private.
    use std::os::unix::fs::PermissionsExt;
    for k in [
        "remote.key",
        "admin-c1.key",
        "local-c1.key",
        "server.key",
        "root.key",
    ] {
        let mode = std::fs::metadata(certs.join(k))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{k} has mode {mode:o}");
    }

    // The remote certificate reads cilium/state/ in Cilium's layout.
    let (ok, text) = etcdctl(
        &ep,
        &certs,
        Some("remote"),
        &["get", "--prefix", "cilium/state/"],
    );
    assert!(ok, "{text}");
    let kv = pairs(&text);
    let keys: Vec<&str> = kv.iter().map(|(k, _)| k.as_str()).collect();
    assert!(keys.contains(&"cilium/state/nodes/v1/c1/node0"), "{keys:?}");
    assert!(
        keys.contains(&"cilium/state/ip/v1/default/10.1.0.1"),
        "{keys:?}"
    );
    assert!(
        keys.contains(&"cilium/state/services/v1/c1/default/svc0"),
        "{keys:?}"
    );
    assert!(
        !keys.contains(&"cilium/state/services/v1/c1/default/svc1"),
        "svc1 is not global: {keys:?}"
    );
    let ident: Vec<&(String, String)> = kv
        .iter()
        .filter(|(k, _)| k.starts_with("cilium/state/identities/v1/id/"))
        .collect();
    assert_eq!(ident.len(), 2, "two label sets → two identities: {ident:?}");
    for (k, v) in &ident {
        let id: u32 = k.rsplit('/').next().unwrap().parse().unwrap();
        assert!(
            (65536..=131071).contains(&id),
            "identity {id} outside cluster 1's range"
        );
        assert!(v.contains("k8s:io.cilium.k8s.policy.cluster=c1;"), "{v}");
        assert!(v.ends_with(';'), "{v}");
    }
    let node = &kv
        .iter()
        .find(|(k, _)| k == "cilium/state/nodes/v1/c1/node0")
        .unwrap()
        .1;
    assert!(node.starts_with(r#"{"Name":"node0","Cluster":"c1","IPAddresses":[{"Type":"InternalIP","IP":"198.18.1.0"}],"IPv4AllocCIDR":{"IP":"10.1.0.0","Mask":"////8A=="}"#), "{node}");
    let ip = &kv
        .iter()
        .find(|(k, _)| k == "cilium/state/ip/v1/default/10.1.0.1")
        .unwrap()
        .1;
    assert!(
        ip.starts_with(r#"{"IP":"10.1.0.1","HostIP":"198.18.1.0","ID":"#),
        "{ip}"
    );
    let (ok, text) = etcdctl(
        &ep,
        &certs,
        Some("remote"),
        &["get", "cilium/cluster-config/c1"],
    );
    assert!(ok, "{text}");
    assert!(text.contains(r#"{"id":1,"capabilities":{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#), "{text}");
    let (ok, text) = etcdctl(
        &ep,
        &certs,
        Some("remote"),
        &["get", "--prefix", "cilium/synced/c1/", "--keys-only"],
    );
    assert!(
        ok && text.contains("cilium/synced/c1/cilium/state/ip/v1"),
        "{text}"
    );
    let (ok, text) = etcdctl(&ep, &certs, Some("remote"), &["get", "cilium/.heartbeat"]);
    assert!(ok && text.contains("cilium/.heartbeat"), "{text}");

    // The remote certificate can write nothing and cannot read clustermesh/local/.
    for args in [
        vec!["put", "cilium/state/nodes/v1/c1/evil", "x"],
        vec!["put", "cilium/.heartbeat", "x"],
        vec!["del", "cilium/state/ip/v1/default/10.1.0.1"],
        vec!["get", "--prefix", "clustermesh/local/"],
        vec!["get", "--prefix", "cilium/cache/"],
    ] {
        let (ok, text) = etcdctl(&ep, &certs, Some("remote"), &args);
        assert!(
            !ok && text.contains("permission denied"),
            "{args:?} must be denied: {text}"
        );
    }
    // The local agents' certificate reads clustermesh/local/ but cannot write.
    let (ok, text) = etcdctl(
        &ep,
        &certs,
        Some("local-c1"),
        &[
            "get",
            "--prefix",
            "clustermesh/local/v1/services/",
            "--keys-only",
        ],
    );
    assert!(
        ok && text.contains("clustermesh/local/v1/services/default/svc1"),
        "{text}"
    );
    let (ok, text) = etcdctl(
        &ep,
        &certs,
        Some("local-c1"),
        &["put", "clustermesh/local/v1/x", "y"],
    );
    assert!(!ok && text.contains("permission denied"), "{text}");

    // No certificate: refused.
    let (ok, text) = etcdctl(&ep, &certs, None, &["get", "cilium/.heartbeat"]);
    assert!(
        !ok,
        "a client without a certificate must be refused: {text}"
    );
    // A certificate from another CA: refused.
    let other = dir.path().join("other");
    let other_ca = clustermesh_certs::Ca::generate("Other CA").unwrap();
    other_ca
        .issue_client("remote", 30)
        .unwrap()
        .write(&other, "remote")
        .unwrap();
    std::fs::copy(certs.join("ca.crt"), other.join("ca.crt")).unwrap();
    let (ok, text) = etcdctl(&ep, &other, Some("remote"), &["get", "cilium/.heartbeat"]);
    assert!(!ok, "a certificate from another CA must be refused: {text}");

    api.stop().unwrap();
}

/// A TestEtcd plus an apiserver on it with the small cluster.
fn apiserver_on(etcd: &TestEtcd, dir: &Path, manifests: &str) -> TestApiserver {
    apiserver_with_ttl(etcd, dir, manifests, "60s")
}

fn apiserver_with_ttl(etcd: &TestEtcd, dir: &Path, manifests: &str, ttl: &str) -> TestApiserver {
    let cfg = dir.join("etcd.yaml");
    etcd.write_client_config("admin-c1", &cfg).unwrap();
    let m = dir.join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("cluster.yaml"), manifests).unwrap();
    let state = dir.join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut api = TestApiserver::start(
        &[
            "--cluster-name",
            "c1",
            "--cluster-id",
            "1",
            "--etcd-config",
            cfg.to_str().unwrap(),
            "--manifests",
            m.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "--kvstore-lease-ttl",
            ttl,
        ],
        &dir.join("api.log"),
    )
    .unwrap();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    api
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_edit_reaches_etcd_within_a_second() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let _api = apiserver_on(&etcd, dir.path(), &small_cluster());
    let mut client = etcd.client("root").await.unwrap();
    let key = "cilium/state/ip/v1/default/10.1.0.200";
    let mut samples = Vec::new();
    for round in 0..5 {
        // Move pod0 to a new IP and back; measure each edit → key change.
        let ip = if round % 2 == 0 {
            "10.1.0.200"
        } else {
            "10.1.0.1"
        };
        let text = small_cluster().replace("podIP: 10.1.0.1\n", &format!("podIP: {ip}\n"));
        let tmp = dir.path().join("manifests/.cluster.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        let t = Instant::now();
        std::fs::rename(&tmp, dir.path().join("manifests/cluster.yaml")).unwrap();
        loop {
            let present = !client.get(key, None).await.unwrap().kvs().is_empty();
            if present == (round % 2 == 0) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "edit not applied after 5 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        samples.push(t.elapsed());
    }
    samples.sort();
    let worst = *samples.last().unwrap();
    println!(
        "manifest edit → etcd key: median {:?}, worst {:?} (5 edits)",
        samples[2], worst
    );
    assert!(worst < Duration::from_secs(1), "edit took {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_unchanged_manifests_writes_nothing() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut api = apiserver_on(&etcd, dir.path(), &small_cluster());
    let mut client = etcd.client("root").await.unwrap();
    let before = client
        .get("cilium/state/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    let rev = before.header().unwrap().revision();
    let n_before = before.kvs().len();
    assert!(n_before > 8, "expected the cluster's keys, got {n_before}");
    let mut stream = client
        .watch(
            "cilium/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .unwrap();

    api.restart().unwrap();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    // Give a slow rewrite time to show up.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut state_events = Vec::new();
    let mut other = 0;
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        for ev in resp.events() {
            let key = ev
                .kv()
                .map(|kv| String::from_utf8_lossy(kv.key()).into_owned())
                .unwrap_or_default();
            if key.starts_with("cilium/state/") {
                state_events.push(format!("{:?} {key}", ev.event_type()));
            } else {
                other += 1;
            }
        }
    }
    println!("events after restart: {} under cilium/state/, {other} elsewhere (heartbeat, cluster config)", state_events.len());
    assert!(
        state_events.is_empty(),
        "restart rewrote keys: {state_events:?}"
    );
    let after = client
        .get("cilium/state/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    assert_eq!(after.kvs().len(), n_before);
    let _ = EventType::Put;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_turns_readyz_false_and_loses_nothing() {
    let mut etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut api = apiserver_on(&etcd, dir.path(), &small_cluster());
    assert!(api.ready());

    etcd.kill();
    let t = Instant::now();
    while api.ready() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "readyz still true 10 s after etcd died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("readyz false {:?} after etcd died", t.elapsed());
    // Change the source while etcd is down.
    let more = small_cluster().replace("podIP: 10.1.0.1\n", "podIP: 10.1.0.99\n");
    std::fs::write(dir.path().join("manifests/cluster.yaml"), more).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let status = api.status().unwrap();
    assert_eq!(status["etcd-connected"], false, "{status}");
    assert!(status["last-etcd-error"].as_str().is_some(), "{status}");

    etcd.restart().unwrap();
    let waited = api.wait_ready(Duration::from_secs(30)).unwrap();
    println!("ready again {waited:?} after etcd came back");
    let mut client = etcd.client("root").await.unwrap();
    let got = client
        .get("cilium/state/ip/v1/default/10.1.0.99", None)
        .await
        .unwrap();
    assert_eq!(
        got.kvs().len(),
        1,
        "the edit made during the outage was lost"
    );
    let gone = client
        .get("cilium/state/ip/v1/default/10.1.0.1", None)
        .await
        .unwrap();
    assert!(gone.kvs().is_empty(), "the stale IP survived");
    api.stop().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_manifest_is_reported_and_the_rest_served() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let api = apiserver_on(&etcd, dir.path(), &small_cluster());
    let bad = dir.path().join("manifests/broken.yaml");
    std::fs::write(&bad, "kind: Pod\nmetadata:\n  name: p\n  labels: [oops\n").unwrap();
    // The good manifest also changes: that change must still land.
    std::fs::write(
        dir.path().join("manifests/cluster.yaml"),
        small_cluster().replace("podIP: 10.1.0.2\n", "podIP: 10.1.0.77\n"),
    )
    .unwrap();
    let mut client = etcd.client("root").await.unwrap();
    let t = Instant::now();
    loop {
        let st = api.status().unwrap();
        let errs = st["manifest-errors"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let has_new = !client
            .get("cilium/state/ip/v1/default/10.1.0.77", None)
            .await
            .unwrap()
            .kvs()
            .is_empty();
        if !errs.is_empty() && has_new {
            let e = errs[0].as_str().unwrap();
            assert!(
                e.contains("broken.yaml:"),
                "error must name the file and line: {e}"
            );
            println!("reported: {e}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5), "status: {st}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(api
        .metrics()
        .unwrap()
        .contains("cilium_clustermesh_apiserver_manifest_errors 1"));
    assert!(
        api.ready(),
        "a broken manifest must not make the apiserver unready"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_leases_are_detected_and_their_keys_rewritten() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // 25 s is the shortest TTL Cilium allows; the keep-alive runs every TTL/3.
    let api = apiserver_with_ttl(&etcd, dir.path(), &small_cluster(), "25s");
    let mut client = etcd.client("root").await.unwrap();
    let key = "cilium/state/ip/v1/default/10.1.0.1";
    let kv = client.get(key, None).await.unwrap();
    let lease = kv.kvs()[0].lease();
    assert_ne!(lease, 0, "every key must carry a lease");
    // Someone revokes the lease: etcd deletes every key attached to it.
    client.lease_revoke(lease).await.unwrap();
    assert!(client.get(key, None).await.unwrap().kvs().is_empty());
    let t = Instant::now();
    loop {
        let got = client.get(key, None).await.unwrap();
        if let Some(kv) = got.kvs().first() {
            assert_ne!(kv.lease(), lease, "re-written on a new lease");
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "keys of the lost lease were not re-written:\n{}",
            api.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("keys of a revoked lease re-written after {:?}", t.elapsed());
    let m = api.metrics().unwrap();
    assert!(
        m.contains("cilium_clustermesh_apiserver_kvstore_leases_lost_total"),
        "{m}"
    );
}

#[test]
fn embedded_etcd_is_restarted_when_it_dies() {
    let (_dir, state, port, mut api) = enabled_cluster();
    // Find the etcd child and kill it.
    // etcd is a child of one of the apiserver's threads.
    let pid = api.pid().unwrap();
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        children
            .push_str(&std::fs::read_to_string(task.path().join("children")).unwrap_or_default());
        children.push(' ');
    }
    let etcd_pid: i32 = children
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .find(|p: &i32| {
            std::fs::read_to_string(format!("/proc/{p}/comm"))
                .map(|c| c.trim() == "etcd")
                .unwrap_or(false)
        })
        .expect("the apiserver runs etcd as its child");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(etcd_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let t = Instant::now();
    let etcd_children = |pid: u32| -> Vec<i32> {
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            for c in std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
            {
                if let Ok(p) = c.parse::<i32>() {
                    if std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .map(|c| c.trim() == "etcd")
                        .unwrap_or(false)
                    {
                        out.push(p);
                    }
                }
            }
        }
        out
    };
    loop {
        let now: Vec<i32> = etcd_children(pid)
            .into_iter()
            .filter(|p| *p != etcd_pid)
            .collect();
        if !now.is_empty() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "etcd was not restarted:\n{}",
            api.log_tail(20)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let restarted = t.elapsed();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    println!(
        "etcd killed; restarted after {restarted:?}, apiserver ready after {:?}",
        t.elapsed()
    );
    let certs = state.join("certs");
    let (ok, text) = etcdctl(
        &format!("https://127.0.0.1:{port}"),
        &certs,
        Some("remote"),
        &["get", "--prefix", "cilium/state/ip/", "--keys-only"],
    );
    assert!(
        ok && text.contains("cilium/state/ip/v1/default/10.1.0.1"),
        "{text}"
    );
    api.stop().unwrap();
}

/// Lines the apiserver logged after byte `from` of its log.
fn log_since(api: &TestApiserver, from: u64) -> String {
    let text = std::fs::read(&api.log).unwrap_or_default();
    String::from_utf8_lossy(text.get(from as usize..).unwrap_or_default()).into_owned()
}

fn log_len(api: &TestApiserver) -> u64 {
    std::fs::metadata(&api.log).map(|m| m.len()).unwrap_or(0)
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|st| st != "Z" && st != "X")
    })
}

#[test]
fn a_killed_apiserver_takes_its_etcd_along_and_restarts_cleanly() {
    let (_dir, state, _port, mut api) = enabled_cluster();
    let data = state.join("etcd");
    let etcd = clustermesh_apiserver::etcd::serving(&data);
    assert_eq!(etcd.len(), 1, "one etcd serves the data dir");
    api.kill().unwrap();
    let t = Instant::now();
    while alive(etcd[0]) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the embedded etcd outlived its SIGKILLed apiserver (orphan)"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "etcd {} exited {:?} after its apiserver was killed",
        etcd[0],
        t.elapsed()
    );
    let from = log_len(&api);
    api.restart().unwrap();
    let ready = api.wait_ready(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log = log_since(&api, from);
    println!("restarted apiserver ready after {ready:?}");
    assert_eq!(clustermesh_apiserver::etcd::serving(&data).len(), 1);
    // The loop showed as etcd exiting again and again; how long readiness took is the
    // benchmarks' business (this test once failed a 5 s bound on a loaded machine).
    assert!(
        !log.contains("embedded etcd exited"),
        "restart loop:\n{log}"
    );
    api.stop().unwrap();
}

/// The issue's loop: an etcd left serving the data dir (an apiserver from before the
/// parent-death signal, or one started by hand) made every restarted apiserver start a
/// second etcd that exited at once, every 200 ms, forever. Now the leftover is stopped first.
#[test]
fn a_leftover_etcd_is_stopped_not_looped_on() {
    let (dir, state, _port, mut api) = enabled_cluster();
    let data = state.join("etcd");
    let etcd = clustermesh_apiserver::etcd::serving(&data);
    assert_eq!(etcd.len(), 1);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", etcd[0])).unwrap();
    let argv: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    api.stop().unwrap();
    // The leftover: the same etcd, started without the apiserver (and without setpriv).
    let log = std::fs::File::create(dir.path().join("leftover-etcd.log")).unwrap();
    let mut leftover = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let t = Instant::now();
    while clustermesh_apiserver::etcd::serving(&data) != [leftover.id()] {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "leftover etcd not up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let from = log_len(&api);
    api.restart().unwrap();
    let ready = api.wait_ready(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let log = log_since(&api, from);
    println!("apiserver with a leftover etcd ready after {ready:?}");
    assert!(
        log.contains("an etcd left by an earlier apiserver still serves our data dir"),
        "no log line says what happened to the leftover:\n{log}"
    );
    assert!(
        leftover.try_wait().unwrap().is_some(),
        "the leftover etcd still runs"
    );
    let serving = clustermesh_apiserver::etcd::serving(&data);
    assert_eq!(serving.len(), 1, "{serving:?}");
    assert_ne!(serving[0], leftover.id());
    assert!(
        log.matches("embedded etcd exited").count() == 0,
        "restart loop:\n{log}"
    );
    api.stop().unwrap();
}

/// A certificate in use that expires within 30 days is named in `/status`, in the metrics and
/// in `clustermesh status`, as soon as the file is rotated (no restart).
#[test]
fn certificates_expiring_within_30_days_are_named_in_status_and_metrics() {
    let (dir, state, _port, mut api) = enabled_cluster();
    let server = state.join("certs").join("server.crt");
    let file = server.display().to_string();
    let status = api.status().unwrap();
    let listed = status["certificates"]["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["file"] == file.as_str() && c["role"] == "server");
    assert!(listed, "server.crt not listed: {}", status["certificates"]);
    let warned = |v: &serde_json::Value| {
        v["certificates"]["warnings"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|w| w.as_str())
            .filter(|w| w.contains(&file))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert!(warned(&status).is_empty(), "{}", status["certificates"]);

    let out = Command::new(find_binary("clustermesh").unwrap())
        .args(["certs", "rotate", "--validity-days", "10", "--ca-dir"])
        .arg(dir.path().join("ca"))
        .arg("--dir")
        .arg(state.join("certs"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = api.status().unwrap();
    let w = warned(&status);
    println!("after rotating to 10 days: {w:?}");
    assert_eq!(w.len(), 1, "{}", status["certificates"]);
    assert!(
        w[0].contains("expires at") && w[0].contains("days)"),
        "{}",
        w[0]
    );
    let metrics = api.metrics().unwrap();
    let expiring = metrics
        .lines()
        .find_map(|l| l.strip_prefix("clustermesh_tls_certificates_expiring "))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .unwrap_or(0);
    assert!(expiring >= 1, "{metrics}");
    assert!(
        metrics.contains("clustermesh_tls_certificate_expiry_timestamp_seconds{")
            && metrics.contains(&file),
        "{metrics}"
    );
    let out = Command::new(find_binary("clustermesh").unwrap())
        .args(["status", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        text.contains("certificate warnings") && text.contains(&file),
        "clustermesh status does not warn: {text}"
    );
    api.stop().unwrap();
}

async fn present(client: &mut etcd_client::Client, key: &str) -> bool {
    !client.get(key, None).await.unwrap().kvs().is_empty()
}

/// Issue 16's CIDR rule on the export side: with `--cluster-cidr` (IPv4 and IPv6), a pod
/// address or a node pod CIDR outside them is not written, is named in `/status` and
/// counted, and everything else is exported; an edit that moves the pod inside exports it
/// (the incremental path applies the same rule).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn addresses_outside_the_cluster_cidrs_are_not_exported() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("etcd.yaml");
    etcd.write_client_config("admin-c1", &cfg).unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    let pod = |name: &str, ips: [&str; 2]| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels:\n    app: extra\nspec:\n  nodeName: node0\n  containers:\n  - name: c\nstatus:\n  phase: Running\n  hostIP: 198.18.1.0\n  podIPs:\n  - ip: {}\n  - ip: \"{}\"\n",
            ips[0], ips[1]
        )
    };
    let node = "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: stray-node\nspec:\n  podCIDRs: [10.9.0.0/24, \"fd00:1::/112\"]\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 198.18.1.9\n";
    let manifests = |stray: [&str; 2]| {
        format!(
            "{}{}{}{node}",
            small_cluster(),
            pod("dual", ["10.1.0.100", "fd00:1::100"]),
            pod("stray", stray)
        )
    };
    std::fs::write(m.join("cluster.yaml"), manifests(["10.9.0.5", "fd00:9::5"])).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let mut api = TestApiserver::start(
        &[
            "--cluster-name=c1",
            "--cluster-id=1",
            &format!("--etcd-config={}", cfg.display()),
            &format!("--manifests={}", m.display()),
            &format!("--state-dir={}", state.display()),
            "--cluster-cidr=10.1.0.0/16",
            "--cluster-cidr=fd00:1::/64",
        ],
        &dir.path().join("api.log"),
    )
    .unwrap();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    let mut client = etcd.client("root").await.unwrap();
    let ip = "cilium/state/ip/v1/default/";
    for inside in ["10.1.0.1", "10.1.0.100", "fd00:1::100"] {
        assert!(
            present(&mut client, &format!("{ip}{inside}")).await,
            "{inside} exported"
        );
    }
    for outside in ["10.9.0.5", "fd00:9::5"] {
        assert!(
            !present(&mut client, &format!("{ip}{outside}")).await,
            "{outside} left out"
        );
    }
    let node = client
        .get("cilium/state/nodes/v1/c1/stray-node", None)
        .await
        .unwrap();
    let node: serde_json::Value = serde_json::from_slice(node.kvs()[0].value()).unwrap();
    assert_eq!(node["IPv4AllocCIDR"], serde_json::Value::Null, "{node}");
    assert_eq!(node["IPv6AllocCIDR"]["IP"], "fd00:1::", "{node}");
    let st = api.status().unwrap();
    let problems: Vec<String> = st["export-problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let named = |object: &str, what: &str| {
        problems
            .iter()
            .any(|p| p.starts_with(object) && p.contains(what) && p.contains("--cluster-cidr"))
    };
    assert!(
        named("Pod/default/stray", "10.9.0.5")
            && named("Pod/default/stray", "fd00:9::5")
            && named("Node/stray-node", "10.9.0.0/24"),
        "{problems:?}"
    );
    assert!(api
        .metrics()
        .unwrap()
        .contains("cilium_clustermesh_apiserver_export_outside_cluster_cidrs 3"));

    // The pod moves inside: the incremental pass exports it and forgets its refusals.
    std::fs::write(m.join("cluster.yaml"), manifests(["10.1.0.5", "fd00:1::5"])).unwrap();
    let t = Instant::now();
    while !(present(&mut client, &format!("{ip}10.1.0.5")).await
        && present(&mut client, &format!("{ip}fd00:1::5")).await)
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            api.status().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t = Instant::now();
    while !api
        .metrics()
        .unwrap()
        .contains("cilium_clustermesh_apiserver_export_outside_cluster_cidrs 1")
    {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{}",
            api.status().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    api.stop().unwrap();
}
