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
#[derive(Debug)]
pub struct KubeApiSource {
    api: KubeApi,
    kubeconfig: PathBuf,
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
        Ok(Self { api, kubeconfig })
    }

    /// The server.
    pub fn api(&self) -> &KubeApi {
        &self.api
    }
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
        self.api
            .apply(value(object)?)
            .with_context(|| object.display.clone())?;
        Ok(())
    }
    fn delete(&mut self, object: &k8s::Object) -> anyhow::Result<()> {
        let v = value(object)?;
        let kind = v["kind"].as_str().unwrap_or_default();
        let ns = v["metadata"]["namespace"].as_str().unwrap_or("");
        let name = v["metadata"]["name"].as_str().unwrap_or_default();
        if !self.api.delete(kind, ns, name)? {
            bail!("{} not found", object.display);
        }
        Ok(())
    }
}
