//! MCS-API imports: the ServiceExports of every cluster (local and remote) aggregated per
//! `(namespace, name)` into a ServiceImport, as Cilium's operator does (reference §4.4):
//! ports are the union across clusters; type and session affinity come from the oldest
//! export (`exportCreationTimestamp`, then cluster name); an export that disagrees with the
//! oldest on those, or declares a port name with another port/protocol, is a conflict,
//! reported in [`Imports::conflicts`] (the agent's `/status`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::SystemTime;

use clustermesh_types::model::{parse_rfc3339, ServiceExport};
use serde::Serialize;

use super::merger::Name;

/// One port of an import.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Port {
    /// Port name (may be empty).
    pub name: String,
    /// `TCP`, `UDP`, `SCTP`.
    pub protocol: String,
    /// Port number.
    pub port: u16,
}

/// The aggregated import of one service.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Import {
    /// `ClusterSetIP` or `Headless` (from the oldest export).
    #[serde(rename = "type")]
    pub type_: String,
    /// From the oldest export.
    pub session_affinity: String,
    /// Union of every export's ports.
    pub ports: Vec<Port>,
    /// Clusters exporting the service, oldest first.
    pub clusters: Vec<String>,
}

/// An export that disagrees with the oldest one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Conflict {
    /// Service.
    pub service: Name,
    /// The cluster whose export lost.
    pub cluster: String,
    /// The property in conflict (`type`, `sessionAffinity`, `port <name>`).
    pub field: String,
    /// The winning cluster.
    pub winner: String,
}

/// Every export, and the imports computed from them.
#[derive(Debug, Default)]
pub struct Imports {
    exports: BTreeMap<Name, BTreeMap<String, Arc<ServiceExport>>>,
}

fn created(e: &ServiceExport) -> SystemTime {
    parse_rfc3339(&e.export_creation_timestamp).unwrap_or(SystemTime::UNIX_EPOCH)
}

impl Imports {
    /// No export yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// `cluster`'s export of `name` changed (`None` = withdrawn). Returns the name.
    pub fn set(&mut self, cluster: &str, name: Name, export: Option<Arc<ServiceExport>>) -> Name {
        match export {
            Some(e) => {
                self.exports
                    .entry(name.clone())
                    .or_default()
                    .insert(cluster.to_owned(), e);
            }
            None => {
                if let Some(m) = self.exports.get_mut(&name) {
                    m.remove(cluster);
                    if m.is_empty() {
                        self.exports.remove(&name);
                    }
                }
            }
        }
        name
    }

    /// Every exported name.
    pub fn names(&self) -> impl Iterator<Item = &Name> {
        self.exports.keys()
    }

    fn ordered(&self, name: &Name) -> Vec<(&String, &Arc<ServiceExport>)> {
        let mut v: Vec<_> = self.exports.get(name).into_iter().flatten().collect();
        v.sort_by(|a, b| created(a.1).cmp(&created(b.1)).then(a.0.cmp(b.0)));
        v
    }

    /// The import of `name` and the conflicts found while computing it.
    pub fn import(&self, name: &Name, conflicts: &mut Vec<Conflict>) -> Option<Import> {
        let ordered = self.ordered(name);
        let (winner, oldest) = *ordered.first()?;
        let mut ports: BTreeMap<String, Port> = BTreeMap::new();
        for (cluster, e) in &ordered {
            let mut conflict = |field: String| {
                conflicts.push(Conflict {
                    service: name.clone(),
                    cluster: (*cluster).clone(),
                    field,
                    winner: winner.clone(),
                })
            };
            if e.type_ != oldest.type_ {
                conflict("type".into());
            }
            if e.session_affinity != oldest.session_affinity {
                conflict("sessionAffinity".into());
            }
            for p in &e.ports {
                let Ok(port) = u16::try_from(p.port) else {
                    continue;
                };
                let candidate = Port {
                    name: p.name.clone(),
                    protocol: if p.protocol.is_empty() {
                        "TCP".into()
                    } else {
                        p.protocol.clone()
                    },
                    port,
                };
                match ports.get(&p.name) {
                    Some(existing) if *existing != candidate => {
                        conflict(format!("port {:?}", p.name));
                    }
                    Some(_) => {}
                    None => {
                        ports.insert(p.name.clone(), candidate);
                    }
                }
            }
        }
        let mut ports: Vec<Port> = ports.into_values().collect();
        ports.sort();
        Some(Import {
            type_: oldest.type_.clone(),
            session_affinity: oldest.session_affinity.clone(),
            ports,
            clusters: ordered.iter().map(|(c, _)| (*c).clone()).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_types::model::ServiceExportPort;

    fn export(cluster: &str, ts: &str, type_: &str, ports: &[(&str, i32)]) -> Arc<ServiceExport> {
        Arc::new(ServiceExport {
            cluster: cluster.into(),
            name: "echo".into(),
            namespace: "default".into(),
            export_creation_timestamp: ts.into(),
            ports: ports
                .iter()
                .map(|(n, p)| ServiceExportPort {
                    name: (*n).into(),
                    protocol: "TCP".into(),
                    app_protocol: None,
                    port: *p,
                })
                .collect(),
            type_: type_.into(),
            ..Default::default()
        })
    }

    #[test]
    fn union_of_ports_and_oldest_wins() {
        let n = Name::new("default", "echo");
        let mut i = Imports::new();
        i.set(
            "c2",
            n.clone(),
            Some(export(
                "c2",
                "2026-01-02T00:00:00Z",
                "Headless",
                &[("http", 80), ("grpc", 9000)],
            )),
        );
        i.set(
            "c1",
            n.clone(),
            Some(export(
                "c1",
                "2026-01-01T00:00:00Z",
                "ClusterSetIP",
                &[("http", 8080)],
            )),
        );
        let mut conflicts = Vec::new();
        let imp = i.import(&n, &mut conflicts).unwrap();
        assert_eq!(imp.type_, "ClusterSetIP");
        assert_eq!(imp.clusters, vec!["c1", "c2"]);
        let ports: Vec<(&str, u16)> = imp
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.port))
            .collect();
        assert_eq!(ports, vec![("grpc", 9000), ("http", 8080)]);
        let fields: Vec<&str> = conflicts.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, vec!["type", "port \"http\""]);
        assert!(conflicts
            .iter()
            .all(|c| c.cluster == "c2" && c.winner == "c1"));

        i.set("c1", n.clone(), None);
        let imp = i.import(&n, &mut Vec::new()).unwrap();
        assert_eq!(imp.type_, "Headless");
        i.set("c2", n.clone(), None);
        assert!(i.import(&n, &mut Vec::new()).is_none());
    }
}
