//! A remote's EndpointSlices (service v2) read from a real etcd: read from the store the
//! remote's `endpointSlicesExportMode` names, validated as strictly as its services (own
//! cluster name and ID, key = `<ns>/<name>`, addresses of the slice's family, a service
//! label), every bad one rejected and counted on its own, the last good value kept.

mod remote_common;

use std::time::Duration;

use clustermesh_syncer::remote::{Change, Event, Resource, ServiceBackends};
use clustermesh_tests::etcd::TestEtcd;
use remote_common::*;

/// `endpointslices-1.expected` of Cilium's `endpointslices.txtar`, compact.
const SLICE: &str = r#"{"cluster":"cluster3","clusterID":3,"namespace":"test","name":"echo-kvlm2","labels":{"kubernetes.io/service-name":"echo"},"addressType":"IPv4","endpoints":[{"addresses":["10.244.1.1"],"conditions":{"ready":true,"serving":true,"terminating":false},"nodeName":"nodeport-worker","zone":"zone1","hints":{"forZones":[{"name":"zone1"}]}},{"addresses":["10.244.1.2"],"conditions":{"ready":false,"serving":false,"terminating":false},"nodeName":"nodeport-worker"}],"ports":[{"name":"http","protocol":"TCP","port":8080}]}"#;

const SLICES: &str = "cilium/state/endpointslices/v1/cluster3";

fn config3(mode: &str) -> String {
    CONFIG3.replace(
        r#""serviceExportsEnabled":false}"#,
        &format!(r#""serviceExportsEnabled":false,"endpointSlicesExportMode":"{mode}"}}"#),
    )
}

/// Cluster 3 as seeded (with a `services/v1` entry), announcing `mode`, with one valid slice
/// and its canary.
async fn seed(etcd: &TestEtcd, mode: &str) -> anyhow::Result<etcd_client::Client> {
    let mut c = etcd.client("root").await?;
    seed_cluster3(&mut c).await?;
    c.put("cilium/cluster-config/cluster3", config3(mode), None)
        .await?;
    c.put(format!("{SLICES}/test/echo-kvlm2"), SLICE, None)
        .await?;
    c.put(
        "cilium/synced/cluster3/cilium/state/endpointslices/v1",
        "2025-01-01T00:00:00Z",
        None,
    )
    .await?;
    Ok(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_endpoint_slices_are_rejected_and_counted() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut c = seed(&etcd, "endpointslices-only").await?;
    let other = |name: &str| SLICE.replace("echo-kvlm2", name);
    for (name, value) in [
        (
            "claims-cluster4",
            other("claims-cluster4").replace(r#""cluster":"cluster3""#, r#""cluster":"cluster4""#),
        ),
        (
            "claims-id4",
            other("claims-id4").replace(r#""clusterID":3"#, r#""clusterID":4"#),
        ),
        ("wrong-key", SLICE.to_string()),
        (
            "bad-address",
            other("bad-address").replace("10.244.1.2", "10.244.1.300"),
        ),
        (
            "v6-in-v4",
            other("v6-in-v4").replace("10.244.1.2", "fd00::2"),
        ),
        (
            "no-service",
            other("no-service").replace("kubernetes.io/service-name", "app"),
        ),
        ("broken", "{\"cluster\":".to_string()),
    ] {
        c.put(format!("{SLICES}/test/{name}"), value, None).await?;
    }

    let mut fx = Fixture::start(|_| {})?;
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(
        (
            s.num_endpoint_slices,
            s.num_shared_services,
            s.config.endpoint_slices_export_mode.as_str()
        ),
        (1, 0, "endpointslices-only"),
        "only the valid slice is served, and no services/v1 from an endpointslices-only remote: {s:?}"
    );
    assert!(s.synced.endpoint_slices && s.synced.services, "{s:?}");
    fx.caches
        .with("cluster3", |cache| {
            let slices = cache.keys(Resource::EndpointSlices);
            assert_eq!(slices, ["test/echo-kvlm2"]);
        })
        .unwrap();
    let m = &fx.metrics;
    for (reason, n) in [
        ("cluster-mismatch", 1),
        ("cluster-id-mismatch", 1),
        ("key-mismatch", 1),
        ("invalid", 3),
        ("malformed", 1),
    ] {
        assert_eq!(m.rejected_count("cluster3", reason), n, "{reason}");
    }

    // While watching: a hostile overwrite of the good slice is not applied (the last good
    // value stays) and a later valid slice still arrives, as the only event.
    fx.clear_events();
    c.put(
        format!("{SLICES}/test/echo-kvlm2"),
        SLICE.replace(r#""clusterID":3"#, r#""clusterID":7"#),
        None,
    )
    .await?;
    c.put(format!("{SLICES}/test/echo-2"), other("echo-2"), None)
        .await?;
    eventually(Duration::from_secs(5), "slice echo-2", || {
        fx.caches
            .with("cluster3", |c| c.len(Resource::EndpointSlices) == 2)
            .unwrap_or(false)
    })
    .await?;
    assert_eq!(m.rejected_count("cluster3", "cluster-id-mismatch"), 2);
    let changes: Vec<_> = fx
        .events()
        .into_iter()
        .filter(|e| matches!(e, Event::Change { .. }))
        .collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        matches!(&changes[0], Event::Change { resource: Resource::EndpointSlices, change: Change::Upsert { .. }, key, .. } if key.ends_with("test/echo-2")),
        "{changes:?}"
    );
    fx.caches
        .with("cluster3", |cache| {
            let good = cache.store(Resource::EndpointSlices).value("test/echo-kvlm2");
            assert!(
                matches!(&good, Some(clustermesh_syncer::remote::Value::EndpointSlice(s)) if s.cluster_id == 3),
                "last good value replaced: {good:?}"
            );
        })
        .unwrap();
    fx.stop().await;
    Ok(())
}

/// A remote that writes both stores (`services-and-endpointslices`) is read from its slices
/// by a consumer of service backends (an agent: one service never arrives twice) and from
/// both by a mirror (KVStoreMesh); one that announces no mode only from `services/v1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_export_mode_picks_the_stores_read() -> anyhow::Result<()> {
    for (mode, policy, want_services, want_slices) in [
        (
            "services-and-endpointslices",
            ServiceBackends::Preferred,
            0,
            1,
        ),
        (
            "services-and-endpointslices",
            ServiceBackends::AsExported,
            1,
            1,
        ),
        ("", ServiceBackends::Preferred, 1, 0),
        ("endpointslices-only", ServiceBackends::AsExported, 0, 1),
    ] {
        let etcd = TestEtcd::start()?;
        let _c = seed(&etcd, mode).await?;
        let mut fx = Fixture::start(|c| c.service_backends = policy)?;
        let s = fx.connect_ready("cluster3", &etcd).await?;
        assert_eq!(
            (s.num_shared_services, s.num_endpoint_slices),
            (want_services, want_slices),
            "mode {mode:?}, {policy:?}: {s:?}"
        );
        fx.stop().await;
    }
    Ok(())
}
