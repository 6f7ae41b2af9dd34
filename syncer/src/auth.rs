//! etcd users and roles, as Cilium's `etcd-init` creates them (reference §1.3).
//!
//! Users authenticate by the CN of their client certificate once auth is enabled. etcd 3.4
//! has no `--no-password`, so each user gets a random password nobody knows.
//!
//! | user | role | may read |
//! |---|---|---|
//! | `root`, `admin-<c>` | root | everything (and write) |
//! | `local-<c>` | local | `cilium/.heartbeat`, `cilium/cache/`, `cilium/cluster-config/`, `cilium/synced/`, and for our agents `cilium/state/` and `clustermesh/local/` |
//! | `remote`, `remote-<peer>` | remote | `cilium/.heartbeat`, `cilium/state/`, `cilium/cluster-config/<c>`, `cilium/synced/<c>/` |

use etcd_client::Permission;
use rand::distr::{Alphanumeric, SampleString};
use tracing::info;

use crate::list::prefix_range_end;
use crate::Client;
use crate::{Error, Result};

/// Role of the local cluster's own agents.
pub const ROLE_LOCAL: &str = "local";
/// Role of remote clusters' readers.
pub const ROLE_REMOTE: &str = "remote";

fn etcd_err<'a>(op: &'static str, key: &'a str) -> impl FnOnce(etcd_client::Error) -> Error + 'a {
    move |source| Error::Etcd {
        op,
        key: key.to_string(),
        source,
    }
}

fn already_exists(e: &etcd_client::Error) -> bool {
    let t = e.to_string();
    t.contains("already exists") || t.contains("already granted")
}

/// The read permissions of a role, as (key, range_end); an empty range_end is one key.
pub fn role_permissions(role: &str, cluster: &str) -> Vec<(String, Vec<u8>)> {
    let prefix = |p: &str| (p.to_string(), prefix_range_end(p));
    let exact = |k: &str| (k.to_string(), Vec::new());
    match role {
        ROLE_LOCAL => vec![
            exact("cilium/.heartbeat"),
            prefix("cilium/cache/"),
            prefix("cilium/cluster-config/"),
            prefix("cilium/synced/"),
            prefix("cilium/state/"),
            prefix("clustermesh/local/"),
        ],
        ROLE_REMOTE => vec![
            exact("cilium/.heartbeat"),
            prefix("cilium/state/"),
            exact(&format!("cilium/cluster-config/{cluster}")),
            prefix(&format!("cilium/synced/{cluster}/")),
        ],
        _ => Vec::new(),
    }
}

async fn ensure_role(client: &mut Client, role: &str, cluster: &str) -> Result<()> {
    let client = &mut client.0;
    if let Err(e) = client.role_add(role).await {
        if !already_exists(&e) {
            return Err(etcd_err("role add", role)(e));
        }
    }
    for (key, end) in role_permissions(role, cluster) {
        let mut perm = Permission::read(key.as_bytes());
        if !end.is_empty() {
            perm = perm.with_range_end(end);
        }
        client
            .role_grant_permission(role, perm)
            .await
            .map_err(etcd_err("role grant-permission", role))?;
    }
    Ok(())
}

/// Creates `name` (if missing) with `role`.
pub async fn ensure_user(client: &mut Client, name: &str, role: &str) -> Result<()> {
    let client = &mut client.0;
    let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
    if let Err(e) = client.user_add(name, password, None).await {
        if !already_exists(&e) {
            return Err(etcd_err("user add", name)(e));
        }
    }
    client
        .user_grant_role(name, role)
        .await
        .map_err(etcd_err("user grant-role", name))?;
    Ok(())
}

/// Whether `role` exists (an error names what failed; a missing role is an error too).
pub async fn get_role(client: &mut Client, role: &str) -> Result<()> {
    client
        .0
        .role_get(role)
        .await
        .map(|_| ())
        .map_err(etcd_err("role get", role))
}

/// Deletes a user if present.
pub async fn remove_user(client: &mut Client, name: &str) -> Result<()> {
    let client = &mut client.0;
    match client.user_delete(name).await {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("not found") => Ok(()),
        Err(e) => Err(etcd_err("user delete", name)(e)),
    }
}

/// The names of every etcd user.
pub async fn list_users(client: &mut Client) -> Result<Vec<String>> {
    Ok(client
        .0
        .user_list()
        .await
        .map_err(etcd_err("user list", ""))?
        .users()
        .to_vec())
}

/// Whether auth is already on (any user with a root cert can ask).
pub async fn auth_enabled(client: &mut Client) -> bool {
    let client = &mut client.0;
    // With auth off, listing users succeeds for anyone; once on, only root may do it — we are
    // root either way, so ask for a user that must exist only after init instead.
    client.user_get("root").await.is_ok()
}

/// Creates Cilium's users and roles for `cluster` and enables auth. Idempotent, so a
/// restarted etcd with a kept data dir passes through it unchanged.
pub async fn init_cluster_auth(client: &mut Client, cluster: &str) -> Result<()> {
    // The built-in role `root` exists implicitly in etcd 3.4 only once added.
    if let Err(e) = client.0.role_add("root").await {
        if !already_exists(&e) {
            return Err(etcd_err("role add", "root")(e));
        }
    }
    ensure_user(client, "root", "root").await?;
    ensure_user(client, &format!("admin-{cluster}"), "root").await?;
    ensure_role(client, ROLE_LOCAL, cluster).await?;
    ensure_role(client, ROLE_REMOTE, cluster).await?;
    ensure_user(client, &format!("local-{cluster}"), ROLE_LOCAL).await?;
    ensure_user(client, "remote", ROLE_REMOTE).await?;
    if let Err(e) = client.0.auth_enable().await {
        if !e.to_string().contains("already") {
            return Err(etcd_err("auth enable", "")(e));
        }
    }
    info!(cluster, "etcd users and roles in place, auth enabled");
    Ok(())
}
