#![no_main]

use clustermesh_types::cluster::ClusterName;
use clustermesh_types::kvstore;
use clustermesh_types::model::{format_rfc3339, parse_rfc3339, Cidr};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    // Parsers accept a key only if the matching builder reproduces it.
    if let Ok((c, n)) = kvstore::parse_node_key(s) {
        assert_eq!(kvstore::node_key(&c, &n), s);
    }
    if let Ok(id) = kvstore::parse_identity_key(s) {
        assert_eq!(
            kvstore::parse_identity_key(&kvstore::identity_key(id)).ok(),
            Some(id)
        );
    }
    if let Ok(ip) = kvstore::parse_ip_key(s) {
        assert_eq!(kvstore::ip_key(&ip), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_service_key(s) {
        assert_eq!(kvstore::service_key(&c, &ns, &n), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_service_export_key(s) {
        assert_eq!(kvstore::service_export_key(&c, &ns, &n), s);
    }
    if let Ok((c, ns, n)) = kvstore::parse_endpoint_slice_key(s) {
        assert_eq!(kvstore::endpoint_slice_key(&c, &ns, &n), s);
    }
    if let Ok(c) = kvstore::parse_cluster_config_key(s) {
        assert_eq!(kvstore::cluster_config_key(&c), s);
    }
    let joined = kvstore::join_key(s.split('/'));
    assert!(!joined.contains("//") && !joined.ends_with('/'));
    let _ = kvstore::state_to_cache(s);

    // Other text decoders that sit next to keys.
    if let Ok(name) = ClusterName::new(s) {
        assert_eq!(name.as_str().parse::<ClusterName>().ok(), Some(name));
    }
    if let Ok(cidr) = s.parse::<Cidr>() {
        assert_eq!(cidr.to_string().parse::<Cidr>().ok(), Some(cidr));
    }
    if let Ok(t) = parse_rfc3339(s) {
        // Second precision: formatting then parsing is stable.
        let text = format_rfc3339(t);
        let again = parse_rfc3339(&text).expect("own timestamp must parse");
        assert_eq!(format_rfc3339(again), text);
    }
});
