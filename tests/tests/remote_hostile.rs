//! Hostile and broken entries from a remote are rejected one by one, counted per reason, and
//! never applied; valid entries around them are served and the reader keeps following.
//! IPv6 keys get the same checks, plus a non-canonical address (a second key for a prefix).
//! With the remote's cluster CIDRs in its config file (`cluster-cidr`, written by
//! `connect`), an ipcache entry or node pod CIDR outside them is refused too (issue 16).
//!
//! Own test binary: it raises etcd's request limit (via `ETCD_MAX_REQUEST_BYTES`, read by the
//! etcd the harness starts) so that a real 10 MB value can be stored.

mod remote_common;

use std::time::Duration;

use clustermesh_syncer::remote::{Change, Event, Resource};
use remote_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_entries_are_rejected_and_counted() -> anyhow::Result<()> {
    std::env::set_var("ETCD_MAX_REQUEST_BYTES", (32 * 1024 * 1024).to_string());
    let (etcd, mut c) = seeded_cluster3().await?;
    let nodes = "cilium/state/nodes/v1/cluster3";
    c.put(
        format!("{nodes}/evil-name"),
        node("cluster4", 3, "evil-name"),
        None,
    )
    .await?;
    c.put(
        format!("{nodes}/evil-id"),
        node("cluster3", 4, "evil-id"),
        None,
    )
    .await?;
    c.put(
        format!("{nodes}/wrong-key"),
        node("cluster3", 3, "test-node-9"),
        None,
    )
    .await?;
    c.put("cilium/state/identities/v1/id/70000", IDENTITY, None)
        .await?;
    c.put(
        "cilium/state/identities/v1/id/196916",
        "k8s:app=evil;",
        None,
    )
    .await?;
    c.put(
        "cilium/state/services/v1/cluster3/ns-alpha/broken",
        "{\"cluster\":",
        None,
    )
    .await?;
    c.put("cilium/state/ip/v1/default/10.244.2.99", IP_POD, None)
        .await?;
    c.put(
        "cilium/state/ip/v1/default/10.0.0.1",
        ip_entry("10.0.0.1", 65600),
        None,
    )
    .await?;
    let huge = format!("{}{}", IP_POD, " ".repeat(10 * 1024 * 1024));
    c.put("cilium/state/ip/v1/default/10.244.2.74", huge.clone(), None)
        .await?;
    c.put(
        "cilium/state/ip/v1/default/10.244.2.75",
        ip_entry("10.244.2.75", 199476),
        None,
    )
    .await?;

    // IPv6: the same checks (key mismatch, identity out of range) and a non-canonical
    // address (a second key for one prefix), beside a valid IPv6 entry.
    c.put(
        "cilium/state/ip/v1/default/fd00:10:244:2::99",
        ip_entry("fd00:10:244:2::98", 199476),
        None,
    )
    .await?;
    c.put(
        "cilium/state/ip/v1/default/fd00:10::1",
        ip_entry("fd00:10::1", 65600),
        None,
    )
    .await?;
    c.put(
        "cilium/state/ip/v1/default/FD00:10:244:2::75",
        ip_entry("FD00:10:244:2::75", 199476),
        None,
    )
    .await?;
    c.put(
        "cilium/state/ip/v1/default/fd00:10:244:2::75",
        ip_entry("fd00:10:244:2::75", 199476),
        None,
    )
    .await?;

    let mut fx = Fixture::start(|_| {})?;
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(
        (
            s.num_nodes,
            s.num_identities,
            s.num_endpoints,
            s.num_shared_services
        ),
        (1, 1, 3, 1),
        "only the valid entries are served: {s:?}"
    );
    fx.caches
        .with("cluster3", |cache| {
            assert!(cache.node("test-node-1").is_some());
            assert!(cache.identity(196915).is_some());
            assert!(cache.endpoint("172.18.0.2").is_some());
            assert!(cache.endpoint("10.244.2.75").is_some());
            assert!(cache.endpoint("fd00:10:244:2::75").is_some());
            assert!(cache.endpoint("FD00:10:244:2::75").is_none());
            assert!(
                cache.endpoint("10.244.2.74").is_none(),
                "10 MB value applied"
            );
        })
        .unwrap();
    let m = &fx.metrics;
    for (reason, n) in [
        ("cluster-mismatch", 1),
        ("cluster-id-mismatch", 1),
        ("key-mismatch", 3),
        ("identity-out-of-range", 3),
        ("missing-cluster-label", 1),
        ("malformed", 2),
        ("too-large", 1),
    ] {
        assert_eq!(m.rejected_count("cluster3", reason), n, "{reason}");
    }
    let text = m.render("cilium");
    assert!(
        text.contains(
            r#"cilium_kvstore_remote_rejected_total{cluster="cluster3",reason="too-large"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains("cilium_clustermesh_remote_cluster_readiness_status"),
        "{text}"
    );

    // While watching: a hostile overwrite of a good key is not applied (the last good value
    // stays), a 10 MB value does not break the watch, and later valid changes still arrive.
    // Readiness can be published before the event collector has taken the initial list's
    // events off their channel: wait for the Synced that follows them, or they would be
    // counted below as changes made while watching.
    eventually(Duration::from_secs(5), "initial lists collected", || {
        [Resource::Nodes, Resource::Endpoints].iter().all(|r| {
            fx.events()
                .iter()
                .any(|e| matches!(e, Event::Synced { resource, .. } if resource == r))
        })
    })
    .await?;
    fx.clear_events();
    c.put(
        format!("{nodes}/test-node-1"),
        node("cluster4", 3, "test-node-1"),
        None,
    )
    .await?;
    c.put("cilium/state/ip/v1/default/172.18.0.2", huge, None)
        .await?;
    c.put(
        format!("{nodes}/test-node-2"),
        node("cluster3", 3, "test-node-2"),
        None,
    )
    .await?;
    eventually(Duration::from_secs(5), "node 2", || {
        fx.caches
            .with("cluster3", |c| c.node("test-node-2").is_some())
            .unwrap_or(false)
    })
    .await?;
    fx.caches
        .with("cluster3", |cache| {
            assert_eq!(cache.node("test-node-1").unwrap().cluster, "cluster3");
            assert_eq!(cache.endpoint("172.18.0.2").unwrap().id, 6);
        })
        .unwrap();
    let st = fx.status.borrow().get("cluster3").cloned();
    assert_eq!(
        m.rejected_count("cluster3", "cluster-mismatch"),
        2,
        "{}\n{st:?}",
        m.render("x")
    );
    // Another resource's watch: no ordering with the nodes watch.
    eventually(
        Duration::from_secs(5),
        "10 MB ipcache value rejected",
        || m.rejected_count("cluster3", "too-large") == 2,
    )
    .await?;
    let changes: Vec<_> = fx
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Change { .. }))
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], Event::Change { change: Change::Upsert { .. }, key, .. } if key.ends_with("test-node-2"))
    );
    let s = fx.status.borrow().get("cluster3").cloned().unwrap();
    assert!(s.ready && s.num_failures == 0, "{s:?}");
    fx.stop().await;
    Ok(())
}

