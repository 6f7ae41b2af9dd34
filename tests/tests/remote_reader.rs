//! The remote-cluster reader against real etcds written by hand in Cilium's format.

mod remote_common;

use std::time::Duration;

use clustermesh_syncer::remote::{Change, Event, Mode, Resource, Value};
use clustermesh_tests::etcd::TestEtcd;
use remote_common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cilium_format_and_follows_changes() -> anyhow::Result<()> {
    let (etcd, mut c) = seeded_cluster3().await?;
    let mut fx = Fixture::start(|_| {})?;
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(
        (
            s.num_nodes,
            s.num_endpoints,
            s.num_identities,
            s.num_shared_services,
            s.num_service_exports
        ),
        (1, 2, 1, 1, 0),
        "{s:?}"
    );
    assert!(s.connected && s.config.retrieved && s.config.sync_canaries && !s.config.kvstoremesh);
    assert_eq!(s.config.cluster_id, 3);
    assert_eq!(s.config.service_exports_enabled, Some(false));
    assert!(s.status.contains("connected"), "{}", s.status);
    let json = serde_json::to_value(fx.status.borrow().clone())?;
    assert_eq!(json["clusters"][0]["num-shared-services"], 1, "{json}");

    fx.caches
        .with("cluster3", |cache| {
            let n = cache.node("test-node-1").expect("node");
            assert_eq!(n.cluster_id, 3);
            assert_eq!(n.ip_addresses.len(), 4);
            assert_eq!(n.ipv4_health_ip, "10.244.0.134");
            assert_eq!(cache.endpoint("10.244.2.74").expect("pod").id, 199475);
            assert_eq!(
                cache.endpoint("10.244.2.74").unwrap().k8s_pod_name,
                "cep-002"
            );
            // Remote host (1) becomes remote-node (6).
            assert_eq!(cache.endpoint("172.18.0.2").expect("host").id, 6);
            let labels = cache.identity(196915).expect("identity");
            assert_eq!(labels.get("app").unwrap().value, "baz");
            let svc = cache.service("ns-alpha", "echo-service").expect("service");
            assert!(svc.shared && svc.include_external);
            assert_eq!(svc.backends["10.244.1.10"]["http"].port, 8080);
            // The digest of the exact raw bytes is kept (the bytes travel in events).
            assert_eq!(
                cache.get(Resource::Nodes, "test-node-1").unwrap().digest,
                clustermesh_syncer::remote::digest(NODE1.as_bytes())
            );
        })
        .expect("cache");
    let synced: Vec<Resource> = fx
        .events()
        .iter()
        .filter_map(|e| match e {
            Event::Synced { resource, .. } => Some(*resource),
            _ => None,
        })
        .collect();
    assert_eq!(
        synced.len(),
        Resource::ALL.len(),
        "one per resource: {synced:?}"
    );

    // Updates and deletes propagate; full keys are reported.
    fx.clear_events();
    c.put(
        "cilium/state/nodes/v1/cluster3/test-node-2",
        node("cluster3", 3, "test-node-2"),
        None,
    )
    .await?;
    c.delete("cilium/state/identities/v1/id/196915", None)
        .await?;
    let svc2 = SERVICE.replace("\"Port\":8080", "\"Port\":9090");
    c.put(
        "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
        svc2,
        None,
    )
    .await?;
    let caches = fx.caches.clone();
    eventually(Duration::from_secs(5), "updates applied", || {
        caches
            .with("cluster3", |c| {
                c.node("test-node-2").is_some()
                    && c.identity(196915).is_none()
                    && c.service("ns-alpha", "echo-service").unwrap().backends["10.244.1.10"]
                        ["http"]
                        .port
                        == 9090
            })
            .unwrap_or(false)
    })
    .await?;
    let ev = fx.events();
    assert!(ev.iter().any(|e| matches!(e, Event::Change { key, change: Change::Delete { last: Value::Identity(_) }, .. }
        if key == "cilium/state/identities/v1/id/196915")), "{ev:?}");
    assert!(ev.iter().any(|e| matches!(e, Event::Change { key, change: Change::Upsert { value: Value::Node(n), .. }, .. }
        if key == "cilium/state/nodes/v1/cluster3/test-node-2" && n.name == "test-node-2")), "{ev:?}");
    // A rewrite with identical bytes produces no event.
    fx.clear_events();
    c.put(
        "cilium/state/nodes/v1/cluster3/test-node-2",
        node("cluster3", 3, "test-node-2"),
        None,
    )
    .await?;
    c.put(
        "cilium/state/nodes/v1/cluster3/test-node-3",
        node("cluster3", 3, "test-node-3"),
        None,
    )
    .await?;
    // The caches are updated before the event collector takes the event off its channel:
    // wait for the event itself, which comes after any (wrong) event for the rewrite.
    eventually(Duration::from_secs(5), "node 3", || {
        fx.events().iter().any(|e| {
            matches!(e, Event::Change { key, .. } if key == "cilium/state/nodes/v1/cluster3/test-node-3")
        })
    })
    .await?;
    let changes = fx
        .events()
        .iter()
        .filter(|e| matches!(e, Event::Change { .. }))
        .count();
    assert_eq!(changes, 1, "{:?}", fx.events());
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synced_canaries_gate_listing() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    c.put("cilium/cluster-config/cluster3", CONFIG3, None)
        .await?;
    c.put("cilium/state/nodes/v1/cluster3/test-node-1", NODE1, None)
        .await?;
    c.put("cilium/state/identities/v1/id/196915", IDENTITY, None)
        .await?;
    let mut fx = Fixture::start(|_| {})?;
    fx.connect("cluster3", &etcd)?;
    fx.wait_status("cluster3", Duration::from_secs(10), |s| s.config.retrieved)
        .await?;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let s = fx.status.borrow().get("cluster3").cloned().unwrap();
    assert!(
        !s.synced.nodes && !s.ready && s.num_nodes == 0,
        "listed before its canary: {s:?}"
    );
    c.put(
        "cilium/synced/cluster3/cilium/state/nodes/v1",
        "2025-01-01T00:00:00Z",
        None,
    )
    .await?;
    let s = fx
        .wait_status("cluster3", Duration::from_secs(5), |s| s.synced.nodes)
        .await?;
    assert_eq!(s.num_nodes, 1);
    assert!(!s.synced.identities && s.num_identities == 0, "{s:?}");
    write_canaries(&mut c, "cluster3", "state").await?;
    let s = fx.wait_ready("cluster3").await?;
    assert_eq!(s.num_identities, 1);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_cluster_config_is_explained() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    c.put("cilium/cluster-config/cluster9", CONFIG3, None)
        .await?; // wrong name
    let mut fx = Fixture::start(|_| {})?;
    fx.connect("cluster3", &etcd)?;
    // Between retries the status briefly says "connected to …" again; wait for the failure
    // and its explanation together.
    let s = fx
        .wait_status("cluster3", Duration::from_secs(10), |s| {
            s.num_failures > 0
                && s.status
                    .contains("remote cluster configuration required but not found")
        })
        .await?;
    assert!(
        s.status
            .contains("remote cluster configuration required but not found")
            && s.status.contains("cluster name"),
        "{}",
        s.status
    );
    assert!(!s.ready && !s.config.retrieved);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_cluster_ids_are_refused() -> anyhow::Result<()> {
    let a = TestEtcd::start()?;
    let b = TestEtcd::start()?;
    let l = TestEtcd::start()?;
    let mut ca = a.client("root").await?;
    seed_cluster3(&mut ca).await?;
    // cluster4 claims cluster3's ID.
    let mut cb = b.client("root").await?;
    cb.put("cilium/cluster-config/cluster4", CONFIG3, None)
        .await?;
    // cluster5 claims the local cluster's ID; cluster6 a different mesh size.
    let mut cl = l.client("root").await?;
    cl.put(
        "cilium/cluster-config/cluster5",
        CONFIG3.replace("\"id\":3", "\"id\":1"),
        None,
    )
    .await?;
    cl.put(
        "cilium/cluster-config/cluster6",
        CONFIG3
            .replace("\"id\":3", "\"id\":6")
            .replace("255", "511"),
        None,
    )
    .await?;
    cl.put(
        "cilium/cluster-config/cluster7",
        CONFIG3.replace("\"id\":3", "\"id\":0"),
        None,
    )
    .await?;
    let mut fx = Fixture::start(|_| {})?;
    fx.connect_ready("cluster3", &a).await?;
    fx.connect("cluster4", &b)?;
    fx.connect("cluster5", &l)?;
    fx.connect("cluster6", &l)?;
    fx.connect("cluster7", &l)?;
    let s = fx
        .wait_status("cluster4", Duration::from_secs(10), |s| {
            s.num_failures > 0
                && s.status
                    .contains("cluster ID 3 is already used by remote cluster \"cluster3\"")
        })
        .await?;
    assert!(
        s.status
            .contains("cluster ID 3 is already used by remote cluster \"cluster3\""),
        "{}",
        s.status
    );
    let s = fx
        .wait_status("cluster5", Duration::from_secs(10), |s| {
            s.num_failures > 0
                && s.status
                    .contains("assigned to the local cluster \"cluster1\"")
        })
        .await?;
    assert!(
        s.status
            .contains("assigned to the local cluster \"cluster1\""),
        "{}",
        s.status
    );
    let s = fx
        .wait_status("cluster6", Duration::from_secs(10), |s| {
            s.num_failures > 0
                && s.status
                    .contains("max-connected-clusters is 511, local is 255")
        })
        .await?;
    assert!(
        s.status
            .contains("max-connected-clusters is 511, local is 255"),
        "{}",
        s.status
    );
    let s = fx
        .wait_status("cluster7", Duration::from_secs(10), |s| {
            s.num_failures > 0 && s.status.contains("cluster ID 0 is reserved")
        })
        .await?;
    assert!(
        s.status.contains("cluster ID 0 is reserved"),
        "{}",
        s.status
    );
    // cluster3 is unaffected.
    assert!(fx.status.borrow().get("cluster3").unwrap().ready);
    assert!(!fx.status.borrow().ready);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_the_file_drains_and_readding_resyncs() -> anyhow::Result<()> {
    let (etcd, _) = seeded_cluster3().await?;
    let mut fx = Fixture::start(|_| {})?;
    fx.connect_ready("cluster3", &etcd).await?;
    fx.clear_events();
    std::fs::remove_file(fx.path("cluster3"))?;
    eventually(Duration::from_secs(5), "drained", || {
        fx.events()
            .iter()
            .any(|e| matches!(e, Event::Drained { .. }))
    })
    .await?;
    let ev = fx.events();
    let mut deleted: Vec<&str> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Change {
                key,
                change: Change::Delete { .. },
                ..
            } => Some(key.as_str()),
            _ => None,
        })
        .collect();
    deleted.sort();
    assert_eq!(
        deleted,
        vec![
            "cilium/state/identities/v1/id/196915",
            "cilium/state/ip/v1/default/10.244.2.74",
            "cilium/state/ip/v1/default/172.18.0.2",
            "cilium/state/nodes/v1/cluster3/test-node-1",
            "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
        ]
    );
    assert!(
        matches!(ev.last(), Some(Event::Drained { .. })),
        "Drained comes last"
    );
    assert!(fx.caches.get("cluster3").is_none());
    eventually(Duration::from_secs(3), "status gone", || {
        fx.status.borrow().get("cluster3").is_none()
    })
    .await?;
    // The released ID can be used again, and re-adding reads everything again.
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(s.num_endpoints, 2);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_from_another_ca_shows_tls_error() -> anyhow::Result<()> {
    let remote = TestEtcd::start()?;
    let other = TestEtcd::start()?;
    let mut fx = Fixture::start(|_| {})?;
    // The other CA's certificates, pointed at the remote.
    let tmp = fx.dir.path().join(".other.yaml");
    other.write_client_config("remote", &tmp)?;
    let text = std::fs::read_to_string(&tmp)?.replace(&other.endpoint(), &remote.endpoint());
    std::fs::remove_file(&tmp)?;
    write_atomic(&fx.path("cluster3"), |p| Ok(std::fs::write(p, &text)?))?;
    let s = fx
        .wait_status("cluster3", Duration::from_secs(20), |s| {
            s.num_failures > 0
                && (s.status.contains("does not chain to trusted-ca-file")
                    || s.status.contains("TLS"))
        })
        .await?;
    assert!(
        s.status.contains("does not chain to trusted-ca-file") || s.status.contains("TLS"),
        "{}",
        s.status
    );
    assert!(!s.connected);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_aliases_resolve_mesh_names() -> anyhow::Result<()> {
    let (etcd, _) = seeded_cluster3().await?;
    let mut fx = Fixture::start(|_| {})?;
    let tmp = fx.dir.path().join(".c3.yaml");
    etcd.write_client_config("remote", &tmp)?;
    let port = etcd.addr().port();
    let text = std::fs::read_to_string(&tmp)?.replace(
        &etcd.endpoint(),
        &format!("https://cluster3.mesh.cilium.io:{port}"),
    )
        + "cilium-host-aliases:\n- hostname: cluster3.mesh.cilium.io\n  ips: [127.0.0.1]\n";
    std::fs::remove_file(&tmp)?;
    write_atomic(&fx.path("cluster3"), |p| Ok(std::fs::write(p, &text)?))?;
    let s = fx.wait_ready("cluster3").await?;
    assert!(s.status.contains("cluster3.mesh.cilium.io"), "{}", s.status);
    // Without the alias the name does not resolve, and status says so. A special-use
    // `.invalid` name: the resolver answers it itself, no DNS query leaves the machine.
    let text = text.split("cilium-host-aliases").next().unwrap().to_owned();
    let text = text.replace("cluster3.mesh.cilium.io", "cluster3.mesh.invalid");
    write_atomic(&fx.path("cluster3"), |p| Ok(std::fs::write(p, &text)?))?;
    let s = fx
        .wait_status("cluster3", Duration::from_secs(15), |s| {
            s.status.contains("cannot resolve")
        })
        .await?;
    assert!(s.status.contains("cluster3.mesh.invalid"), "{}", s.status);
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kvstoremesh_mode_reads_the_local_cache() -> anyhow::Result<()> {
    let local = TestEtcd::start()?;
    let mut c = local.client("root").await?;
    seed_cached_cluster3(&mut c).await?;
    c.put("cilium/cache/nodes/v1/cluster3/test-node-1", NODE1, None)
        .await?;
    c.put(
        "cilium/cache/identities/v1/cluster3/id/196915",
        IDENTITY,
        None,
    )
    .await?;
    c.put("cilium/cache/ip/v1/cluster3/10.244.2.74", IP_POD, None)
        .await?;
    c.put(
        "cilium/cache/services/v1/cluster3/ns-alpha/echo-service",
        SERVICE,
        None,
    )
    .await?;
    // The local cluster's own state must not be read as cluster3's.
    c.put(
        "cilium/state/ip/v1/default/10.0.0.9",
        ip_entry("10.0.0.9", 65600),
        None,
    )
    .await?;
    write_canaries(&mut c, "cluster3", "cache").await?;
    let cfg_path = local.dir().join("local.yaml");
    local.write_client_config("local-test", &cfg_path)?;
    let local_cfg = clustermesh_syncer::EtcdConfig::load(&cfg_path)?;
    let mut fx = Fixture::start_mode(
        Mode::KvstoreMesh {
            local_etcd: local_cfg,
        },
        |_| {},
    )?;
    // In this mode the file only names the remote.
    write_atomic(&fx.path("cluster3"), |p| {
        Ok(std::fs::write(
            p,
            "endpoints:\n- https://unused.invalid:2379\n",
        )?)
    })?;
    let s = fx.wait_ready("cluster3").await?;
    assert!(s.config.kvstoremesh);
    assert_eq!(
        (
            s.num_nodes,
            s.num_endpoints,
            s.num_identities,
            s.num_shared_services
        ),
        (1, 1, 1, 1)
    );
    let ev = fx.events();
    assert!(ev.iter().any(|e| matches!(e, Event::Change { key, .. } if key == "cilium/cache/ip/v1/cluster3/10.244.2.74")), "{ev:?}");
    fx.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_heartbeat_reconnects_and_ttl_revokes() -> anyhow::Result<()> {
    let (mut etcd, mut c) = seeded_cluster3().await?;
    let mut fx = Fixture::start(|cfg| {
        cfg.heartbeat_timeout = Duration::from_millis(1500);
        cfg.cache_ttl = Some(Duration::from_secs(2));
    })?;
    fx.connect_ready("cluster3", &etcd).await?;
    // Nobody rewrites the heartbeat: the session fails, reconnects, keeps its state.
    let s = fx
        .wait_status("cluster3", Duration::from_secs(10), |s| {
            s.num_failures > 0 && s.status.contains("heartbeat")
        })
        .await?;
    assert!(s.status.contains("heartbeat"), "{}", s.status);
    let s = fx.wait_ready("cluster3").await?;
    assert_eq!(s.num_endpoints, 2, "state kept across the reconnect");
    // Keep the heartbeat alive: no more failures.
    let hb = tokio::spawn(async move {
        loop {
            let _ = c.put("cilium/.heartbeat", "x", None).await;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let before = fx.status.borrow().get("cluster3").unwrap().num_failures;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        fx.status.borrow().get("cluster3").unwrap().num_failures,
        before
    );
    hb.abort();
    // Disconnected longer than the TTL: state is revoked with deletes.
    fx.clear_events();
    etcd.kill();
    eventually(Duration::from_secs(10), "revoked", || {
        fx.caches
            .with("cluster3", |c| c.is_empty())
            .unwrap_or(false)
    })
    .await?;
    let deletes = fx
        .events()
        .iter()
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
    assert_eq!(deletes, 5);
    fx.stop().await;
    Ok(())
}

/// KVStoreMesh mode shares one watch stream among every remote's watches. A consumer that
/// stops reading events must neither stall the other remotes' caches (no head-of-line
/// blocking on the shared stream) nor lose a change: the watch that fell behind is dropped
/// and its resource relisted, so the cache ends exactly like etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_lags_one_watch_without_stalling_the_shared_stream() -> anyhow::Result<()> {
    use tokio_util::sync::CancellationToken;

    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    c.put("cilium/.heartbeat", "x", None).await?;
    for (name, id) in [("cluster3", 3), ("cluster4", 4)] {
        c.put(
            format!("cilium/cluster-config/{name}"),
            format!(r#"{{"id":{id},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#),
            None,
        )
        .await?;
        write_canaries(&mut c, name, "cache").await?;
    }
    let (dir, manager, mut rx) = kvstoremesh_manager(&etcd)?;
    let mut status = manager.status();
    let caches = manager.caches();
    let token = CancellationToken::new();
    let run = tokio::spawn(manager.run(token.child_token()));
    // The consumer reads only while `reading` is true.
    let (reading, mut gate) = tokio::sync::watch::channel(true);
    let consumer = tokio::spawn(async move {
        let mut n = 0usize;
        loop {
            if gate.wait_for(|r| *r).await.is_err() {
                return n;
            }
            match rx.recv().await {
                Some(_) => n += 1,
                None => return n,
            }
        }
    });
    for name in ["cluster3", "cluster4"] {
        add_remote(&dir, name)?;
    }
    tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.clusters.len() == 2 && s.clusters.iter().all(|c| c.ready)),
    )
    .await??;

    // Stall the consumer, then give cluster3's endpoint watch far more responses (one put
    // per request) than it may queue.
    reading.send(false)?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let n = 300;
    for i in 0..n {
        let ip = format!("10.3.{}.{}", i / 256, i % 256);
        c.put(
            format!("cilium/cache/ip/v1/cluster3/{ip}"),
            ip_entry(&ip, 196_608 + 10),
            None,
        )
        .await?;
    }
    for i in 0..n / 2 {
        let ip = format!("10.3.{}.{}", i / 256, i % 256);
        c.delete(format!("cilium/cache/ip/v1/cluster3/{ip}"), None)
            .await?;
    }
    // cluster4 still gets its changes into the cache while cluster3's consumer is stuck.
    c.put(
        "cilium/cache/nodes/v1/cluster4/n4",
        node("cluster4", 4, "n4"),
        None,
    )
    .await?;
    eventually(
        Duration::from_secs(10),
        "cluster4's node in the cache",
        || {
            caches
                .with("cluster4", |cache| cache.node("n4").is_some())
                .unwrap_or(false)
        },
    )
    .await?;

    // Reading again, cluster3 converges to exactly what etcd holds.
    reading.send(true)?;
    let expected: Vec<String> = (n / 2..n)
        .map(|i| format!("10.3.{}.{}", i / 256, i % 256))
        .collect();
    eventually(Duration::from_secs(20), "cluster3's endpoints", || {
        endpoints_are(&caches, "cluster3", &expected)
    })
    .await?;
    token.cancel();
    run.await??;
    drop(reading);
    consumer.abort();
    Ok(())
}

/// A watch that starts from a revision etcd has compacted away is canceled by etcd; the
/// reader relists and sweeps, so nothing written or deleted meanwhile is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_relists() -> anyhow::Result<()> {
    use tokio_util::sync::CancellationToken;

    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    seed_cached_cluster3(&mut c).await?;
    c.put(
        "cilium/cache/ip/v1/cluster3/10.3.0.1",
        ip_entry("10.3.0.1", 196_618),
        None,
    )
    .await?;
    write_canaries(&mut c, "cluster3", "cache").await?;
    let (dir, manager, mut rx) = kvstoremesh_manager(&etcd)?;
    let caches = manager.caches();
    let token = CancellationToken::new();
    let run = tokio::spawn(manager.run(token.child_token()));
    // Nobody reads events yet: the endpoint resource stops in its first emit, after its
    // list and before its watch.
    add_remote(&dir, "cluster3")?;
    eventually(
        Duration::from_secs(10),
        "the first list in the cache",
        || {
            caches
                .with("cluster3", |cache| cache.endpoint("10.3.0.1").is_some())
                .unwrap_or(false)
        },
    )
    .await?;
    for i in 2..12 {
        let ip = format!("10.3.0.{i}");
        c.put(
            format!("cilium/cache/ip/v1/cluster3/{ip}"),
            ip_entry(&ip, 196_618),
            None,
        )
        .await?;
    }
    let rev = c
        .delete("cilium/cache/ip/v1/cluster3/10.3.0.1", None)
        .await?
        .header()
        .map(|h| h.revision())
        .unwrap_or(0);
    c.compact(rev, None).await?;

    let events = tokio::spawn(async move {
        let mut out = Vec::new();
        while let Some(ev) = rx.recv().await {
            out.push(ev);
        }
        out
    });
    let want: Vec<String> = (2..12).map(|i| format!("10.3.0.{i}")).collect();
    eventually(
        Duration::from_secs(20),
        "cluster3's endpoints after the relist",
        || endpoints_are(&caches, "cluster3", &want),
    )
    .await?;
    token.cancel();
    run.await??;
    let events = events.await?;
    assert!(
        events.iter().any(
            |e| matches!(e, Event::Change { key, change: Change::Delete { .. }, .. }
            if key == "cilium/cache/ip/v1/cluster3/10.3.0.1")
        ),
        "{events:?}"
    );
    Ok(())
}

/// A KVStoreMesh-mode manager reading `etcd` as its local cache, for tests that consume
/// the events themselves (an event channel of one, so a stalled consumer shows at once):
/// its config directory, the manager (not running yet) and the event receiver.
fn kvstoremesh_manager(
    etcd: &TestEtcd,
) -> anyhow::Result<(
    tempfile::TempDir,
    clustermesh_syncer::remote::Manager,
    tokio::sync::mpsc::Receiver<Event>,
)> {
    use clustermesh_syncer::remote::{Config, Manager, Metrics};
    let cfg_path = etcd.dir().join("local.yaml");
    etcd.write_client_config("local-test", &cfg_path)?;
    let dir = tempfile::tempdir()?;
    let mut config = Config::new(
        local(),
        dir.path().to_path_buf(),
        Mode::KvstoreMesh {
            local_etcd: clustermesh_syncer::EtcdConfig::load(&cfg_path)?,
        },
    );
    config.event_capacity = 1;
    let (manager, rx) = Manager::new(config, Metrics::default())?;
    Ok((dir, manager, rx))
}

/// Configures remote `name` in the manager's directory (KVStoreMesh mode reads the local
/// cache, so the endpoint is never dialled).
fn add_remote(dir: &tempfile::TempDir, name: &str) -> std::io::Result<()> {
    std::fs::write(
        dir.path().join(name),
        "endpoints:\n- https://unused.invalid:2379\n",
    )
}

/// A heartbeat and cluster3's config as KVStoreMesh mirrors it (`cached: true`).
async fn seed_cached_cluster3(c: &mut etcd_client::Client) -> anyhow::Result<()> {
    c.put("cilium/.heartbeat", "x", None).await?;
    c.put(
        "cilium/cluster-config/cluster3",
        r#"{"id":3,"capabilities":{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}"#,
        None,
    )
    .await?;
    Ok(())
}

/// Whether `cluster`'s cached endpoint keys are exactly `want` (in any order).
fn endpoints_are(
    caches: &clustermesh_syncer::remote::Caches,
    cluster: &str,
    want: &[String],
) -> bool {
    caches
        .with(cluster, |cache| {
            let mut got: Vec<String> = cache.keys(Resource::Endpoints);
            got.sort();
            let mut want = want.to_vec();
            want.sort();
            got == want
        })
        .unwrap_or(false)
}
