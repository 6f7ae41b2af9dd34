//! Where a scenario's `k8s/add|update|delete` go, and the flags that point the apiserver
//! there: a manifest directory (`--manifests`), or the test Kubernetes API server
//! ([`crate::kubeapi`], `--source kubernetes --kubeconfig …`) watched by the real kube-rs
//! client. Every scenario runs against both, and both must produce the same etcd contents.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};

use super::k8s;
use crate::kubeapi::KubeApi;

/// Which source a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A manifest directory.
    Manifests,
    /// The test Kubernetes API server.
    Kubernetes,
}

impl Kind {
    /// Its name (`manifests`, `kubernetes`).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Manifests => "manifests",
            Kind::Kubernetes => "kubernetes",
        }
    }

    /// `SCENARIO_SOURCE=manifests|kubernetes|both` (default both).
    pub fn from_env() -> anyhow::Result<Vec<Kind>> {
        match std::env::var("SCENARIO_SOURCE").as_deref() {
            Err(_) | Ok("") | Ok("both") => Ok(vec![Kind::Manifests, Kind::Kubernetes]),
            Ok("manifests") => Ok(vec![Kind::Manifests]),
            Ok("kubernetes") => Ok(vec![Kind::Kubernetes]),
            Ok(other) => bail!("SCENARIO_SOURCE={other:?}: use manifests, kubernetes or both"),
        }
    }
}

/// A cluster's source as a scenario changes it.
pub trait Source {
    /// Which one.
    fn kind(&self) -> Kind;
    /// Flags that point the apiserver at it.
    fn flags(&self) -> Vec<String>;
    /// Creates or replaces an object (`k8s/add`, `k8s/update`).
    fn write(&mut self, object: &k8s::Object) -> anyhow::Result<()>;
    /// Deletes an object; fails like the Kubernetes API if it does not exist.
    fn delete(&mut self, object: &k8s::Object) -> anyhow::Result<()>;
}

/// A manifest directory, one file per object.
#[derive(Debug)]
pub struct ManifestDir {
    dir: PathBuf,
}

impl ManifestDir {
    /// Uses (and creates) `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
}

impl Source for ManifestDir {
    fn kind(&self) -> Kind {
        Kind::Manifests
    }
    fn flags(&self) -> Vec<String> {
        vec!["--manifests".into(), self.dir.display().to_string()]
    }
    fn write(&mut self, object: &k8s::Object) -> anyhow::Result<()> {
        k8s::write(&self.dir, object)
    }
    fn delete(&mut self, object: &k8s::Object) -> anyhow::Result<()> {
        k8s::delete(&self.dir, object)
    }
}

/// The test Kubernetes API server with Cilium's CRDs installed (a Cilium cluster has them;
/// the MCS API's ServiceExport CRD is added by the scenarios that use it).
///
/// A manifest directory may hold a custom resource whose CRD is missing (it is exported
/// only while the CRD exists); a Kubernetes API refuses such an object. So a custom
/// resource written while its CRD is missing waits here and is created when the CRD is
/// added, and the custom resources a CRD removal deletes wait for it to come back: both
/// sources then hold the same objects whenever the CRD exists.
#[derive(Debug)]
pub struct KubeApiSource {
    api: KubeApi,
    kubeconfig: PathBuf,
    /// Custom resources written by the scenario, by (kind, namespace, name).
    custom: std::collections::BTreeMap<(String, String, String), serde_json::Value>,
}

impl KubeApiSource {
    /// Starts a server and writes its kubeconfig into `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        let api = KubeApi::start().await?;
        for kind in [
            "CiliumNode",
            "CiliumIdentity",
            "CiliumEndpoint",
            "CiliumEndpointSlice",
            "CiliumNetworkPolicy",
        ] {
            api.add_crd(kind)?;
        }
        std::fs::create_dir_all(dir)?;
        let kubeconfig = dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig, "scenario")?;
        api.set_assign_uids(false);
        Ok(Self {
            api,
            kubeconfig,
            custom: Default::default(),
        })
    }

    /// The server.
    pub fn api(&self) -> &KubeApi {
        &self.api
    }
}

impl KubeApiSource {
    fn crd_exists(&self, kd: &crate::kubeapi::Kind) -> bool {
        self.api
            .get("CustomResourceDefinition", "", &kd.crd_name())
            .is_some()
    }
}

/// Kind, namespace (`default` for namespaced kinds without one, "" for cluster-scoped) and
/// name of an object.
fn identity(v: &serde_json::Value) -> (String, String, String) {
    let kind = v["kind"].as_str().unwrap_or_default().to_string();
    let namespaced = crate::kubeapi::kind(&kind).is_none_or(|k| k.namespaced);
    let ns = if namespaced {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string()
    } else {
        String::new()
    };
    let name = v["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    (kind, ns, name)
}

fn value(object: &k8s::Object) -> anyhow::Result<serde_json::Value> {
    serde_yaml::from_str(&object.text).with_context(|| format!("{}: invalid YAML", object.display))
}

impl Source for KubeApiSource {
    fn kind(&self) -> Kind {
        Kind::Kubernetes
    }
    fn flags(&self) -> Vec<String> {
        vec![
            "--source".into(),
            "kubernetes".into(),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
        ]
    }
    fn write(&mut self, object: &k8s::Object) -> anyhow::Result<()> {
        let v = value(object)?;
        let (kind, ns, name) = identity(&v);
        let crd_kind = crate::kubeapi::kind(&kind).filter(|k| k.crd).copied();
        if let Some(kd) = crd_kind {
            let key = (kind.clone(), ns.clone(), name.clone());
            self.custom.insert(key, v.clone());
            if !self.crd_exists(&kd) {
                return Ok(());
            }
        }
        self.api
            .apply(v.clone())
            .with_context(|| object.display.clone())?;
        if kind == "CustomResourceDefinition" {
            // Its custom resources that were waiting for it.
            let waiting: Vec<serde_json::Value> = self
                .custom
                .iter()
                .filter(|((k, _, _), _)| {
                    crate::kubeapi::kind(k).is_some_and(|kd| kd.crd_name() == name)
                })
                .map(|(_, v)| v.clone())
                .collect();
            self.api.apply_all(waiting)?;
        }
        Ok(())
    }
    fn delete(&mut self, object: &k8s::Object) -> anyhow::Result<()> {
        let v = value(object)?;
        let (kind, ns, name) = identity(&v);
        let was_custom = self
            .custom
            .remove(&(kind.clone(), ns.clone(), name.clone()))
            .is_some();
        if !self.api.delete(&kind, &ns, &name)? && !was_custom {
            bail!("{} not found", object.display);
        }
        Ok(())
    }
}
