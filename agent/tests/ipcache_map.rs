//! The ipcache handle against a real LPM trie: batched writes, reads and deletes across
//! batch boundaries (16k elements per syscall), as the reconciler uses them at start-up
//! (adoption) and on every flush. Needs root (CI runs as root).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use clustermesh_agent::datapath::{Config, Datapath};
use clustermesh_agent::reconcile::Prefix;
use clustermesh_ebpf_abi::IpcacheValue;

fn datapath() -> Datapath {
    let config = Config {
        ipcache_max_entries: 65_536,
        local_endpoints_max_entries: 64,
        ..Config::default()
    };
    Datapath::load(&config).expect("load datapath (needs root)")
}

fn prefixes(n: u32) -> Vec<Prefix> {
    let mut out: Vec<Prefix> = (0..n)
        .map(|i| Prefix {
            addr: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 0)) + i),
            bits: 32,
        })
        .collect();
    // Shorter prefixes over the same addresses are separate elements.
    out.push(Prefix {
        addr: Ipv4Addr::new(10, 16, 0, 0),
        bits: 16,
    });
    out.push(Prefix {
        addr: Ipv4Addr::new(10, 0, 0, 0),
        bits: 8,
    });
    out
}

fn read_all(dp: &Datapath) -> BTreeMap<Prefix, u32> {
    dp.maps
        .ipcache
        .entries()
        .expect("read the ipcache")
        .into_iter()
        .map(|(k, v)| (Prefix::from_lpm_key(&k).expect("ipv4 key"), v.sec_identity))
        .collect()
}

#[test]
fn every_element_is_read_back_whatever_the_batch_boundaries() {
    let mut dp = datapath();
    assert!(read_all(&dp).is_empty(), "a fresh map is empty");
    // Fewer than one batch, exactly one batch (the walk ends on a boundary), several.
    for n in [1, 16_384 - 2, 40_000] {
        let prefixes = prefixes(n);
        let keys: Vec<_> = prefixes.iter().map(|p| p.lpm_key()).collect();
        let values: Vec<_> = (0..prefixes.len() as u32)
            .map(IpcacheValue::local)
            .collect();
        dp.maps
            .ipcache
            .update_batch(&keys, &values)
            .expect("batched update");
        assert!(dp.maps.ipcache.batched(), "this kernel batches LPM updates");

        let got = read_all(&dp);
        assert_eq!(got.len(), prefixes.len(), "{n}: every element once");
        for (i, p) in prefixes.iter().enumerate() {
            assert_eq!(got.get(p), Some(&(i as u32)), "{n}: {p}");
        }

        assert_eq!(
            dp.maps.ipcache.delete_batch(&keys).expect("batched delete"),
            keys.len()
        );
        assert_eq!(
            dp.maps.ipcache.delete_batch(&keys).expect("delete again"),
            0,
            "missing keys are skipped"
        );
        assert!(read_all(&dp).is_empty(), "{n}: all deleted");
    }
}
