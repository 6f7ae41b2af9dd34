//! `deploy/kubernetes/` and every object the CLI sends: generated from typed Rust
//! (`clustermesh_k8s::objects`), checked in unchanged, strictly valid for the Kubernetes
//! version k8s-openapi is built for (`kubernetes-validate --strict`), and parsing back into the
//! k8s-openapi types with no field lost.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clustermesh_k8s::objects::{self, Object, PeerAddress, ServiceType, StorageMedium, Values};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn files_under(dir: &Path, root: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            // Certificates a user issued for an overlay are theirs, not generated.
            if p.file_name().is_some_and(|n| n == "certs") {
                continue;
            }
            files_under(&p, root, out);
        } else {
            out.push(p.strip_prefix(root).unwrap().display().to_string());
        }
    }
}

#[test]
fn checked_in_deploy_tree_is_what_the_code_generates() {
    let dir = deploy_dir();
    let tree: BTreeMap<String, String> = objects::deploy_tree().into_iter().collect();
    let fix = "regenerate with `cargo run -p clustermesh -- manifests --out deploy/kubernetes` and commit";
    for (rel, text) in &tree {
        let on_disk = std::fs::read_to_string(dir.join(rel))
            .unwrap_or_else(|e| panic!("deploy/kubernetes/{rel}: {e}: {fix}"));
        assert!(
            &on_disk == text,
            "deploy/kubernetes/{rel} differs from the generated objects: {fix}"
        );
    }
    let mut present = Vec::new();
    files_under(&dir, &dir, &mut present);
    for rel in present {
        assert!(
            tree.contains_key(&rel) || rel == "README.md",
            "deploy/kubernetes/{rel} is not generated: remove it or generate it from k8s/src/objects.rs"
        );
    }
}

fn issue_secrets(v: &Values) -> Vec<Object> {
    let ca = clustermesh_certs::Ca::generate("Cilium CA").unwrap();
    let leaf = |cn: &str| {
        let l = ca.issue_client(cn, 30).unwrap();
        (l.cert_pem, l.key_pem)
    };
    let server = ca
        .issue_server(&clustermesh_certs::ServerSpec::default())
        .unwrap();
    let pems = objects::CertPems {
        ca_cert: ca.cert_pem().to_string(),
        ca_key: "-----BEGIN PRIVATE KEY-----\nnot-a-key\n-----END PRIVATE KEY-----\n".into(),
        server: (server.cert_pem, server.key_pem),
        admin: leaf(&format!("admin-{}", v.cluster_name)),
        local: leaf(&format!("local-{}", v.cluster_name)),
        remote: leaf(&format!("remote-{}", v.cluster_name)),
    };
    objects::cert_secrets(v, &pems)
}

/// Every object the code can produce, over the values that change its shape.
fn every_object() -> Vec<Object> {
    let mut out = Vec::new();
    for (i, (ty, storage, mcs)) in [
        (ServiceType::NodePort, StorageMedium::Memory, false),
        (ServiceType::LoadBalancer, StorageMedium::Disk, true),
    ]
    .into_iter()
    .enumerate()
    {
        let v = Values {
            cluster_name: format!("c{}", i + 1),
            cluster_id: i as u32 + 1,
            service_type: ty,
            etcd_storage: storage,
            enable_mcs_api: mcs,
            namespace: if i == 0 {
                "kube-system".into()
            } else {
                "clustermesh".into()
            },
            // The second cluster has a CA bundle (connect --allow-mismatching-ca).
            ca_bundle: (i == 1).then(|| "PEM A\nPEM B\n".to_string()),
            ..Values::default()
        };
        out.extend(objects::install(&v));
        out.extend(issue_secrets(&v));
        out.extend(objects::ca_bundle(&v).map(|c| Object::new(&c)));
        out.push(Object::new(&objects::remote_users(&v, &[])));
        out.push(Object::new(&objects::remote_users(
            &v,
            &["c7".to_string(), "c8".to_string()],
        )));
        let peers = vec![PeerAddress {
            name: "c7".into(),
            ips: vec!["192.0.2.7".into()],
            port: 32379,
            cluster_cidrs: vec!["10.7.0.0/16".into(), "fd00:7::/48".into()],
        }];
        out.extend(objects::remote_secrets(&v, &peers, &BTreeMap::new()));
        let bundles = BTreeMap::from([("c7".to_string(), "PEM".to_string())]);
        out.extend(objects::remote_secrets(&v, &peers, &bundles));
    }
    out
}

