//! `clustermesh lab up|status|down`: a whole mesh on this machine, in network namespaces.
//!
//! The topology is the one of `docs/lab-datapath-contract.md`:
//!
//! ```text
//!  root ns ── cm-<id> (198.18.0.2, route 198.18.0.0/15 only) ─┐
//!                                                              │
//!  cm-<id>-router: br1 198.18.1.1/24   br2 198.18.2.1/24   …   (ip_forward; one bridge per
//!                   │  │   │              │                    cluster = a VPC/datacenter)
//!      c1-cp ───────┘  │   └── c1-n2     …
//!   198.18.1.2     c1-n1 198.18.1.11
//!   etcd+apiserver  eth0, cmvx0 (VXLAN), agent, lxc… ── c1-n1-p1 (eth0 10.1.1.11, echo :8080)
//! ```
//!
//! Network hygiene (hard rule): every address lives on an interface inside a namespace this
//! module created, except the single root veth; no default route anywhere; nothing is sent
//! to an address the lab did not create. The CLI reaches the lab's services from a thread
//! inside the router namespace, so it works even when the root veth is absent (another lab
//! already routes 198.18.0.0/15). `down` removes namespaces, links, pins, mounts and
//! processes, also after a partial `up`.

pub mod cni;
pub mod echo;
pub mod kubelet;
pub mod load;
pub mod netns;
pub mod plan;
pub mod state;

mod down;
pub(crate) mod install;
mod manifests;
mod network;
mod processes;
mod route_lock;
mod status;
mod up;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::http;
use state::LabState;

pub use down::down;
pub use manifests::{
    in_echo_local, pod_manifest, pod_manifest_without_echo_local, ECHO, ECHO_LOCAL, ECHO_LOCAL_VIP,
    ECHO_LOCAL_VIP6, ECHO_VIP, ECHO_VIP6, SERVICE_PORT,
};
pub use network::netns_resolv_conf;
pub use status::status;
pub use up::{up, UpArgs};

/// Where a lab lives unless `--dir` says otherwise: every command that builds or reads a lab
/// (`lab up|status|down`, `connectivity test`, `observe`) takes `--dir` with this default, so
/// each finds the lab the others made.
pub const DEFAULT_DIR: &str = ".lab";

/// Flags of `lab down` / `lab status`.
#[derive(Debug, clap::Args)]
pub struct DirArgs {
    /// Lab directory.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Output format: `summary` or `json`.
    #[arg(short = 'o', long, default_value = "summary")]
    pub output: String,
}

/// GET on a lab address, from inside the router namespace.
pub fn http_get(st: &LabState, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    netns::run_in(&st.router_ns, || {
        Ok(http::get(addr, path, Duration::from_secs(2))?)
    })
    .ok()
}
