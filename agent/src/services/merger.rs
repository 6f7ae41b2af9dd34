//! Local and remote services merged per `(namespace, name)`, after Cilium
//! (`pkg/k8s/service_cache.go` `MergeExternalServiceUpdate`, reference §4.2):
//!
//! * remote backends are merged only when the **local** service exists and is global;
//! * a remote service with `shared = false` (or not global) is ignored, and so is anything
//!   published under the local cluster's own name;
//! * a backend IP that exists locally keeps the local entry (the remote one is a conflict);
//! * every backend carries its cluster ID;
//! * affinity (global services only): `local` uses remote backends only while there is no
//!   local backend, `remote` the reverse, `none` both; a non-global service gets local
//!   backends only.
//!
//! Backends in a ClusterService are ready endpoints only (there are no conditions), so
//! "healthy" means "present". The merger is pure: it never touches a map.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use clustermesh_types::model::ClusterService;
use serde::{Deserialize, Serialize};

/// A service's identity: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Name {
    /// Namespace.
    pub namespace: String,
    /// Service name.
    pub name: String,
}

impl Name {
    /// `(namespace, name)`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The name of a kvstore key suffix `<ns>/<name>`.
    pub fn from_key_suffix(rel: &str) -> Option<Self> {
        let (ns, name) = rel.split_once('/')?;
        (!ns.is_empty() && !name.is_empty() && !name.contains('/')).then(|| Self::new(ns, name))
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// `service.cilium.io/affinity`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Affinity {
    /// Local and remote backends.
    #[default]
    None,
    /// Remote backends only while there is no local one.
    Local,
    /// Local backends only while there is no remote one.
    Remote,
}

impl Affinity {
    /// Cilium's parsing: anything but `local`/`remote` is `none`.
    pub fn parse(s: &str) -> Self {
        match s.trim().to_ascii_lowercase().as_str() {
            "local" => Affinity::Local,
            "remote" => Affinity::Remote,
            _ => Affinity::None,
        }
    }
}

/// A service of the local cluster as the apiserver publishes it under
/// `clustermesh/local/v1/services/<ns>/<name>`: Cilium's ClusterService plus what load
/// balancing needs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LocalService {
    /// Cilium's fields (frontends, backends, global, shared, cluster ID).
    pub service: ClusterService,
    /// Affinity (meaningful only for global services).
    pub affinity: Affinity,
    /// No frontend: DNS answers with the backends.
    pub headless: bool,
    /// Kubernetes service type.
    pub type_: String,
    /// `ClientIP` or `None`.
    pub session_affinity: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LocalServiceJson {
    #[serde(flatten)]
    service: ClusterService,
    #[serde(default)]
    affinity: String,
    #[serde(default)]
    headless: bool,
    #[serde(rename = "type", default)]
    type_: String,
    #[serde(default)]
    session_affinity: String,
}

impl LocalService {
    /// Decodes and validates the JSON the apiserver writes.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        let j: LocalServiceJson = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        j.service.validate().map_err(|e| e.to_string())?;
        Ok(Self {
            service: j.service,
            affinity: Affinity::parse(&j.affinity),
            headless: j.headless,
            type_: j.type_,
            session_affinity: j.session_affinity,
        })
    }
}

/// One backend of a merged service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Backend {
    /// Address.
    pub ip: IpAddr,
    /// Port name → (protocol, port).
    pub ports: BTreeMap<String, (String, u16)>,
    /// Cluster that owns it.
    pub cluster_id: u32,
    /// The backend belongs to the local cluster.
    pub local: bool,
}

/// One frontend port of a merged service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Frontend {
    /// The VIP.
    pub ip: IpAddr,
    /// Port name (matches the backends' port names).
    pub port_name: String,
    /// `TCP`, `UDP`, ...
    pub protocol: String,
    /// Port.
    pub port: u16,
}

/// A service after merging: what the datapath and DNS serve.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Merged {
    /// Frontends of the local service (empty for headless services).
    pub frontends: Vec<Frontend>,
    /// Backends in use after the affinity filter, sorted, local first.
    pub backends: Vec<Backend>,
    /// Global (`service.cilium.io/global`).
    pub global: bool,
    /// Affinity in effect.
    pub affinity: Affinity,
    /// Headless.
    pub headless: bool,
    /// Backends that are available but filtered out by affinity (for status).
    pub standby: usize,
}

/// A remote backend IP that a local (or earlier) backend already uses.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct BackendConflict {
    /// Service.
    pub service: Name,
    /// Address.
    pub ip: IpAddr,
    /// The cluster whose backend was ignored.
    pub ignored_cluster: String,
}

