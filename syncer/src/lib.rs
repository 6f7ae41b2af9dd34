//! etcd over mTLS for clustermesh: client configuration files, connecting, consistent
//! listing, the leased batched writer with synced canaries, and etcd user/role set-up.
//!
//! This crate is the only home of `etcd-client`. It knows key prefixes only as strings; the
//! meaning of keys and values lives in `clustermesh-types`. It never reads a cluster's
//! source (that is the apiserver's job) and never programs a datapath.

pub mod auth;
pub mod client;
pub mod config;
pub mod failure;
pub mod list;
pub mod metrics;
pub mod remote;
pub mod resolve;
pub mod transport;
pub mod watcher;
pub mod writer;

pub use client::{connect, Client, ConnectConfig};
pub use config::EtcdConfig;
pub use metrics::Metrics;
pub use writer::Writer;

use std::path::PathBuf;

/// Errors of the syncer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An etcd client config file is not valid YAML of the expected shape.
    #[error("etcd config {path} does not parse: {source}")]
    ConfigParse {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_yaml::Error,
    },
    /// An etcd client config file parses but is unusable.
    #[error("etcd config {path}: {reason}")]
    ConfigInvalid {
        /// The file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An endpoint URL is malformed.
    #[error("etcd endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// mTLS needs a file the config does not name.
    #[error("etcd config does not name a file to {what}")]
    MissingTlsFile {
        /// Which file.
        what: &'static str,
    },
    /// Connecting failed.
    #[error("cannot connect to etcd at {endpoints}: {hint}")]
    Connect {
        /// The endpoints dialled.
        endpoints: String,
        /// The kind of failure.
        class: failure::Class,
        /// What to do about it.
        hint: String,
        /// Cause.
        #[source]
        source: etcd_client::Error,
    },
    /// The certificate files named by a config do not load.
    #[error("cannot use the TLS files of {}: {source}", cert.display())]
    Tls {
        /// The certificate file.
        cert: PathBuf,
        /// Cause.
        #[source]
        source: clustermesh_certs::Error,
    },
    /// An operation timed out.
    #[error("{what} timed out talking to etcd at {endpoints}")]
    Timeout {
        /// The operation.
        what: &'static str,
        /// The endpoints.
        endpoints: String,
    },
    /// An etcd request failed.
    #[error("etcd {op} {key:?} failed: {source}")]
    Etcd {
        /// The operation.
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// Cause.
        #[source]
        source: etcd_client::Error,
    },
    /// An etcd request took longer than it may.
    #[error("etcd {op} {key:?} timed out after {after:?}")]
    RequestTimeout {
        /// The operation.
        op: &'static str,
        /// The key or prefix involved.
        key: String,
        /// How long it was given.
        after: std::time::Duration,
    },
    /// A setting is out of range.
    #[error("invalid syncer configuration: {0}")]
    InvalidConfig(String),
    /// A task failed unexpectedly.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Result with the syncer's error.
pub type Result<T, E = Error> = std::result::Result<T, E>;
