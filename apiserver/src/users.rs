//! Cilium's cluster users (`--cluster-users-config-path`, the `clustermesh-remote-users`
//! ConfigMap's `users.yaml`): every `remote-<peer>` user it names exists in the local etcd
//! with role `remote`, and every `remote-<…>` user it no longer names is removed — that is
//! how `clustermesh connect --context` lets a peer's KVStoreMesh in, and `disconnect` shuts
//! it out. The file is re-read every second (a mounted ConfigMap changes in place); a
//! missing file means no peer users.
//!
//! Also Cilium's `etcd-init` for an external etcd (`--etcd-init`, the Deployment's fresh
//! sidecar): users, roles and auth are created once, if the etcd has none.
//!
//! It must not touch `root`, `admin-*`, `local-*` or the legacy `remote` user, and names
//! that are not `remote-<valid cluster name>` are refused (logged), never created.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use clustermesh_syncer::auth::{self, ROLE_REMOTE};
use clustermesh_syncer::{Client, EtcdConfig};
use clustermesh_types::cluster::ClusterName;
use serde::Deserialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    users: Option<Vec<User>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct User {
    name: String,
    role: String,
}

/// The peer users a users file asks for; what is wrong in it is returned too, to be logged.
fn desired(text: &str, local: &str) -> Result<(BTreeSet<String>, Vec<String>), String> {
    let f: File = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = BTreeSet::new();
    let mut refused = Vec::new();
    for u in f.users.unwrap_or_default() {
        let peer = u.name.strip_prefix("remote-").unwrap_or_default();
        if u.role != ROLE_REMOTE || ClusterName::new(peer.to_string()).is_err() {
            refused.push(format!("{} (role {})", u.name, u.role));
        } else if peer != local {
            // Cilium skips the entry naming the local cluster.
            out.insert(u.name);
        }
    }
    Ok((out, refused))
}

async fn connect(cfg: &EtcdConfig) -> clustermesh_syncer::Result<Client> {
    clustermesh_syncer::connect(
        cfg,
        &clustermesh_syncer::ConnectConfig {
            connect_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await
}

/// Cilium's `etcd-init` on an external etcd: if it has no users yet, creates them with their
/// roles and enables auth (as the admin certificate, which has every right while auth is
/// off and role root after). Retries until etcd answers; `up` turns true when done.
pub async fn etcd_init(
    cfg: EtcdConfig,
    cluster: String,
    up: watch::Sender<bool>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let mut delay = Duration::from_millis(200);
    loop {
        let res = async {
            let mut c = connect(&cfg).await?;
            if !auth::auth_enabled(&mut c).await {
                auth::init_cluster_auth(&mut c, &cluster).await?;
                info!(cluster, "etcd-init: users, roles and auth created");
            }
            Ok::<(), clustermesh_syncer::Error>(())
        }
        .await;
        match res {
            Ok(()) => {
                up.send_replace(true);
                return Ok(());
            }
            Err(e) => {
                warn!(error = %e, retry_in = ?delay, "etcd-init: etcd not ready")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}

async fn reconcile(cfg: &EtcdConfig, want: &BTreeSet<String>) -> clustermesh_syncer::Result<()> {
    let mut c = connect(cfg).await?;
    let have: BTreeSet<String> = auth::list_users(&mut c)
        .await?
        .into_iter()
        .filter(|u| u.starts_with("remote-"))
        .collect();
    for u in want.difference(&have) {
        auth::ensure_user(&mut c, u, ROLE_REMOTE).await?;
        info!(user = %u, "cluster user created");
    }
    for u in have.difference(want) {
        auth::remove_user(&mut c, u).await?;
        info!(user = %u, "cluster user removed");
    }
    Ok(())
}

/// Keeps the etcd's `remote-*` users as `path` says, until `cancel`. Waits for `etcd_up`
/// (users and roles in place) before the first change; retries a failed reconcile.
pub async fn run(
    path: PathBuf,
    cfg: EtcdConfig,
    local: String,
    mut etcd_up: watch::Receiver<bool>,
    cancel: CancellationToken,
) -> crate::Result<()> {
    let mut applied: Option<BTreeSet<String>> = None;
    let mut last_text: Option<String> = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {}
        }
        if !*etcd_up.borrow_and_update() {
            // A restarted embedded etcd keeps its data; re-check once it is back.
            applied = None;
            continue;
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => {
                warn!(error = %e, path = %path.display(), "cannot read the cluster users file; keeping the users as they are");
                continue;
            }
        };
        let want = match desired(&text, &local) {
            Ok((want, refused)) => {
                if last_text.as_deref() != Some(text.as_str()) && !refused.is_empty() {
                    warn!(path = %path.display(), refused = %refused.join(", "), "cluster users that are not remote-<cluster name> with role remote are ignored");
                }
                want
            }
            Err(e) => {
                if last_text.as_deref() != Some(text.as_str()) {
                    warn!(path = %path.display(), error = %e, "the cluster users file does not parse; keeping the users as they are");
                }
                last_text = Some(text);
                continue;
            }
        };
        last_text = Some(text);
        if applied.as_ref() == Some(&want) {
            continue;
        }
        match reconcile(&cfg, &want).await {
            Ok(()) => applied = Some(want),
            Err(e) => {
                warn!(error = %e, "cannot update the cluster users in etcd; retrying")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_file_is_read_as_cilium_writes_it() {
        let (want, refused) = desired(
            "users:\n- name: remote-c2\n  role: remote\n- name: remote-c1\n  role: remote\n- name: admin-x\n  role: root\n- name: remote-Bad_Name\n  role: remote\n",
            "c1",
        )
        .unwrap();
        assert_eq!(want.into_iter().collect::<Vec<_>>(), ["remote-c2"]);
        assert_eq!(refused.len(), 2);
        assert!(desired("users: []\n", "c1").unwrap().0.is_empty());
        assert!(desired("", "c1").unwrap().0.is_empty());
        assert!(desired("users: [{name: remote-c2}]", "c1").is_err());
    }
}