/// Parses `v` as `K` and writes it back: a field k8s-openapi does not know would be dropped
/// and show up as a difference (k8s-openapi itself ignores unknown fields).
fn roundtrip<K: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Result<(), String> {
    let typed: K = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
    let back = serde_json::to_value(&typed).map_err(|e| e.to_string())?;
    if &back != v {
        return Err(format!("fields lost in a round trip:\n{v:#}\nvs\n{back:#}"));
    }
    Ok(())
}

fn parse_strictly(kind: &str, v: &Value) -> Result<(), String> {
    match kind {
        "ServiceAccount" => roundtrip::<ServiceAccount>(v),
        "ClusterRole" => roundtrip::<ClusterRole>(v),
        "ClusterRoleBinding" => roundtrip::<ClusterRoleBinding>(v),
        "ConfigMap" => roundtrip::<ConfigMap>(v),
        "Secret" => roundtrip::<Secret>(v),
        "Service" => roundtrip::<Service>(v),
        "Deployment" => roundtrip::<Deployment>(v),
        "DaemonSet" => roundtrip::<DaemonSet>(v),
        other => Err(format!("no k8s-openapi type known for kind {other}")),
    }
}

#[test]
fn every_object_parses_into_k8s_openapi_types_with_nothing_unknown() {
    for o in every_object() {
        parse_strictly(&o.kind, &o.value).unwrap_or_else(|e| panic!("{}: {e}", o.describe()));
    }
    // And the checked-in files, as YAML (what kubectl reads).
    let dir = deploy_dir();
    for (rel, _) in objects::deploy_tree() {
        if rel.ends_with("kustomization.yaml") {
            continue;
        }
        let text = std::fs::read_to_string(dir.join(&rel)).unwrap();
        let v: Value = serde_yaml::from_str(&text).unwrap();
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        parse_strictly(&kind, &v).unwrap_or_else(|e| panic!("deploy/kubernetes/{rel}: {e}"));
    }
    // The check itself refuses an unknown field.
    let mut bad = Object::new(&objects::cluster_config(&Values::default())).value;
    bad["metadata"]["bogus"] = serde_json::json!(1);
    assert!(parse_strictly("ConfigMap", &bad).is_err());
}

fn kubernetes_validate(files: &[PathBuf]) -> std::process::Output {
    std::process::Command::new("kubernetes-validate")
        .arg("--strict")
        .arg("--quiet")
        .arg("-k")
        .arg(objects::KUBERNETES_VERSION)
        .args(files)
        .output()
        .expect("kubernetes-validate is not installed: run ./scripts/install-deps.sh (pip install kubernetes-validate)")
}

#[test]
fn every_object_validates_strictly_against_the_kubernetes_schemas() {
    let tmp = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, o) in every_object().iter().enumerate() {
        let p = tmp
            .path()
            .join(format!("{i:03}-{}.yaml", o.kind.to_lowercase()));
        std::fs::write(&p, serde_yaml::to_string(&o.value).unwrap()).unwrap();
        files.push(p);
    }
    let dir = deploy_dir();
    for (rel, _) in objects::deploy_tree() {
        if !rel.ends_with("kustomization.yaml") {
            files.push(dir.join(rel));
        }
    }
    let out = kubernetes_validate(&files);
    assert!(
        out.status.success(),
        "kubernetes-validate --strict -k {} failed:\n{}{}",
        objects::KUBERNETES_VERSION,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The validator is strict: an unknown field fails it.
    let mut bad = Object::new(&objects::service(&Values::default())).value;
    bad["spec"]["nodePorts"] = serde_json::json!(32379);
    let p = tmp.path().join("bad.yaml");
    std::fs::write(&p, serde_yaml::to_string(&bad).unwrap()).unwrap();
    assert!(!kubernetes_validate(&[p]).status.success());
}

