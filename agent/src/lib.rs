//! The clustermesh node agent (`clustermesh-agent`, one per node): checks that the kernel
//! can run the datapath, loads and pins it, attaches its programs, reads the local cluster
//! and every remote (through KVStoreMesh) from the local etcd, and keeps the eBPF maps equal
//! to that state by diff. Serves `/readyz`, `/healthz`, `/status` and `/metrics`.
//!
//! It must not talk to the Kubernetes API (agents read only etcd, DESIGN.md decision 1) and
//! must not create or configure interfaces: the CNI (or the lab) owns them.
// The datapath needs raw syscalls and BPF; every `unsafe` block carries a `// SAFETY:` note.
#![allow(unsafe_code)]

pub mod app;
pub mod datapath;
pub mod discovery;
pub mod dns;
pub mod flows;
pub mod health;
pub mod ifaces;
pub mod input;
pub mod kernel;
pub mod local;
pub mod nodes;
pub mod observer;
pub mod policy;
pub mod reconcile;
pub mod services;

pub use app::{cleanup, run, Config, RemoteMode, Transmit, UnderlayDev};

/// Errors of the agent.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A setting is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The kernel cannot run the datapath.
    #[error(transparent)]
    Kernel(#[from] kernel::Error),
    /// Loading, pinning, attaching or a map operation failed.
    #[error("datapath")]
    Datapath(#[from] datapath::Error),
    /// The VXLAN device is missing and could not be created.
    #[error(
        "VXLAN device {dev} not found in this network namespace and not created ({why}): \
         create it (ip link add {dev} type vxlan dstport 4789 external; ip link set {dev} up) \
         or give the agent CAP_NET_ADMIN"
    )]
    NoVxlanDevice {
        /// The device name.
        dev: String,
        /// Why creating it failed.
        why: String,
    },
    /// The underlay device named with `--underlay-dev` is missing.
    #[error(
        "--underlay-dev {dev}: no such interface in this network namespace (name the \
         interface that holds --node-ip, or use `auto` or `off`)"
    )]
    NoUnderlayDevice {
        /// The device name.
        dev: String,
    },
    /// The etcd client config is unusable.
    #[error("local etcd config")]
    Etcd(#[from] clustermesh_syncer::Error),
    /// The remote reader refused its configuration.
    #[error("remote cluster reader")]
    Remote(#[from] clustermesh_syncer::remote::Error),
    /// The health server failed.
    #[error("health server on {addr}")]
    Health {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The LB maps are unusable.
    #[error("services")]
    Services(#[from] services::Error),
    /// The DNS server failed.
    #[error("dns server on {addr}")]
    Dns {
        /// The address.
        addr: std::net::SocketAddr,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The netlink notification socket pod discovery follows cannot be opened.
    #[error("netlink notifications (pod discovery)")]
    Netlink(#[source] std::io::Error),
    /// A task panicked.
    #[error("internal error: {0}")]
    Task(String),
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
