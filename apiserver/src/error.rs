//! The apiserver library's errors: what stops [`crate::run`] (or one of its tasks), each
//! saying what failed, where, and what to do. A bad object or manifest is not one of these:
//! it is reported in `/status` and the apiserver keeps serving (see `export::Problem`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Why the apiserver (or one of its tasks) stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A listener (health, metrics) cannot be bound or stopped serving.
    #[error("cannot serve {what} on {addr}: {source}; choose a free address with {flag}")]
    Listen {
        /// `/readyz` or `/metrics`.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The flag that sets it.
        flag: &'static str,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An etcd operation of one of the apiserver's tasks failed (the export reconnects after
    /// it; the message of the cause says what to check).
    #[error("{what}: {source}")]
    Etcd {
        /// What the apiserver was doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: clustermesh_syncer::Error,
    },
    /// KVStoreMesh's reader of the remote clusters failed.
    #[error("{what}: {source}")]
    Remote {
        /// What the apiserver was doing.
        what: &'static str,
        /// Cause.
        #[source]
        source: clustermesh_syncer::remote::Error,
    },
    /// The embedded etcd needs a state dir.
    #[error("the embedded etcd needs --state-dir (its data and certificates live there), or use an existing etcd with --etcd-config")]
    NoStateDir,
    /// The embedded etcd's certificates are missing.
    #[error("no certificates in {}: run `{command}` first", certs.display())]
    NoCertificates {
        /// Where they were looked for.
        certs: PathBuf,
        /// The command that creates them.
        command: String,
    },
    /// The etcd health probe failed while idle (the session reconnects).
    #[error("etcd health probe failed: {0}")]
    Probe(#[source] clustermesh_syncer::Error),
    /// The etcd health probe did not answer in time (the session reconnects).
    #[error("etcd health probe timed out after {0:?}; is etcd overloaded or partitioned?")]
    ProbeTimeout(Duration),
    /// The embedded etcd cannot run.
    #[error(transparent)]
    EmbeddedEtcd(#[from] crate::etcd::Error),
    /// The identity allocations cannot be loaded.
    #[error(transparent)]
    Identity(#[from] crate::identity::Error),
    /// The manifest source cannot run.
    #[error(transparent)]
    Manifests(#[from] crate::source::manifests::Error),
    /// The Kubernetes source has no usable client.
    #[error("kubernetes source: {0}")]
    Kubernetes(#[from] clustermesh_k8s::client::Error),
    /// A task panicked or was aborted (a bug: the log has the panic).
    #[error("{task} task failed: {source}")]
    Task {
        /// Which task.
        task: &'static str,
        /// Cause.
        #[source]
        source: tokio::task::JoinError,
    },
    /// A task that must run as long as its owner ended.
    #[error("{0} ended unexpectedly")]
    Ended(&'static str),
}

/// Result with the library's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds what the apiserver was doing to an etcd error: `client.get(..).await.etcd("…")?`.
pub(crate) trait EtcdContext<T> {
    fn etcd(self, what: &'static str) -> Result<T>;
}

impl<T> EtcdContext<T> for std::result::Result<T, clustermesh_syncer::Error> {
    fn etcd(self, what: &'static str) -> Result<T> {
        self.map_err(|source| Error::Etcd { what, source })
    }
}
