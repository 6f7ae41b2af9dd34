//! Certificates for ClusterMesh: a CA, the clustermesh-apiserver (etcd) server certificate and
//! the client certificates whose CN is the etcd user (`admin-<c>`, `local-<c>`, `remote`,
//! `remote-<c>`, `root`), plus PEM inspection and rustls configs for mTLS.
//!
//! Layout and names follow Cilium's Helm chart (see the reference notes, section 5): ECDSA
//! P-256 keys, 1095-day validity, CN `clustermesh-apiserver.cilium.io` with SANs
//! `*.mesh.cilium.io`, `clustermesh-apiserver.<ns>.svc`, `127.0.0.1`, `::1`.
//!
//! Rotation without restarts: [`rotate_dir`] re-issues a directory's leaves from the same CA,
//! and [`Reloading`] builds rustls configs that re-read their files when they change, checked
//! at every handshake.
//!
//! This crate must not talk to etcd or Kubernetes, and never writes a private key with a mode
//! other than 0600. TLS configs always use the ring provider explicitly.

mod describe;
mod error;
pub mod expiry;
mod fs;
mod issue;
mod pem;
pub mod reload;
mod rotate;
mod tls;

pub use describe::{describe, describe_all, describe_der, describe_file, rfc3339, CertInfo};
pub use error::{Error, Result};
pub use issue::{
    issue_cluster_set, Ca, CertFiles, ClusterCertSet, Leaf, ServerSpec, CA_CERT_FILE, CA_KEY_FILE,
    DEFAULT_CA_COMMON_NAME, DEFAULT_VALIDITY_DAYS, MESH_WILDCARD, SERVER_NAME,
};
pub use reload::Reloading;
pub use rotate::{rotate_dir, Rotated};
pub use tls::{client_config, load_client_config, provider, server_config};

// Re-exported so callers can name the config types without their own rustls dependency.
pub use rustls;
