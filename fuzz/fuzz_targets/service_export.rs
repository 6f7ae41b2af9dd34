#![no_main]

use clustermesh_types::model::ServiceExport;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    if let Some(value) = common::round_trip::<ServiceExport>(data) {
        let _ = value.validate();
    }
});
