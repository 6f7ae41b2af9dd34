#![no_main]

use clustermesh_types::model::ClusterService;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    // `decode` takes a hand-written fast path where it can; serde is the reference.
    assert_eq!(
        ClusterService::decode(data).ok(),
        serde_json::from_slice::<ClusterService>(data).ok()
    );
    if let Some(value) = common::round_trip::<ClusterService>(data) {
        let _ = value.validate();
    }
});
