//! Kill a remote's etcd, start a FRESH one (new etcd cluster ID) on the same port with changed
//! data: the reader converges to the new state, with no stale entry, within 2× the backoff cap.
//!
//! Own test binary: it sets `ETCD_INITIAL_CLUSTER_TOKEN` for the restarted etcd (etcd derives
//! its cluster ID from the peer URLs and this token, so a wiped etcd on the same ports would
//! otherwise come back with the same ID).

mod remote_common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clustermesh_syncer::remote::{Change, Event, Resource};
use clustermesh_tests::etcd::TestEtcd;
use remote_common::*;

const CAP: Duration = Duration::from_secs(2);

async fn etcd_cluster_id(etcd: &TestEtcd) -> anyhow::Result<u64> {
    let mut c = etcd.client("root").await?;
    let r = c.get("x", None).await?;
    Ok(r.header().map(|h| h.cluster_id()).unwrap_or(0))
}

fn cache_view(fx: &Fixture) -> BTreeMap<(Resource, String), [u8; 16]> {
    fx.caches
        .with("cluster3", |c| {
            let mut out = BTreeMap::new();
            for r in Resource::ALL {
                c.store(r).read(|m| {
                    for (k, v) in m {
                        out.insert((r, k.to_string()), v.digest);
                    }
                });
            }
            out
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_etcd_with_changed_data_converges_without_stale_entries() -> anyhow::Result<()> {
    let (mut etcd, mut c) = seeded_cluster3().await?;
    let nodes = "cilium/state/nodes/v1/cluster3";
    for n in ["n-keep", "n-change", "n-remove"] {
        c.put(format!("{nodes}/{n}"), node("cluster3", 3, n), None)
            .await?;
    }
    let mut fx = Fixture::start(|cfg| {
        cfg.backoff_min = Duration::from_millis(100);
        cfg.backoff_max = CAP;
    })?;
    let s = fx.connect_ready("cluster3", &etcd).await?;
    assert_eq!(s.num_nodes, 4);
    let old_id = etcd_cluster_id(&etcd).await?;

    etcd.kill();
    fx.wait_status("cluster3", Duration::from_secs(30), |s| !s.connected)
        .await?;
    // Let the backoff grow to its cap while the remote is away.
    tokio::time::sleep(CAP * 3).await;
    assert_eq!(
        cache_view(&fx).len(),
        8,
        "last-known state is kept while disconnected"
    );

    for entry in std::fs::read_dir(etcd.data_dir())? {
        let p = entry?.path();
        if p.is_dir() {
            std::fs::remove_dir_all(&p)?;
        } else {
            std::fs::remove_file(&p)?;
        }
    }
    std::env::set_var("ETCD_INITIAL_CLUSTER_TOKEN", "fresh-cluster-after-wipe");
    fx.clear_events();
    etcd.restart()?;
    let mut c = etcd.client("root").await?;
    let changed = node("cluster3", 3, "n-change").replace("172.18.0.2", "172.18.0.99");
    c.put(format!("{nodes}/test-node-1"), NODE1, None).await?;
    c.put(
        format!("{nodes}/n-keep"),
        node("cluster3", 3, "n-keep"),
        None,
    )
    .await?;
    c.put(format!("{nodes}/n-change"), changed.as_str(), None)
        .await?;
    c.put(format!("{nodes}/n-new"), node("cluster3", 3, "n-new"), None)
        .await?;
    c.put("cilium/state/identities/v1/id/196916", IDENTITY, None)
        .await?;
    c.put("cilium/state/ip/v1/default/10.244.2.74", IP_POD, None)
        .await?;
    c.put(
        "cilium/state/services/v1/cluster3/ns-alpha/echo-service",
        SERVICE,
        None,
    )
    .await?;
    write_canaries(&mut c, "cluster3", "state").await?;
    c.put("cilium/cluster-config/cluster3", CONFIG3, None)
        .await?;
    c.put("cilium/.heartbeat", "x", None).await?;
    let back = Instant::now();
    let new_id = etcd_cluster_id(&etcd).await?;
    assert_ne!(
        old_id, new_id,
        "the restarted etcd must be a new etcd cluster"
    );

    let mut want = BTreeMap::new();
    for (n, v) in [
        ("test-node-1", NODE1.to_owned()),
        ("n-keep", node("cluster3", 3, "n-keep")),
        ("n-change", changed.clone()),
        ("n-new", node("cluster3", 3, "n-new")),
    ] {
        want.insert((Resource::Nodes, n.to_owned()), v.into_bytes());
    }
    want.insert(
        (Resource::Identities, "196916".into()),
        IDENTITY.as_bytes().to_vec(),
    );
    want.insert(
        (Resource::Endpoints, "10.244.2.74".into()),
        IP_POD.as_bytes().to_vec(),
    );
    want.insert(
        (Resource::Services, "ns-alpha/echo-service".into()),
        SERVICE.as_bytes().to_vec(),
    );
    let want: BTreeMap<(Resource, String), [u8; 16]> = want
        .into_iter()
        .map(|(k, v)| (k, clustermesh_syncer::remote::digest(&v)))
        .collect();
    let deadline = back + CAP * 2;
    loop {
        let ready = fx.status.borrow().get("cluster3").is_some_and(|s| s.ready);
        if ready && cache_view(&fx) == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not converged within {:?}: cache {:#?}\nstatus {:?}",
            CAP * 2,
            cache_view(&fx).keys().collect::<Vec<_>>(),
            fx.status.borrow().get("cluster3")
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = back.elapsed();
    println!("converged {took:?} after the fresh etcd had its data (cap {CAP:?})");

    let ev = fx.events();
    let changes: BTreeMap<String, &str> = ev
        .iter()
        .filter_map(|e| match e {
            Event::Change { key, change, .. } => Some((
                key.clone(),
                match change {
                    Change::Upsert { .. } => "upsert",
                    Change::Delete { .. } => "delete",
                },
            )),
            _ => None,
        })
        .collect();
    let expect: BTreeMap<String, &str> = [
        ("cilium/state/nodes/v1/cluster3/n-change", "upsert"),
        ("cilium/state/nodes/v1/cluster3/n-new", "upsert"),
        ("cilium/state/nodes/v1/cluster3/n-remove", "delete"),
        ("cilium/state/identities/v1/id/196915", "delete"),
        ("cilium/state/identities/v1/id/196916", "upsert"),
        ("cilium/state/ip/v1/default/172.18.0.2", "delete"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    assert_eq!(changes, expect, "only real changes produce events");
    fx.stop().await;
    Ok(())
}
