//! `clustermesh-cni`: a CNI 1.1 plugin for clusters that want clustermesh as their primary
//! CNI, as Cilium's `cilium-cni` is for Cilium. Per pod interface it creates a veth pair
//! (host side `lxc…`, pod side `CNI_IFNAME`), gives the pod an address from the node's pod
//! CIDR as a /32 behind the link-local gateway [`spec::GATEWAY`] (a permanent neighbour for
//! the host-side veth, so the host side needs no address), and routes the pod's /32 to the
//! veth on the node: exactly the shape the agent discovers as a "ptp-style" pod (a /32
//! route to a veth), so the agent has no special case for its own plugin.
//!
//! Commands: ADD (idempotent per container and interface), DEL (succeeds for what it does
//! not know), CHECK, VERSION, STATUS (ready when the allocation file is writable and an
//! address is free), GC (releases every allocation not in `cni.dev/valid-attachments`).
//! Errors are answered as the spec's error JSON with its codes ([`spec::Code`]).
//!
//! Modules: [`spec`] (wire formats), [`ipam`] (the locked allocation file), [`plugin`]
//! (the commands; the only part that touches the kernel, through `clustermesh-rtnl`).
//!
//! It must not talk to etcd, the agent or the Kubernetes API: everything it needs is in
//! its network configuration, which the deploy step writes into `/etc/cni/net.d`.

pub mod ipam;
pub mod plugin;
pub mod spec;

use std::path::PathBuf;

use spec::Code;

/// Why a command failed; [`Error::code`] is its CNI error code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A `CNI_*` variable is missing or malformed.
    #[error("{0}")]
    Environment(String),
    /// The configuration on stdin is not JSON.
    #[error("the network configuration on stdin is not JSON: {0}")]
    Decode(String),
    /// The configuration's version is not supported.
    #[error("{0}")]
    Version(String),
    /// The configuration is JSON but not a valid `clustermesh-cni` configuration.
    #[error("invalid network configuration: {0}")]
    InvalidConfig(String),
    /// `CNI_NETNS` cannot be opened: the container is gone or never was.
    #[error("network namespace {} of the container cannot be opened: {source}", path.display())]
    NoNetns {
        /// `CNI_NETNS`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: clustermesh_rtnl::Error,
    },
    /// The allocation file.
    #[error(transparent)]
    Ipam(#[from] ipam::Error),
    /// A netlink request failed.
    #[error("{what}: {source}")]
    Netlink {
        /// What the plugin was doing.
        what: String,
        /// The cause.
        #[source]
        source: clustermesh_rtnl::Error,
    },
    /// CHECK found the attachment different from what ADD made.
    #[error("{0}")]
    Check(String),
    /// STATUS: ADD would fail now.
    #[error("{0}")]
    NotAvailable(String),
}

/// `Result` of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The CNI error code.
    pub fn code(&self) -> Code {
        match self {
            Error::Environment(_) => Code::InvalidEnvironment,
            Error::Decode(_) => Code::Decode,
            Error::Version(_) => Code::IncompatibleVersion,
            Error::InvalidConfig(_) => Code::InvalidConfig,
            Error::NoNetns { .. } => Code::UnknownContainer,
            Error::Ipam(ipam::Error::Exhausted { .. }) => Code::AddressesExhausted,
            Error::Ipam(_) | Error::Netlink { .. } => Code::Io,
            Error::Check(_) => Code::CheckFailed,
            Error::NotAvailable(_) => Code::NotAvailable,
        }
    }

    /// The cause chain below the message, for the error JSON's `details`.
    pub fn details(&self) -> String {
        let mut out = Vec::new();
        let mut cur = std::error::Error::source(self);
        while let Some(e) = cur {
            out.push(e.to_string());
            cur = e.source();
        }
        out.join(": ")
    }
}

/// The network configuration file an installer writes into `/etc/cni/net.d/` on a node
/// (the deploy issue's DaemonSet init step: `clustermesh-cni write-config`), checked with
/// the same rules ADD applies, so a bad value fails at install time, not at the first pod.
pub fn network_config(
    pod_cidr: &str,
    state_dir: &str,
    mtu: u32,
    routes: &[String],
) -> Result<serde_json::Value> {
    let v = serde_json::json!({
        "cniVersion": spec::LATEST,
        "name": "clustermesh",
        "type": "clustermesh-cni",
        "podCIDR": pod_cidr,
        "stateDir": state_dir,
        "mtu": mtu,
        "routes": routes,
    });
    let raw: spec::RawConfig =
        serde_json::from_value(v.clone()).map_err(|e| Error::Decode(e.to_string()))?;
    spec::Config::from_raw(raw).map_err(|e| match e {
        spec::ConfigError::Version(m) => Error::Version(m),
        spec::ConfigError::Invalid(m) => Error::InvalidConfig(m),
    })?;
    Ok(v)
}

/// Runs one invocation: the `CNI_*` variables through `var`, the configuration from
/// `stdin`. `Ok` holds what to print on stdout (empty for DEL, GC and STATUS); `Err`
/// holds the version to answer in and the error.
pub fn run(
    var: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> std::result::Result<String, (String, Error)> {
    let env =
        spec::Env::from_vars(var).map_err(|e| (spec::LATEST.to_owned(), Error::Environment(e)))?;
    if env.command == spec::Command::Version {
        return Ok(serde_json::json!({
            "cniVersion": spec::LATEST,
            "supportedVersions": spec::SUPPORTED_VERSIONS,
        })
        .to_string());
    }
    let raw: spec::RawConfig = serde_json::from_slice(stdin)
        .map_err(|e| (spec::LATEST.to_owned(), Error::Decode(e.to_string())))?;
    let version = raw
        .cni_version
        .clone()
        .unwrap_or_else(|| spec::LATEST.to_owned());
    let config = spec::Config::from_raw(raw).map_err(|e| {
        (
            version.clone(),
            match e {
                spec::ConfigError::Version(m) => Error::Version(m),
                spec::ConfigError::Invalid(m) => Error::InvalidConfig(m),
            },
        )
    })?;
    let v = config.cni_version.clone();
    plugin::execute(&env, &config).map_err(|e| (v, e))
}