/// Merges local services with the ClusterServices of remote clusters.
#[derive(Debug)]
pub struct Merger {
    local_cluster: String,
    local: BTreeMap<Name, LocalService>,
    /// name → remote cluster → its service.
    remote: BTreeMap<Name, BTreeMap<String, Arc<ClusterService>>>,
}

impl Merger {
    /// A merger for the agent of `local_cluster`.
    pub fn new(local_cluster: impl Into<String>) -> Self {
        Self {
            local_cluster: local_cluster.into(),
            local: BTreeMap::new(),
            remote: BTreeMap::new(),
        }
    }

    /// A local service changed (`None` = deleted). Returns the affected name.
    pub fn set_local(&mut self, name: Name, svc: Option<LocalService>) -> Name {
        match svc {
            Some(s) => self.local.insert(name.clone(), s),
            None => self.local.remove(&name),
        };
        name
    }

    /// A remote cluster's service changed (`None` = deleted). Updates published under the
    /// local cluster's own name are ignored (Cilium). Returns the affected name.
    pub fn set_remote(
        &mut self,
        cluster: &str,
        name: Name,
        svc: Option<Arc<ClusterService>>,
    ) -> Option<Name> {
        if cluster == self.local_cluster {
            return None;
        }
        match svc {
            Some(s) => {
                self.remote
                    .entry(name.clone())
                    .or_default()
                    .insert(cluster.to_owned(), s);
            }
            None => {
                if let Some(m) = self.remote.get_mut(&name) {
                    m.remove(cluster);
                    if m.is_empty() {
                        self.remote.remove(&name);
                    }
                }
            }
        }
        Some(name)
    }

    /// Every remote cluster's services were removed (the cluster left the mesh).
    pub fn drop_cluster(&mut self, cluster: &str) -> Vec<Name> {
        let mut out = Vec::new();
        self.remote.retain(|name, m| {
            if m.remove(cluster).is_some() {
                out.push(name.clone());
            }
            !m.is_empty()
        });
        out
    }

    /// The local service `name`, if any.
    pub fn local(&self, name: &Name) -> Option<&LocalService> {
        self.local.get(name)
    }

    /// Remote services of `name` (cluster → service).
    pub fn remotes(&self, name: &Name) -> impl Iterator<Item = (&String, &Arc<ClusterService>)> {
        self.remote.get(name).into_iter().flatten()
    }

    /// Every name known locally or remotely.
    pub fn names(&self) -> BTreeSet<Name> {
        self.local
            .keys()
            .chain(self.remote.keys())
            .cloned()
            .collect()
    }

