//! The node's VXLAN device (`--vxlan-dev`, external mode): found, or created when missing.
//!
//! On a Kubernetes node nobody else creates it — the DaemonSet's init step installs the CNI
//! plugin only — so an agent that only looked it up would stop at its first start (as
//! Cilium's agent creates `cilium_vxlan`, ours creates its device). What it creates is what
//! the lab and the docs create by hand: `ip link add <dev> type vxlan dstport <port>
//! external`, up, no learning, with the underlay's MTU less the encapsulation
//! (`clustermesh_types::tunnel`: 50 bytes over IPv4, 70 over IPv6), so an inner frame that
//! fits the device fits the wire.
//!
//! It must not change a device that exists: its port, mode and MTU are the operator's (the
//! lab's, or an earlier agent's), and an agent restart must not touch a device carrying
//! traffic. A device with that name of another kind is refused by the attach that follows.

use std::net::IpAddr;

use clustermesh_rtnl::Socket;
use clustermesh_types::tunnel::{vxlan_mtu, DEFAULT_UNDERLAY_MTU};
use tracing::info;

use crate::ifaces::{self, Interface};

/// The device `name`, created (external mode, `port`, up) if it does not exist; `Err` says
/// why it could not be.
pub fn ensure(name: &str, port: u16, node_addr: IpAddr) -> Result<Interface, String> {
    if let Some(i) = ifaces::lookup(name) {
        return Ok(i);
    }
    let mut sock = Socket::new().map_err(|e| format!("netlink: {e}"))?;
    let underlay = ifaces::with_addr(node_addr);
    let underlay_mtu = match &underlay {
        Some(dev) => sock
            .link_by_name(dev)
            .map_err(|e| format!("reading {dev}: {e}"))?
            .map_or(DEFAULT_UNDERLAY_MTU, |l| l.mtu),
        None => DEFAULT_UNDERLAY_MTU,
    };
    let mtu = vxlan_mtu(underlay_mtu, node_addr.is_ipv4());
    sock.add_vxlan_external(name, port, mtu)
        .map_err(|e| e.to_string())?;
    let created = ifaces::lookup(name)
        .ok_or_else(|| format!("{name} vanished right after it was created"))?;
    sock.set_up(created.ifindex).map_err(|e| e.to_string())?;
    info!(
        dev = name,
        port,
        mtu,
        underlay = underlay.as_deref().unwrap_or("none (1500 assumed)"),
        "created the VXLAN device (external mode)"
    );
    Ok(created)
}
