//! The ipcache near and at capacity, against a real LPM trie of 100 entries: `/status`
//! warns from 90% before any update fails; entries the full map refuses are counted, kept
//! and retried on every flush (never dropped), changes to entries already in the map still
//! go through, and the waiting entries are written once deletes make room. The metrics
//! carry the warning and the refusals. Needs root (CI runs as root).

use std::net::Ipv4Addr;
use std::sync::Arc;

use clustermesh_agent::datapath::{Config, Datapath};
use clustermesh_agent::health::{Metrics, Report as Status};
use clustermesh_agent::input::Input;
use clustermesh_agent::reconcile::{Reconciler, Report};
use clustermesh_types::model::{IpIdentityPair, IpcacheEntry};

const MAX: u32 = 100;
const NODE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);

fn ip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i)
}

/// Remote pod `i` of c2 with identity `id`, as validation hands it on.
fn upsert(i: u32, id: u32) -> Input {
    let entry = IpcacheEntry::new(IpIdentityPair {
        ip: ip(i).to_string().into(),
        host_ip: "198.18.2.11".into(),
        id,
        ..IpIdentityPair::default()
    })
    .expect("a valid entry");
    Input::Endpoint {
        cluster: Arc::from("c2"),
        prefix: entry.prefix,
        entry: Some(Arc::new(entry)),
    }
}

fn delete(i: u32) -> Input {
    Input::Endpoint {
        cluster: Arc::from("c2"),
        prefix: format!("{}/32", ip(i)).parse().expect("cidr"),
        entry: None,
    }
}

fn feed(rec: &mut Reconciler, inputs: impl IntoIterator<Item = Input>) -> Report {
    for i in inputs {
        rec.handle(i);
    }
    rec.flush();
    rec.report()
}

fn in_map(rec: &mut Reconciler) -> usize {
    rec.datapath().maps.ipcache.entries().expect("read").len()
}

fn metrics(report: &Report) -> String {
    let m = Metrics::default();
    m.observe(&Status {
        datapath: report.clone(),
        ..Status::default()
    });
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &m.registry()).expect("encode");
    out
}

#[test]
fn a_full_ipcache_warns_counts_retries_and_catches_up() {
    let dp = Datapath::load(&Config {
        ipcache_max_entries: MAX,
        local_endpoints_max_entries: 64,
        ..Config::default()
    })
    .expect("load datapath (needs root)");
    let mut rec = Reconciler::new(dp, Arc::from("c1"), NODE, MAX, 64).expect("reconciler");

    // 89%: no warning yet.
    let r = feed(&mut rec, (0..89).map(|i| upsert(i, 1000)));
    assert_eq!(r.ipcache.entries, 89);
    assert!(r.ipcache.warning.is_none(), "{:?}", r.ipcache.warning);
    assert!(metrics(&r)
        .contains("cilium_clustermesh_agent_map_capacity_warning{map_name=\"CM_IPCACHE\"} 0"));

    // 90%: warned, nothing refused yet.
    let r = feed(&mut rec, [upsert(89, 1000)]);
    let warning = r.ipcache.warning.clone().expect("a warning at 90%");
    assert!(
        warning.contains("90 of 100") && warning.contains("--ipcache-max-entries"),
        "{warning}"
    );
    assert_eq!(r.stats.ipcache_refused_capacity, 0);
    assert!(metrics(&r)
        .contains("cilium_clustermesh_agent_map_capacity_warning{map_name=\"CM_IPCACHE\"} 1"));

    // 105 wanted, 100 fit: 5 refused, counted and named; no other error.
    let r = feed(&mut rec, (90..105).map(|i| upsert(i, 1000)));
    assert_eq!(in_map(&mut rec), 100);
    assert_eq!(r.ipcache_waiting_for_room, 5);
    assert_eq!(r.stats.ipcache_refused_capacity, 5);
    assert_eq!(r.stats.errors, 0);
    let warning = r.ipcache.warning.clone().expect("warning");
    assert!(warning.contains("5 entries wait for room"), "{warning}");
    let text = metrics(&r);
    assert!(
        text.contains("cilium_clustermesh_agent_ipcache_waiting_for_room 5"),
        "{text}"
    );
    assert!(
        text.contains(
            "cilium_clustermesh_agent_map_operations_total{state=\"ipcache_refused_capacity\"} 5"
        ),
        "{text}"
    );

    // While full, a change to an entry in the map is written, not queued behind them.
    let r = feed(&mut rec, [upsert(3, 2000)]);
    let v = rec
        .datapath()
        .maps
        .ipcache
        .get_v4(ip(3), 32)
        .expect("lookup")
        .expect("present");
    assert_eq!(v.sec_identity, 2000);
    assert_eq!(r.ipcache_waiting_for_room, 5);

    // Every flush retries them (counted again), none is dropped.
    let before = r.stats.ipcache_refused_capacity;
    let r = feed(&mut rec, []);
    assert_eq!(r.stats.ipcache_refused_capacity, before + 5);
    assert_eq!(r.ipcache_waiting_for_room, 5);

    // Deletes make room: the waiting entries are written on the next flush.
    let r = feed(&mut rec, (0..10).map(delete));
    assert_eq!(r.ipcache_waiting_for_room, 0);
    assert_eq!(in_map(&mut rec), 95);
    assert_eq!(r.ipcache.entries, 95);
    for i in 100..105 {
        assert!(
            rec.datapath()
                .maps
                .ipcache
                .get_v4(ip(i), 32)
                .expect("lookup")
                .is_some(),
            "{} written after room was made",
            ip(i)
        );
    }
    assert!(r.ipcache.warning.is_some(), "95% still warns");
    assert_eq!(r.stats.errors, 0);
}
