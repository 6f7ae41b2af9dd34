#![no_main]

use clustermesh_types::kvstore;
use clustermesh_types::model::IpIdentityPair;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Some(value) = common::round_trip::<IpIdentityPair>(data) {
        // A decoded value must be accepted under the key it names.
        let suffix = value.prefix_string();
        let again = IpIdentityPair::decode_with_key(&suffix, &value.encode());
        assert!(
            again.is_ok(),
            "decode_with_key rejected {suffix:?}: {again:?}"
        );
        let key = kvstore::ip_key(&suffix);
        assert_eq!(
            kvstore::parse_ip_key(&key).ok().as_deref(),
            Some(suffix.as_str())
        );
    }
    // Any key suffix must be handled without panicking.
    let _ = IpIdentityPair::decode_with_key("10.0.0.1", data);
});
