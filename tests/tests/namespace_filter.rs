//! Namespace filtering on every exported kind, as a remote cluster would notice it: with
//! `--clustermesh-default-global-namespace=false`, a namespace without the
//! `clustermesh.cilium.io/global: "true"` annotation leaks nothing into etcd; annotating it
//! puts exactly its keys (one per kind) and touches no other key; removing the annotation
//! deletes exactly those keys again. Checked with an etcd watch over the transitions, so a
//! rewrite of an unaffected key would show up. The per-kind scenario files
//! (`tests/scenarios/namespace-filter-*.txtar`) check the values.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use clustermesh_tests::etcd::TestEtcd;
use clustermesh_tests::process::TestApiserver;
use etcd_client::{Client, EventType, GetOptions, WatchOptions, WatchStream};

const CRD: &str = "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata:\n  name: serviceexports.multicluster.x-k8s.io\n";

fn namespace(name: &str, global: bool) -> String {
    let ann = if global {
        "\n  annotations:\n    clustermesh.cilium.io/global: \"true\""
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{ann}\n")
}

/// One object of every exported kind in namespace `ns`; `n` keeps addresses and IDs apart.
fn objects(ns: &str, n: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: web
  namespace: {ns}
  labels:
    app: web
spec:
  nodeName: n1
status:
  phase: Running
  podIP: 10.1.{n}.10
---
apiVersion: cilium.io/v2
kind: CiliumEndpoint
metadata:
  name: db
  namespace: {ns}
status:
  identity:
    id: {id}
  networking:
    addressing:
    - ipv4: 10.1.{n}.20
    node: 192.0.2.1
---
apiVersion: cilium.io/v2
kind: CiliumIdentity
metadata:
  name: "{id}"
security-labels:
  k8s:app: db
  k8s:io.cilium.k8s.policy.cluster: c1
  k8s:io.kubernetes.pod.namespace: {ns}
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: {ns}
  annotations:
    service.cilium.io/global: "true"
spec:
  clusterIP: 10.96.{n}.1
  ports:
  - name: http
    port: 80
    targetPort: 8080
  selector:
    app: echo
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-{n}
  namespace: {ns}
  labels:
    kubernetes.io/service-name: echo
addressType: IPv4
endpoints:
- addresses:
  - 10.1.{n}.30
ports:
- name: http
  port: 8080
  protocol: TCP
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata:
  name: echo
  namespace: {ns}
"#,
        id = 70000 + n
    )
}