/// Issue 16's CIDR rule on the import side: the config file names cluster3's CIDRs (IPv4
/// and IPv6); entries inside are served, entries outside (IPv4, IPv6, the host entry of a
/// node address) are refused, counted as `outside-cluster-cidrs` and never applied, and a
/// node update whose pod CIDR leaves the range keeps the last good node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_outside_the_remote_cluster_cidrs_are_refused() -> anyhow::Result<()> {
    let (etcd, mut c) = seeded_cluster3().await?;
    let ip = "cilium/state/ip/v1/default";
    for addr in ["10.244.2.75", "fd00:10:244:2::75", "10.9.0.1", "fd00:99::1"] {
        c.put(format!("{ip}/{addr}"), ip_entry(addr, 199476), None)
            .await?;
    }
    let mut fx = Fixture::start(|_| {})?;
    write_atomic(&fx.path("cluster3"), |p| {
        etcd.write_client_config("remote", p)?;
        let mut text = std::fs::read_to_string(p)?;
        text.push_str("cluster-cidr: [10.244.0.0/16, \"fd00:10:244::/48\"]\n");
        Ok(std::fs::write(p, text)?)
    })?;
    let s = fx.wait_ready("cluster3").await?;
    assert_eq!((s.num_nodes, s.num_endpoints), (1, 3), "{s:?}");
    fx.caches
        .with("cluster3", |cache| {
            for inside in ["10.244.2.74", "10.244.2.75", "fd00:10:244:2::75"] {
                assert!(cache.endpoint(inside).is_some(), "{inside} served");
            }
            // 172.18.0.2 is the node's host entry: a node address, not a pod's.
            for outside in ["10.9.0.1", "fd00:99::1", "172.18.0.2"] {
                assert!(cache.endpoint(outside).is_none(), "{outside} applied");
            }
            assert!(cache.node("test-node-1").is_some());
        })
        .unwrap();
    let m = &fx.metrics;
    assert_eq!(m.rejected_count("cluster3", "outside-cluster-cidrs"), 3);

    // A node update that widens its IPv6 pod CIDR past the cluster's: refused, the last
    // good node stays.
    let widened = NODE1.replace("//////////8AAAAAAAAAAA==", "//////8AAAAAAAAAAAAAAA==");
    c.put("cilium/state/nodes/v1/cluster3/test-node-1", widened, None)
        .await?;
    eventually(Duration::from_secs(5), "node update refused", || {
        m.rejected_count("cluster3", "outside-cluster-cidrs") == 4
    })
    .await?;
    fx.caches
        .with("cluster3", |cache| {
            let n = cache.node("test-node-1").expect("last good node kept");
            assert_eq!(
                n.ipv6_alloc_cidr.map(|c| c.to_string()).as_deref(),
                Some("fd00:10:244::/64")
            );
        })
        .unwrap();
    let s = fx.status.borrow().get("cluster3").cloned().unwrap();
    assert!(s.ready && s.num_failures == 0, "{s:?}");
    fx.stop().await;
    Ok(())
}