    /// The merged view of `name`; `None` without a local service (the datapath serves
    /// local services only; a remote-only name is reachable through MCS DNS, see
    /// [`super::mcs`]).
    pub fn merged(&self, name: &Name, conflicts: &mut Vec<BackendConflict>) -> Option<Merged> {
        let local = self.local.get(name)?;
        let svc = &local.service;
        let global = svc.include_external;
        let mut frontends = Vec::new();
        if !local.headless {
            for (ip, ports) in &svc.frontends {
                let Ok(ip) = ip.parse::<IpAddr>() else {
                    continue;
                };
                for (port_name, l4) in ports.iter() {
                    frontends.push(Frontend {
                        ip,
                        port_name: port_name.to_string(),
                        protocol: l4.protocol.to_string(),
                        port: l4.port,
                    });
                }
            }
        }
        frontends.sort();

        let backends_of = |cs: &ClusterService, cluster_id: u32, local: bool| {
            cs.backends
                .iter()
                .filter_map(move |(ip, ports)| {
                    Some(Backend {
                        ip: ip.parse().ok()?,
                        ports: ports
                            .iter()
                            .map(|(n, a)| (n.to_string(), (a.protocol.to_string(), a.port)))
                            .collect(),
                        cluster_id,
                        local,
                    })
                })
                .collect::<Vec<_>>()
        };
        let locals = backends_of(svc, svc.cluster_id, true);
        let mut seen: BTreeSet<IpAddr> = locals.iter().map(|b| b.ip).collect();
        let mut remotes = Vec::new();
        if global {
            for (cluster, rs) in self.remotes(name) {
                if !rs.include_external || !rs.shared {
                    continue;
                }
                for b in backends_of(rs, rs.cluster_id, false) {
                    if seen.insert(b.ip) {
                        remotes.push(b);
                    } else {
                        conflicts.push(BackendConflict {
                            service: name.clone(),
                            ip: b.ip,
                            ignored_cluster: cluster.clone(),
                        });
                    }
                }
            }
        }
        let affinity = if global {
            local.affinity
        } else {
            Affinity::None
        };
        let (mut use_local, mut use_remote) = (true, global);
        match affinity {
            Affinity::None => {}
            Affinity::Local => use_remote = locals.is_empty(),
            Affinity::Remote => use_local = remotes.is_empty(),
        }
        let mut backends = Vec::new();
        let mut standby = 0;
        for (use_it, set) in [(use_local, locals), (use_remote, remotes)] {
            if use_it {
                backends.extend(set);
            } else {
                standby += set.len();
            }
        }
        Some(Merged {
            frontends,
            backends,
            global,
            affinity,
            headless: local.headless,
            standby,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::model::{L4Addr, PortConfiguration};

    fn cs(
        cluster: &str,
        id: u32,
        vip: &str,
        backends: &[&str],
        global: bool,
        shared: bool,
    ) -> ClusterService {
        let port = |p: u16| -> PortConfiguration {
            [(
                "http".to_string(),
                L4Addr {
                    protocol: "TCP".into(),
                    port: p,
                },
            )]
            .into_iter()
            .collect()
        };
        ClusterService {
            cluster: cluster.into(),
            namespace: "default".into(),
            name: "echo".into(),
            frontends: [(vip.to_string(), port(80))].into_iter().collect(),
            backends: backends
                .iter()
                .map(|b| (b.to_string(), port(8080)))
                .collect(),
            include_external: global,
            shared,
            cluster_id: id,
            ..Default::default()
        }
    }

    fn local(svc: ClusterService, affinity: Affinity) -> LocalService {
        LocalService {
            service: svc,
            affinity,
            ..Default::default()
        }
    }

    fn name() -> Name {
        Name::new("default", "echo")
    }

    /// Cluster `me`'s view: its own service and the other cluster's.
    fn view(
        me: (&str, u32, bool, bool),
        other: (&str, u32, bool, bool),
        affinity: Affinity,
    ) -> Merged {
        let mut m = Merger::new(me.0);
        let mine = cs(me.0, me.1, "172.20.0.10", &["10.1.1.10"], me.2, me.3);
        let theirs = cs(
            other.0,
            other.1,
            "172.20.0.10",
            &["10.2.1.10"],
            other.2,
            other.3,
        );
        m.set_local(name(), Some(local(mine, affinity)));
        // What the other cluster's apiserver exports: only global+shared services.
        if other.2 && other.3 {
            m.set_remote(other.0, name(), Some(Arc::new(theirs)));
        }
        m.merged(&name(), &mut Vec::new()).expect("local service")
    }

    fn clusters(m: &Merged) -> Vec<u32> {
        m.backends.iter().map(|b| b.cluster_id).collect()
    }

    #[test]
    fn both_global_and_shared_use_local_and_remote() {
        let c1 = view(("c1", 1, true, true), ("c2", 2, true, true), Affinity::None);
        let c2 = view(("c2", 2, true, true), ("c1", 1, true, true), Affinity::None);
        assert_eq!(clusters(&c1), vec![1, 2]);
        assert_eq!(clusters(&c2), vec![2, 1]);
        assert!(c1.backends[0].local && !c1.backends[1].local);
    }

    #[test]
    fn one_side_not_shared() {
        // C1 shared=false: C1 still uses local + remote, C2 only local.
        let c1 = view(
            ("c1", 1, true, false),
            ("c2", 2, true, true),
            Affinity::None,
        );
        let c2 = view(
            ("c2", 2, true, true),
            ("c1", 1, true, false),
            Affinity::None,
        );
        assert_eq!(clusters(&c1), vec![1, 2]);
        assert_eq!(clusters(&c2), vec![2]);
    }

    #[test]
    fn remote_shared_false_is_ignored_even_if_delivered() {
        let mut m = Merger::new("c1");
        m.set_local(
            name(),
            Some(local(
                cs("c1", 1, "172.20.0.10", &["10.1.1.10"], true, true),
                Affinity::None,
            )),
        );
        m.set_remote(
            "c2",
            name(),
            Some(Arc::new(cs(
                "c2",
                2,
                "172.20.0.10",
                &["10.2.1.10"],
                true,
                false,
            ))),
        );
        assert_eq!(
            clusters(&m.merged(&name(), &mut Vec::new()).unwrap()),
            vec![1]
        );
    }

    #[test]
    fn either_side_not_global_uses_local_only() {
        let c1 = view(
            ("c1", 1, false, false),
            ("c2", 2, true, true),
            Affinity::None,
        );
        let c2 = view(
            ("c2", 2, true, true),
            ("c1", 1, false, false),
            Affinity::None,
        );
        assert_eq!(clusters(&c1), vec![1]);
        assert_eq!(clusters(&c2), vec![2]);
        assert!(!c1.global);
    }

    #[test]
    fn own_cluster_name_is_ignored() {
        let mut m = Merger::new("c1");
        assert!(m
            .set_remote(
                "c1",
                name(),
                Some(Arc::new(cs(
                    "c1",
                    1,
                    "172.20.0.10",
                    &["10.9.9.9"],
                    true,
                    true
                )))
            )
            .is_none());
    }

    #[test]
    fn local_ip_wins_a_conflict() {
        let mut m = Merger::new("c1");
        m.set_local(
            name(),
            Some(local(
                cs("c1", 1, "172.20.0.10", &["10.1.1.10"], true, true),
                Affinity::None,
            )),
        );
        m.set_remote(
            "c2",
            name(),
            Some(Arc::new(cs(
                "c2",
                2,
                "172.20.0.10",
                &["10.1.1.10", "10.2.1.10"],
                true,
                true,
            ))),
        );
        let mut conflicts = Vec::new();
        let merged = m.merged(&name(), &mut conflicts).unwrap();
        assert_eq!(clusters(&merged), vec![1, 2]);
        assert_eq!(
            merged.backends[0].ip,
            "10.1.1.10".parse::<IpAddr>().unwrap()
        );
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].ignored_cluster, "c2");
    }

    #[test]
    fn affinity_local_fails_over_and_back() {
        let mut m = Merger::new("c1");
        let remote = Arc::new(cs("c2", 2, "172.20.0.10", &["10.2.1.10"], true, true));
        m.set_remote("c2", name(), Some(remote));
        m.set_local(
            name(),
            Some(local(
                cs("c1", 1, "172.20.0.10", &["10.1.1.10"], true, true),
                Affinity::Local,
            )),
        );
        let v = m.merged(&name(), &mut Vec::new()).unwrap();
        assert_eq!((clusters(&v), v.standby), (vec![1], 1));
        // Last local backend removed: remote takes over.
        m.set_local(
            name(),
            Some(local(
                cs("c1", 1, "172.20.0.10", &[], true, true),
                Affinity::Local,
            )),
        );
        let v = m.merged(&name(), &mut Vec::new()).unwrap();
        assert_eq!((clusters(&v), v.standby), (vec![2], 0));
        // Back.
        m.set_local(
            name(),
            Some(local(
                cs("c1", 1, "172.20.0.10", &["10.1.1.11"], true, true),
                Affinity::Local,
            )),
        );
        assert_eq!(
            clusters(&m.merged(&name(), &mut Vec::new()).unwrap()),
            vec![1]
        );
    }

    #[test]
    fn affinity_remote_prefers_remote() {
        let v = view(
            ("c1", 1, true, true),
            ("c2", 2, true, true),
            Affinity::Remote,
        );
        assert_eq!((clusters(&v), v.standby), (vec![2], 1));
        let v = view(
            ("c1", 1, true, true),
            ("c2", 2, false, false),
            Affinity::Remote,
        );
        assert_eq!(clusters(&v), vec![1]);
    }

    #[test]
    fn affinity_ignored_when_not_global() {
        let v = view(
            ("c1", 1, false, false),
            ("c2", 2, true, true),
            Affinity::Remote,
        );
        assert_eq!((clusters(&v), v.affinity), (vec![1], Affinity::None));
    }

    #[test]
    fn remote_only_name_has_no_merged_view_and_cluster_drop() {
        let mut m = Merger::new("c1");
        m.set_remote(
            "c2",
            name(),
            Some(Arc::new(cs(
                "c2",
                2,
                "172.20.0.10",
                &["10.2.1.10"],
                true,
                true,
            ))),
        );
        assert!(m.merged(&name(), &mut Vec::new()).is_none());
        assert_eq!(m.drop_cluster("c2"), vec![name()]);
        assert!(m.names().is_empty());
    }

    #[test]
    fn decodes_the_apiserver_local_service() {
        let j = br#"{"cluster":"c1","namespace":"default","name":"echo",
            "frontends":{"172.20.0.10":{"http":{"Protocol":"TCP","Port":80}}},
            "backends":{"10.1.1.10":{"http":{"Protocol":"TCP","Port":8080}}},
            "labels":{},"selector":{},"includeExternal":true,"shared":true,"clusterID":1,
            "affinity":"local","headless":false,"type":"ClusterIP","sessionAffinity":"None"}"#;
        let s = LocalService::decode(j).unwrap();
        assert_eq!(s.affinity, Affinity::Local);
        assert!(s.service.include_external);
        assert!(LocalService::decode(br#"{"cluster":"c1"}"#).is_err());
    }
}