/// key → (mod revision, value) of everything under `cilium/state/`.
async fn state(client: &mut Client) -> BTreeMap<String, (i64, String)> {
    let resp = client
        .get("cilium/state/", Some(GetOptions::new().with_prefix()))
        .await
        .unwrap();
    resp.kvs()
        .iter()
        .map(|kv| {
            (
                kv.key_str().unwrap().to_string(),
                (
                    kv.mod_revision(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                ),
            )
        })
        .collect()
}

/// Keys under `cilium/state/` mentioning `needle` (in key or value).
fn mentioning(s: &BTreeMap<String, (i64, String)>, needle: &str) -> BTreeSet<String> {
    s.iter()
        .filter(|(k, (_, v))| k.contains(needle) || v.contains(needle))
        .map(|(k, _)| k.clone())
        .collect()
}

/// Waits until `done(state)`, then gives a late writer a moment to show up.
async fn settle(
    client: &mut Client,
    what: &str,
    done: impl Fn(&BTreeMap<String, (i64, String)>) -> bool,
) -> BTreeMap<String, (i64, String)> {
    let t = Instant::now();
    loop {
        let s = state(client).await;
        if done(&s) {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return state(client).await;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{what} within 20 s; etcd has {:?}",
            s.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every (event type, key) under `cilium/state/` the watch has delivered so far.
async fn drain(stream: &mut WatchStream) -> Vec<(EventType, String)> {
    let mut out = Vec::new();
    while let Ok(Ok(Some(resp))) =
        tokio::time::timeout(Duration::from_millis(300), stream.message()).await
    {
        for ev in resp.events() {
            if let Some(kv) = ev.kv() {
                let key = kv.key_str().unwrap_or_default().to_string();
                if key.starts_with("cilium/state/") {
                    out.push((ev.event_type(), key));
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotation_exports_and_withdraws_exactly_the_namespaces_keys() {
    let etcd = TestEtcd::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("etcd.yaml");
    etcd.write_client_config("admin-c1", &cfg).unwrap();
    let m = dir.path().join("manifests");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(m.join("crd.yaml"), CRD).unwrap();
    std::fs::write(m.join("ns-alpha.yaml"), namespace("ns-alpha", true)).unwrap();
    std::fs::write(m.join("ns-beta.yaml"), namespace("ns-beta", false)).unwrap();
    std::fs::write(m.join("alpha.yaml"), objects("ns-alpha", 1)).unwrap();
    std::fs::write(m.join("beta.yaml"), objects("ns-beta", 2)).unwrap();
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
            "--clustermesh-default-global-namespace=false",
            "--clustermesh-enable-mcs-api",
        ],
        &dir.path().join("api.log"),
    )
    .unwrap();
    api.wait_ready(Duration::from_secs(30)).unwrap();
    let mut client = etcd.client("root").await.unwrap();

    // Every kind of ns-alpha is there; nothing of ns-beta.
    let prefixes = [
        "cilium/state/ip/v1/",
        "cilium/state/identities/v1/",
        "cilium/state/services/v1/",
        "cilium/state/endpointslices/v1/",
        "cilium/state/serviceexports/v1/",
    ];
    let before = settle(&mut client, "ns-alpha exported", |s| {
        mentioning(s, "ns-alpha").len() >= 7
    })
    .await;
    let alpha = mentioning(&before, "ns-alpha");
    for p in prefixes {
        assert!(
            alpha.iter().any(|k| k.starts_with(p)),
            "ns-alpha has nothing under {p}: {alpha:?}"
        );
    }
    assert_eq!(
        mentioning(&before, "ns-beta"),
        BTreeSet::new(),
        "a non-global namespace leaked"
    );
    assert!(!before.keys().any(|k| k.contains("10.1.2.")), "{before:?}");

    // Annotate ns-beta: exactly its keys appear, nothing else is written.
    let rev = client
        .get("cilium/state/", Some(GetOptions::new().with_count_only()))
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let mut stream = client
        .watch(
            "cilium/state/",
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await
        .unwrap();
    std::fs::write(m.join("ns-beta.yaml"), namespace("ns-beta", true)).unwrap();
    let annotated = settle(&mut client, "ns-beta exported", |s| {
        mentioning(s, "ns-beta").len() >= alpha.len()
    })
    .await;
    let beta = mentioning(&annotated, "ns-beta");
    assert_eq!(beta.len(), alpha.len(), "one key per kind: {beta:?}");
    for (key, (revision, value)) in &before {
        assert_eq!(
            annotated.get(key),
            Some(&(*revision, value.clone())),
            "{key} was rewritten or removed by another namespace's annotation"
        );
    }
    let events = drain(&mut stream).await;
    let put: BTreeSet<String> = events
        .iter()
        .filter(|(t, _)| *t == EventType::Put)
        .map(|(_, k)| k.clone())
        .collect();
    assert_eq!(put, beta, "writes: {events:?}");
    assert_eq!(
        events.len(),
        beta.len(),
        "each key written once: {events:?}"
    );

    // Remove the annotation: exactly those keys are deleted.
    std::fs::write(m.join("ns-beta.yaml"), namespace("ns-beta", false)).unwrap();
    let withdrawn = settle(&mut client, "ns-beta withdrawn", |s| {
        mentioning(s, "ns-beta").is_empty()
    })
    .await;
    assert_eq!(withdrawn, before, "back to exactly the state before");
    let events = drain(&mut stream).await;
    assert!(
        events.iter().all(|(t, _)| *t == EventType::Delete),
        "only deletes: {events:?}"
    );
    let deleted: BTreeSet<String> = events.into_iter().map(|(_, k)| k).collect();
    assert_eq!(deleted, beta);
    api.stop().unwrap();
}
