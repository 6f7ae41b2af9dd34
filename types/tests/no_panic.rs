//! Every decoder over thousands of deterministic mutations of the literal
//! inputs: no panics, and whatever decodes re-encodes to something that
//! decodes to the same value (round-trip property).

mod common;

use std::fmt::Debug;

use clustermesh_types::cluster::ClusterName;
use clustermesh_types::identity::{Label, LabelArray};
use clustermesh_types::kvstore;
use clustermesh_types::model::{
    parse_rfc3339, Cidr, ClusterConfig, ClusterService, EndpointSlice, IpIdentityPair, Node,
    ServiceExport, Value,
};
use common::*;

/// xorshift64*: small, deterministic, no extra crates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u8] = b"\"{}[]:,/;=0-9nulltrue\\\xff\x00 .+eE";

fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..=rng.below(4) {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = INTERESTING[rng.below(INTERESTING.len())];
            }
            2 => v.truncate(rng.below(len + 1)),
            3 => {
                let i = rng.below(len + 1);
                let b = INTERESTING[rng.below(INTERESTING.len())];
                v.insert(i, b);
            }
            4 if len > 0 => {
                let start = rng.below(len);
                let end = (start + rng.below(16)).min(len);
                v.drain(start..end);
            }
            5 if len > 0 => {
                let start = rng.below(len);
                let end = (start + rng.below(32)).min(len);
                let chunk = v[start..end].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, chunk);
            }
            _ => {
                let i = rng.below(len + 1);
                v.insert(i, rng.next() as u8);
            }
        }
    }
    v
}

fn check_value<T: Value + PartialEq + Debug>(bytes: &[u8]) -> bool {
    match T::decode(bytes) {
        Ok(v) => {
            let encoded = v.encode();
            let again = T::decode(&encoded)
                .unwrap_or_else(|e| panic!("{}: re-decode failed: {e:?}\n{v:?}", T::KIND));
            assert_eq!(again, v, "{}: round trip changed the value", T::KIND);
            assert_eq!(again.encode(), encoded, "{}: encoding not stable", T::KIND);
            true
        }
        Err(e) => {
            assert!(e.to_string().contains(T::KIND), "{e}");
            false
        }
    }
}

fn check_text(bytes: &[u8]) {
    let s = String::from_utf8_lossy(bytes);
    if let Ok(arr) = LabelArray::parse_kvstore(&s) {
        let text = arr.to_kvstore_string();
        let again = LabelArray::parse_kvstore(&text).expect("re-parse label string");
        assert_eq!(again, arr);
        assert!(text.is_empty() || text.ends_with(';'));
    }
    if let Ok(l) = Label::parse(&s) {
        assert_eq!(Label::parse(&l.to_string()).expect("re-parse label"), l);
    }
    if let Ok(c) = s.parse::<Cidr>() {
        assert_eq!(c.to_string().parse::<Cidr>().expect("re-parse cidr"), c);
    }
    if let Ok(n) = ClusterName::new(s.as_ref()) {
        assert_eq!(n.as_str(), s);
    }
    let _ = parse_rfc3339(&s);
    if let Ok((c, n)) = kvstore::parse_node_key(&s) {
        assert_eq!(kvstore::node_key(&c, &n), s);
    }
    if let Ok(id) = kvstore::parse_identity_key(&s) {
        assert_eq!(
            kvstore::parse_identity_key(&kvstore::identity_key(id)).ok(),
            Some(id)
        );
    }
    if let Ok(ip) = kvstore::parse_ip_key(&s) {
        assert_eq!(kvstore::ip_key(&ip), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_service_key(&s) {
        assert_eq!(kvstore::service_key(&c, &ns, &n), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_service_export_key(&s) {
        assert_eq!(kvstore::service_export_key(&c, &ns, &n), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_endpoint_slice_key(&s) {
        assert_eq!(kvstore::endpoint_slice_key(&c, &ns, &n), s);
    }
    let _ = kvstore::parse_cluster_config_key(&s);
    let _ = kvstore::join_key(s.split('/'));
    let _ = kvstore::state_to_cache(&s);
}

fn check_all_values(bytes: &[u8]) -> usize {
    let mut ok = 0;
    ok += usize::from(check_value::<ClusterConfig>(bytes));
    ok += usize::from(check_value::<Node>(bytes));
    ok += usize::from(check_value::<IpIdentityPair>(bytes));
    ok += usize::from(check_value::<ClusterService>(bytes));
    ok += usize::from(check_value::<ServiceExport>(bytes));
    ok += usize::from(check_value::<EndpointSlice>(bytes));
    if let Ok(s) = EndpointSlice::decode(bytes) {
        let _ = s.validate();
        let _ = s.service_name();
    }
    let _ = IpIdentityPair::decode_with_key("10.244.2.74", bytes);
    if let Ok(n) = Node::decode(bytes) {
        let _ = n.validate();
    }
    if let Ok(s) = ClusterService::decode(bytes) {
        let _ = s.validate();
    }
    // `decode` takes a hand-written fast path where it can; serde is the reference.
    assert_eq!(
        ClusterService::decode(bytes).ok(),
        serde_json::from_slice::<ClusterService>(bytes).ok(),
        "fast and serde decoding disagree on {:?}",
        String::from_utf8_lossy(bytes)
    );
    if let Ok(e) = ServiceExport::decode(bytes) {
        let _ = e.validate();
    }
    ok
}

#[test]
fn decoders_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut decoded = 0;
    let mut runs = 0;
    for literal in JSON_VALUES {
        decoded += check_all_values(literal.as_bytes());
        for _ in 0..1500 {
            let m = mutate(&mut rng, literal.as_bytes());
            decoded += check_all_values(&m);
            check_text(&m);
            runs += 1;
        }
    }
    for literal in [
        IDENTITY_1,
        IDENTITY_2,
        "reserved:host;",
        "k8s:a=b=c;any:x:y=",
    ]
    .iter()
    .chain(KEYS)
    .chain(&["10.244.0.0/24", "fd00::/64", "2026-01-01T00:00:00.5+01:00"])
    {
        check_text(literal.as_bytes());
        for _ in 0..1500 {
            check_text(&mutate(&mut rng, literal.as_bytes()));
            runs += 1;
        }
    }
    assert!(runs > 20_000);
    // The mutations must not be so aggressive that nothing ever decodes.
    assert!(decoded > 100, "only {decoded} mutated values decoded");
}
