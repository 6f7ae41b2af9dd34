//! The reconciler's local pods: for every pod of this node in the desired state, find its
//! interface in the kernel ([`crate::discovery`]), write its local endpoints entry and
//! attach `from_pod` there; remove the entries and links of pods that are gone (unless
//! removals are held, see [`Reconciler::hold_removals`]).
//!
//! It must not create or configure interfaces: the CNI owns them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use clustermesh_ebpf_abi::EndpointInfo;
use tracing::{info, warn};

use super::{Reconciler, Skipped};
use crate::datapath::{Attached, Program};
use crate::discovery;

#[derive(Debug, Clone)]
pub(super) struct PodState {
    pub(super) found: Option<discovery::Found>,
    pub(super) attached: bool,
    pub(super) state: String,
}

impl Reconciler {
    /// Brings local endpoints and `from_pod` attachments in line with the local pods and
    /// what the kernel holds now (see [`crate::discovery`]). Call when interfaces, routes
    /// or neighbours change.
    pub fn sync_pods(&mut self) {
        let mut want: HashMap<Ipv4Addr, EndpointInfo> = HashMap::new();
        let mut states = BTreeMap::new();
        let mut wanted_ifs: BTreeSet<String> = BTreeSet::new();
        let snapshot = match self.rtnl.as_mut().map(discovery::Snapshot::read) {
            Some(Ok(s)) => Ok(s),
            Some(Err(error)) => Err(format!("reading the kernel's interfaces failed: {error}")),
            None => Err("no netlink socket".to_owned()),
        };
        let mut snapshot = match snapshot {
            Ok(s) => s,
            Err(why) => {
                // Keep what is attached and programmed; try again on the next change.
                warn!(%why, "pod discovery skipped");
                self.stats.errors += 1;
                return;
            }
        };
        for (ip, pod) in &self.pods {
            let found = match self.rtnl.as_mut() {
                Some(sock) => snapshot.find(sock, *ip),
                None => Err("no netlink socket".to_owned()),
            };
            let found = match found {
                Ok(f) => f,
                Err(why) => {
                    states.insert(
                        *ip,
                        PodState {
                            found: None,
                            attached: false,
                            state: format!("waiting-for-interface: {why}"),
                        },
                    );
                    continue;
                }
            };
            wanted_ifs.insert(found.interface.clone());
            want.insert(
                *ip,
                EndpointInfo {
                    ifindex: found.ifindex,
                    identity: pod.identity,
                    flags: 0,
                    pod_mac: found.pod_mac,
                    host_mac: found.host_mac,
                },
            );
            let (attached, state) = match self.dp.attach(Program::FromPod, &found.interface) {
                Ok(how) => {
                    match how {
                        Attached::Created => self.stats.attach_created += 1,
                        Attached::Replaced => self.stats.attach_replaced += 1,
                        Attached::Unchanged => {}
                    }
                    if how != Attached::Unchanged {
                        info!(pod = %format!("{}/{}", pod.namespace, pod.name), interface = %found.interface, found_by = ?found.how, ?how, "from_pod attached");
                    }
                    (true, "attached".to_owned())
                }
                Err(error) => {
                    warn!(interface = %found.interface, %error, "attach from_pod failed; retrying when interfaces change");
                    (false, format!("attach failed: {error}"))
                }
            };
            states.insert(
                *ip,
                PodState {
                    found: Some(found),
                    attached,
                    state,
                },
            );
        }
        wanted_ifs.extend(self.discover_v6_only(&mut snapshot));
        // Veths nobody is behind: never attached to, counted.
        let mut skipped: Vec<String> = snapshot
            .veths()
            .filter(|l| !wanted_ifs.contains(&l.name) && !self.own_devices.contains(&l.name))
            .map(|l| l.name.clone())
            .collect();
        skipped.sort();
        self.skipped = Skipped {
            count: skipped.len(),
            interfaces: skipped.into_iter().take(32).collect(),
        };
        // Endpoints: write what changed, remove what no pod (or no veth) backs. Before the
        // local cluster's initial sync the pod list is incomplete: remove nothing then.
        let eps = &mut self.dp.maps.local_endpoints;
        for (ip, info) in &want {
            if self.applied_eps.get(ip) == Some(info) {
                continue;
            }
            match eps.upsert_v4(*ip, *info) {
                Ok(()) => {
                    self.stats.endpoint_upserts += 1;
                    self.applied_eps.insert(*ip, *info);
                }
                Err(error) => {
                    warn!(%ip, %error, "local endpoint update failed");
                    self.stats.errors += 1;
                }
            }
        }
        let local_synced = self.synced.contains(self.desired.local()) && !self.removals_held;
        let gone: Vec<Ipv4Addr> = self
            .applied_eps
            .keys()
            .filter(|ip| !want.contains_key(ip) && (local_synced || self.pods.contains_key(ip)))
            .copied()
            .collect();
        for ip in gone {
            match eps.remove_v4(ip) {
                Ok(_) => {
                    self.stats.endpoint_deletes += 1;
                    self.applied_eps.remove(&ip);
                }
                Err(error) => {
                    warn!(%ip, %error, "local endpoint delete failed");
                    self.stats.errors += 1;
                }
            }
        }
        // Attachments of pods that went away (ours, and pins an earlier agent left).
        if local_synced {
            let ours: Vec<String> = self
                .dp
                .attachments()
                .into_iter()
                .filter(|(n, p, _)| *p == Program::FromPod && !wanted_ifs.contains(n))
                .map(|(n, _, _)| n)
                .collect();
            for n in ours {
                info!(interface = %n, "pod gone: detaching from_pod");
                if let Err(error) = self.dp.detach(&n) {
                    warn!(interface = %n, %error, "detach failed");
                }
            }
            for (p, n) in self.dp.pinned_links() {
                if p == Program::FromPod && !wanted_ifs.contains(&n) {
                    info!(interface = %n, "removing a stale link pin");
                    if let Err(error) = self.dp.forget_pin(p, &n) {
                        warn!(interface = %n, %error, "remove stale link pin failed");
                    }
                }
            }
        }
        let summary = |m: &BTreeMap<Ipv4Addr, PodState>| -> Vec<(Ipv4Addr, Option<u32>, bool)> {
            m.iter()
                .map(|(ip, s)| (*ip, s.found.as_ref().map(|f| f.ifindex), s.attached))
                .collect()
        };
        self.pods_changed |= summary(&self.pod_state) != summary(&states);
        self.pod_state = states;
        self.sync_pods6();
    }
}
