//! The policy side of the agent's reconcile loop: every [`Input`] passes through
//! [`Hook::input`] before the reconciler sees it.
//!
//! Identities (local and remote) and local policies go to the [`Engine`]; the enrichment
//! [`Directory`](crate::flows::Directory) learns identities' labels and pods' names;
//! ipcache entries pass the [`Gate`], which holds an entry until its identity is known. When
//! an identity arrives the engine sees it first, its policy diff is written to the maps, and
//! only then are the entries that waited for it released to the reconciler — so a packet
//! can never meet a programmed address whose identity no selector has matched yet.
//!
//! It must not write the ipcache: released entries go back to the caller.

use std::sync::PoisonError;

use tracing::warn;

use super::gate::Gate;
use super::maps::{PolicyMaps, Verdicts};
use super::{Config, Engine};
use crate::flows::{PodRef, SharedDirectory};
use crate::input::Input;

/// Counters of the hook, for status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Stats {
    /// Known identities.
    pub identities: usize,
    /// Policies that failed to parse (cumulative).
    pub parse_errors: u64,
    /// Policy map writes that failed (cumulative).
    pub map_errors: u64,
    /// ipcache entries held for their identity now.
    pub held: usize,
    /// Packets a default-deny direction let through as replies of tracked connections
    /// (the kernel's `CtReply` counter; filled in by the status tick, 0 from [`Hook::stats`]).
    pub ct_replies: u64,
}

/// See the module docs.
pub struct Hook {
    engine: Engine,
    gate: Gate,
    maps: Option<PolicyMaps>,
    directory: SharedDirectory,
    stats: Stats,
}

impl Hook {
    /// A hook writing to `maps` (`None`: compute only, for tests) and filling `directory`.
    pub fn new(config: Config, maps: Option<PolicyMaps>, directory: SharedDirectory) -> Self {
        Self {
            engine: Engine::new(config),
            gate: Gate::new(),
            maps,
            directory,
            stats: Stats::default(),
        }
    }

    /// The engine (read-only).
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Handles `input`; what the reconciler must see is appended to `out`.
    pub fn input(&mut self, input: Input, out: &mut Vec<Input>) {
        match input {
            Input::Identity {
                cluster,
                id,
                labels,
            } => {
                self.engine
                    .on_identity(&cluster, id, labels.as_ref().map(|i| &i.labels));
                self.directory
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .set_identity(
                        &cluster,
                        id,
                        self.engine
                            .identity(id)
                            .map(|l| l.iter().map(ToString::to_string).collect()),
                    );
                if labels.is_some() {
                    let released = self.gate.identity_added(id);
                    if !released.is_empty() {
                        // The policy for this identity reaches the maps before its
                        // endpoints do.
                        self.flush();
                        for i in released {
                            self.pod(&i);
                            out.push(i);
                        }
                    }
                } else {
                    self.gate.identity_removed(id);
                }
            }
            Input::Policy { key, raw } => {
                let kind = key.split('/').next().unwrap_or_default().to_owned();
                if let Err(error) = self.engine.on_policy_json(&key, &kind, raw.as_deref()) {
                    self.stats.parse_errors += 1;
                    warn!(%error, policy = %key, "policy not applied");
                    // A policy that no longer parses stops applying (as if deleted).
                    let _ = self.engine.on_policy_json(&key, &kind, None);
                }
            }
            other => {
                if let Some(i) = self.gate.admit(other) {
                    self.pod(&i);
                    out.push(i);
                }
            }
        }
    }

    fn pod(&self, input: &Input) {
        let Input::Endpoint {
            cluster,
            prefix,
            entry,
        } = input
        else {
            return;
        };
        // A pod's entry of either family (flow events carry IPv4 or IPv6 addresses).
        let addr = prefix.addr;
        let pod = entry
            .as_ref()
            .filter(|p| !p.k8s_pod_name.is_empty())
            .map(|p| PodRef {
                cluster: cluster.clone(),
                namespace: p.k8s_namespace.to_string(),
                name: p.k8s_pod_name.to_string(),
            });
        self.directory
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .set_pod(addr, pod);
    }

    /// Writes the engine's pending diff to the policy maps. A failed write is counted and
    /// logged; the engine's state is kept, and the next identity or policy change for the
    /// same entries rewrites them.
    pub fn flush(&mut self) {
        let changes = self.engine.take_changes();
        if changes.is_empty() {
            return;
        }
        if let Some(maps) = &mut self.maps {
            if let Err(error) = maps.apply(&changes) {
                self.stats.map_errors += 1;
                warn!(%error, "policy map update failed");
            }
        }
    }

    /// The kernel's verdict and flow counters.
    pub fn verdicts(&self) -> Option<Verdicts> {
        self.maps.as_ref().and_then(|m| m.verdicts().ok())
    }

    /// Counters for status and metrics.
    pub fn stats(&self) -> Stats {
        Stats {
            identities: self.engine.identities(),
            held: self.gate.held(),
            ..self.stats
        }
    }
}