/// The ClusterRole a cluster receives grants exactly what the apiserver's Kubernetes source
/// asks for: the source (the real binary, run as the Deployment runs it, with every CRD of a
/// Cilium cluster present) against the test API server, its lists and watches counted per
/// resource, compared with the rules of the checked-in `base/clusterrole.yaml` (and, with
/// `--clustermesh-enable-mcs-api`, of the objects rendered with MCS-API on). A watch added
/// outside `clustermesh_k8s::resources`, or a rule the source no longer needs, fails here.
/// (The test API server counts lists and watches, not gets: `get` in the rules is not
/// checked.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_role_rules_are_exactly_what_the_kubernetes_source_requests() {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use clustermesh_tests::etcd::TestEtcd;
    use clustermesh_tests::kubeapi::KubeApi;
    use clustermesh_tests::process::TestApiserver;

    let checked_in: ClusterRole = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir().join("base/clusterrole.yaml")).unwrap(),
    )
    .unwrap();
    let with_mcs = objects::install(&Values {
        enable_mcs_api: true,
        ..Values::default()
    })
    .into_iter()
    .find(|o| o.kind == "ClusterRole" && o.name == objects::APISERVER)
    .unwrap();
    let with_mcs: ClusterRole = serde_json::from_value(with_mcs.value).unwrap();

    for (role, mcs) in [(checked_in, false), (with_mcs, true)] {
        let granted = |verb: &str| -> BTreeSet<String> {
            role.rules
                .iter()
                .flatten()
                .filter(|r| r.verbs.iter().any(|v| v == verb))
                .flat_map(|r| r.resources.iter().flatten().cloned())
                .collect()
        };
        let kube = KubeApi::start().await.unwrap();
        kube.add_all_crds().unwrap();
        let etcd = TestEtcd::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("etcd.yaml");
        etcd.write_client_config("admin-c1", &cfg).unwrap();
        let kc = dir.path().join("kubeconfig");
        kube.write_kubeconfig(&kc, "test").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let (cfg, kc, state) = (
            cfg.display().to_string(),
            kc.display().to_string(),
            state.display().to_string(),
        );
        let mut args = vec![
            "--source=kubernetes",
            "--cluster-name=c1",
            "--cluster-id=1",
            "--etcd-config",
            &cfg,
            "--state-dir",
            &state,
            "--kubeconfig",
            &kc,
            "--context",
            "test",
        ];
        if mcs {
            args.push("--clustermesh-enable-mcs-api");
        }
        let mut api = TestApiserver::start(&args, &dir.path().join("api.log")).unwrap();
        api.wait_ready(Duration::from_secs(30)).unwrap();
        // Every watch is open once the source is ready; give a straggler a moment.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stats = kube.stats();
        let listed: BTreeSet<String> = stats.lists.keys().cloned().collect();
        let watched: BTreeSet<String> = stats.watches.keys().cloned().collect();
        println!("MCS-API {mcs}: listed {listed:?}, watched {watched:?}");
        assert_eq!(stats.forbidden, 0, "mcs {mcs}: {stats:?}");
        assert_eq!(
            listed,
            granted("list"),
            "mcs {mcs}: resources listed by the source vs. the ClusterRole's list rules"
        );
        assert_eq!(
            watched,
            granted("watch"),
            "mcs {mcs}: resources watched by the source vs. the ClusterRole's watch rules"
        );
        assert_eq!(
            granted("list").contains("serviceexports"),
            mcs,
            "ServiceExports are read only with MCS-API"
        );
    }
}
