//! The apiserver's named health components (Cilium's hive module and job reporters, which
//! its scenario scripts query with `health` and `health/ok`):
//!
//! | component | ok when | degraded when |
//! |---|---|---|
//! | `source` | the source was read and every object decodes | objects are broken (last good kept) |
//! | `source/kubernetes` (Kubernetes source; reported by `source::kubernetes`) | every resource listed and watched, every object decodes | the API server is unreachable (last export kept), a resource is not listed yet or forbidden (the rule to add), objects are skipped |
//! | `etcd` | the etcd session is up | etcd is unreachable (reconnecting) |
//! | `export/<store>` (`export/nodes/v1`, `export/endpointslices/v1`, …) | the store is in sync | before its initial sync; etcd is gone |
//! | `export/serviceexports/v1` (with MCS-API) | as above, and the ServiceExport CRD exists | the CRD is missing: nothing to export until it appears (no restart needed) |
//! | `kvstoremesh/<remote>` | the remote is connected and synced | not connected or not synced, with the reader's reason |
//!
//! Each is reported in `/status` (`health`) and as `component_health{component,level}`.
//! This module decides levels from what the export loop and KVStoreMesh already know; it
//! must not change what they do.

use std::collections::BTreeMap;

use clustermesh_health::{Reporter, Reporters};
use clustermesh_syncer::remote;

use crate::export::{Store, SERVICE_EXPORT_CRD};

/// The reporters of the source, etcd and every export job.
#[derive(Debug)]
pub struct Components {
    source: Reporter,
    etcd: Reporter,
    stores: BTreeMap<Store, Reporter>,
    mcs_api: bool,
}

impl Components {
    /// Registers every component as starting. `mcs_api`: whether ServiceExports are
    /// exported at all (without it the ServiceExport job exists but has nothing to wait for).
    pub fn new(reporters: &Reporters, mcs_api: bool) -> Self {
        Self {
            source: reporters.reporter("source"),
            etcd: reporters.reporter("etcd"),
            stores: Store::ALL
                .iter()
                .map(|s| (*s, reporters.reporter(format!("export/{}", s.name()))))
                .collect(),
            mcs_api,
        }
    }

    /// etcd answered and the session is set up; the stores sync next.
    pub fn etcd_up(&self) {
        self.etcd.ok();
    }

    /// The etcd session failed: every store keeps what is in etcd but cannot follow the
    /// source until it is back.
    pub fn etcd_down(&self, error: &str) {
        self.etcd
            .degraded(format!("etcd unreachable, reconnecting: {error}"));
        for reporter in self.stores.values() {
            reporter.degraded(format!(
                "not following the source while etcd is unreachable: {error}"
            ));
        }
    }

    /// An export pass wrote every store. `source_errors`: the source's current problems
    /// (first few); `service_export_crd`: whether the ServiceExport CRD exists.
    pub fn exported(&self, source_errors: &[String], service_export_crd: bool) {
        match source_errors {
            [] => self.source.ok(),
            [first, rest @ ..] => self.source.degraded(format!(
                "{} object source problem(s), last good objects kept: {first}{}",
                source_errors.len(),
                if rest.is_empty() { "" } else { "; …" }
            )),
        }
        for (store, reporter) in &self.stores {
            if *store == Store::ServiceExports && self.mcs_api && !service_export_crd {
                reporter.degraded(format!(
                    "the ServiceExport CRD {SERVICE_EXPORT_CRD} is not installed: no \
                     ServiceExport is exported until it is (install the MCS-API CRDs; no \
                     restart needed)"
                ));
            } else {
                reporter.ok();
            }
        }
    }
}

/// Keeps one `kvstoremesh/<remote>` reporter per configured remote in step with the
/// remote reader's status; reporters of removed remotes are removed.
#[derive(Debug, Default)]
pub struct RemoteComponents {
    known: BTreeMap<String, Reporter>,
}

impl RemoteComponents {
    /// Updates every remote's reporter from `clusters`.
    pub fn update(&mut self, reporters: &Reporters, clusters: &[remote::Status]) {
        let names: std::collections::BTreeSet<&str> =
            clusters.iter().map(|c| c.name.as_str()).collect();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|n| !names.contains(n.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(r) = self.known.remove(&name) {
                r.remove();
            }
        }
        for c in clusters {
            let reporter = self
                .known
                .entry(c.name.clone())
                .or_insert_with(|| reporters.reporter(format!("kvstoremesh/{}", c.name)));
            if c.ready {
                reporter.ok();
            } else if !c.connected {
                reporter.degraded(format!("not connected: {}", c.status));
            } else {
                reporter.degraded(format!(
                    "connected, initial sync not complete ({})",
                    c.status
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clustermesh_health::reporter::Level;

    fn level(reporters: &Reporters, name: &str) -> (Level, String) {
        let r = reporters
            .reports()
            .into_iter()
            .find(|r| r.name == name)
            .unwrap_or_else(|| panic!("no reporter {name}"));
        (r.level, r.reason)
    }

    #[test]
    fn service_export_job_follows_the_crd() {
        let reporters = Reporters::default();
        let c = Components::new(&reporters, true);
        assert_eq!(
            level(&reporters, "export/serviceexports/v1").0,
            Level::Degraded
        );
        c.etcd_up();
        c.exported(&[], false);
        let (l, reason) = level(&reporters, "export/serviceexports/v1");
        assert_eq!(l, Level::Degraded);
        assert!(reason.contains(SERVICE_EXPORT_CRD), "{reason}");
        assert_eq!(level(&reporters, "export/services/v1").0, Level::Ok);
        c.exported(&[], true);
        assert_eq!(level(&reporters, "export/serviceexports/v1").0, Level::Ok);

        c.exported(&["a.yaml:3: bad".into(), "b.yaml: bad".into()], true);
        let (l, reason) = level(&reporters, "source");
        assert_eq!(l, Level::Degraded);
        assert!(reason.starts_with("2 object source problem(s)") && reason.contains("a.yaml:3"));

        c.etcd_down("connection refused");
        assert_eq!(level(&reporters, "etcd").0, Level::Degraded);
        assert_eq!(level(&reporters, "export/nodes/v1").0, Level::Degraded);
        // Without MCS-API the CRD does not matter.
        let reporters = Reporters::default();
        Components::new(&reporters, false).exported(&[], false);
        assert_eq!(level(&reporters, "export/serviceexports/v1").0, Level::Ok);
    }

    #[test]
    fn remotes_come_and_go() {
        let reporters = Reporters::default();
        let mut r = RemoteComponents::default();
        let status = |name: &str, connected, ready| remote::Status {
            name: name.into(),
            connected,
            ready,
            status: "connecting".into(),
            ..Default::default()
        };
        r.update(
            &reporters,
            &[status("c2", false, false), status("c3", true, true)],
        );
        assert_eq!(level(&reporters, "kvstoremesh/c3").0, Level::Ok);
        let (l, reason) = level(&reporters, "kvstoremesh/c2");
        assert_eq!(l, Level::Degraded);
        assert!(reason.starts_with("not connected"), "{reason}");
        r.update(&reporters, &[status("c2", true, true)]);
        assert_eq!(level(&reporters, "kvstoremesh/c2").0, Level::Ok);
        assert!(!reporters
            .reports()
            .iter()
            .any(|x| x.name == "kvstoremesh/c3"));
    }
}
