//! The Cilium ClusterMesh kvstore v1 schema, as plain Rust types.
//!
//! This crate is the bottom of the workspace: etcd key builders and parsers
//! ([`kvstore`]), the JSON values stored under those keys ([`model`]), identity
//! label strings ([`identity`]), cluster names, cluster IDs and identity ranges
//! ([`cluster`]) and a cluster's pod CIDRs ([`cluster_cidrs`]). Every encoder produces
//! bytes that are identical to what Cilium writes (same field names, order and formats),
//! and every decoder accepts what any supported Cilium version writes.
//!
//! What this crate must not do: any I/O (no etcd, no files, no clocks except the
//! caller-supplied `SystemTime` in [`model::format_rfc3339`]), any logging, or
//! panicking on input. Decoders sit on a trust boundary: they return [`Error`]
//! for any malformed input and are fuzzed (see `fuzz/`).

pub mod cluster;
pub mod cluster_cidrs;
pub mod identity;
pub mod kvstore;
pub mod model;
pub mod tunnel;

mod error;

pub use error::{Error, Result};