/// A connected remote whose cluster config switches to another max-connected-clusters is
/// refused as at connect time (status with a hint, the failures metric), and keeps serving
/// the state read before the switch; switching back reconnects it. (issue 18: a 511 mesh
/// and a 255 mesh must never read each other's identities.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_size_switch_while_connected_is_refused_and_keeps_the_last_good_state(
) -> anyhow::Result<()> {
    let (etcd, mut c) = seeded_cluster3().await?;
    let mut fx = Fixture::start(|_| {})?;
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(
        (s.num_nodes, s.num_endpoints, s.num_failures),
        (1, 2, 0),
        "{s:?}"
    );

    c.put(
        "cilium/cluster-config/cluster3",
        CONFIG3.replace("255", "511"),
        None,
    )
    .await?;
    let refused = "max-connected-clusters is 511, local is 255";
    let s = fx
        .wait_status("cluster3", Duration::from_secs(10), |s| {
            s.num_failures > 0 && !s.ready && s.status.contains(refused)
        })
        .await?;
    let hint = s.hint.clone().unwrap_or_default();
    assert!(
        hint.contains("--max-connected-clusters 255"),
        "the hint says what to do: {hint:?}"
    );
    // The failures metric counts it.
    let metrics = fx.metrics.render("cilium");
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("cilium_clustermesh_remote_cluster_failures{")
                && l.contains("target_cluster=\"cluster3\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(failures.is_some_and(|n| n >= 1), "{metrics}");
    // Nothing of the last good state is dropped, nor any delete emitted, across the
    // refused reconnects.
    fx.clear_events();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let s = fx.status.borrow().get("cluster3").cloned().unwrap();
    assert!(!s.ready && s.num_failures >= 2, "it keeps refusing: {s:?}");
    assert!(
        s.status.contains(refused) || s.status.starts_with("connected"),
        "{s:?}"
    );
    fx.caches
        .with("cluster3", |cache| {
            assert!(cache.endpoint("10.244.2.74").is_some(), "endpoint kept");
            assert!(cache.node("test-node-1").is_some(), "node kept");
            assert!(cache.identity(196915).is_some(), "identity kept");
        })
        .unwrap();
    let deletes = fx
        .events()
        .into_iter()
        .filter(|e| {
            matches!(
                e,
                Event::Change {
                    change: Change::Delete { .. },
                    ..
                }
            )
        })
        .count();
    assert_eq!(deletes, 0, "no delete while refused");

    // Fixed on the remote: it is read again.
    c.put("cilium/cluster-config/cluster3", CONFIG3, None)
        .await?;
    let s = fx.wait_ready("cluster3").await?;
    assert_eq!((s.num_nodes, s.num_endpoints), (1, 2), "{s:?}");
    fx.stop().await;
    Ok(())
}
