//! Health reporters: named components of a process (a source watcher, an export job, one
//! KVStoreMesh remote) that each say whether they are ok, degraded or stopped, and why —
//! Cilium's hive health model, which its scenario scripts query with `health` and
//! `health/ok`.
//!
//! [`Reporters`] is the registry a process keeps (its [`Reporters::reports`] go into the
//! process's `/status`, its gauge family into `/metrics`); each component holds a
//! [`Reporter`] for its own name. This module only records what components say; which
//! components exist and what makes them degraded is the caller's.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;

/// A component's level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Working.
    Ok,
    /// Running, but not doing all of its job (the reason says what is missing).
    Degraded,
    /// Not running.
    Stopped,
}

impl Level {
    const ALL: [Level; 3] = [Level::Ok, Level::Degraded, Level::Stopped];

    /// `ok`, `degraded` or `stopped`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Degraded => "degraded",
            Level::Stopped => "stopped",
        }
    }
}

/// One component's state, as `/status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// Component name, e.g. `export/serviceexports`.
    pub name: String,
    /// Its level.
    pub level: Level,
    /// Why (empty when ok).
    pub reason: String,
    /// When the level last changed (seconds since the Unix epoch).
    pub since: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
    level: String,
}

#[derive(Debug, Default)]
struct Inner {
    reports: Mutex<BTreeMap<String, Report>>,
    /// `component_health{component,level}`: 1 for the current level, 0 for the others.
    gauge: Family<ComponentLabels, Gauge>,
}

/// The registry of a process's health reporters. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Reporters {
    inner: Arc<Inner>,
}

impl Reporters {
    /// A reporter for component `name`, registered as degraded ("starting") until it first
    /// reports. Asking twice for one name gives two handles on the same component.
    pub fn reporter(&self, name: impl Into<String>) -> Reporter {
        let name = name.into();
        let known = self
            .inner
            .reports
            .lock()
            .map(|r| r.contains_key(&name))
            .unwrap_or(true);
        let reporter = Reporter {
            name,
            inner: self.inner.clone(),
        };
        if !known {
            reporter.set(Level::Degraded, "starting".into());
        }
        reporter
    }

    /// Every component's state, by name.
    pub fn reports(&self) -> Vec<Report> {
        self.inner
            .reports
            .lock()
            .map(|r| r.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Registers `component_health{component,level}` (1 for the current level, 0 for the
    /// other two) in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "component_health",
            "Health of each named component: 1 for its current level (ok, degraded, stopped)",
            self.inner.gauge.clone(),
        );
    }
}

/// One component's handle: what it says replaces what it said before.
#[derive(Debug, Clone)]
pub struct Reporter {
    name: String,
    inner: Arc<Inner>,
}

impl Reporter {
    /// The component's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The component works.
    pub fn ok(&self) {
        self.set(Level::Ok, String::new());
    }

    /// The component runs but cannot do all of its job; `reason` says what is missing and,
    /// where it can, what to do.
    pub fn degraded(&self, reason: impl Into<String>) {
        self.set(Level::Degraded, reason.into());
    }

    /// The component no longer runs.
    pub fn stopped(&self, reason: impl Into<String>) {
        self.set(Level::Stopped, reason.into());
    }

    /// Removes the component (e.g. a remote cluster that is no longer configured).
    pub fn remove(self) {
        if let Ok(mut reports) = self.inner.reports.lock() {
            reports.remove(&self.name);
        }
        for level in Level::ALL {
            self.inner.gauge.remove(&ComponentLabels {
                component: self.name.clone(),
                level: level.as_str().into(),
            });
        }
    }

    fn set(&self, level: Level, reason: String) {
        let Ok(mut reports) = self.inner.reports.lock() else {
            return;
        };
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let entry = reports.entry(self.name.clone()).or_insert(Report {
            name: self.name.clone(),
            level,
            reason: String::new(),
            since: now,
        });
        if entry.level != level {
            entry.since = now;
        }
        entry.level = level;
        entry.reason = reason;
        drop(reports);
        for l in Level::ALL {
            self.inner
                .gauge
                .get_or_create(&ComponentLabels {
                    component: self.name.clone(),
                    level: l.as_str().into(),
                })
                .set(i64::from(l == level));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_reasons_metrics_and_removal() {
        let reporters = Reporters::default();
        let mut registry = Registry::default();
        reporters.register(&mut registry);
        let export = reporters.reporter("export/serviceexports");
        let source = reporters.reporter("source/manifests");
        assert_eq!(reporters.reports()[0].level, Level::Degraded);
        assert_eq!(reporters.reports()[0].reason, "starting");

        export.degraded("the ServiceExport CRD is not installed");
        source.ok();
        let json = serde_json::to_string(&reporters.reports()).unwrap();
        assert!(
            json.contains(r#""name":"export/serviceexports","level":"degraded","reason":"the ServiceExport CRD is not installed""#)
                && json.contains(r#""name":"source/manifests","level":"ok","reason":"""#),
            "{json}"
        );
        // A second handle on the same name does not reset it.
        let again = reporters.reporter("source/manifests");
        assert_eq!(again.name(), "source/manifests");
        assert_eq!(reporters.reports()[1].level, Level::Ok);

        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains(
                r#"component_health{component="export/serviceexports",level="degraded"} 1"#
            ) && text
                .contains(r#"component_health{component="export/serviceexports",level="ok"} 0"#),
            "{text}"
        );

        export.ok();
        export.stopped("shutting down");
        assert_eq!(reporters.reports()[0].level, Level::Stopped);
        export.remove();
        assert_eq!(reporters.reports().len(), 1);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(!text.contains("serviceexports"), "{text}");
    }
}
