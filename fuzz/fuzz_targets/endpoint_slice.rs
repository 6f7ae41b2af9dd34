#![no_main]

use clustermesh_types::model::EndpointSlice;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Some(value) = common::round_trip::<EndpointSlice>(data) {
        let _ = value.validate();
        let _ = value.service_name();
    }
});
