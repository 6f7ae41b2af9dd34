//! The agent's datapath bring-up at start: load (or take over the pinned) datapath, attach
//! `from_overlay` to the VXLAN device (created when missing, [`vxlan_dev`]), decide where VXLAN for local pods is received
//! (`from_underlay` on the underlay device when GRO is on there, else the VXLAN device) and
//! attach it, decide how tunnelled packets leave (encapsulated by `from_pod` and redirected
//! to the underlay interface, or through the VXLAN device), and write the tunnel settings
//! if they differ.
//!
//! It must not divide the maps between their owners (the caller hands the LB, policy and
//! flow maps out) or decide what goes into any map but the tunnel settings.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use tracing::info;

use clustermesh_ebpf_abi::tunnel_flags;

use super::{vxlan_dev, AttachMode, Config, Datapath, Program};
use crate::{ifaces, Error, Result};

/// The device `from_underlay` is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnderlayDev {
    /// The interface holding the node's underlay address (`--node-ip`, else `--node-ip6`).
    Auto,
    /// This interface.
    Named(String),
    /// None: every tunnelled packet is received through the VXLAN device.
    Off,
}

/// How `from_pod` sends packets into the tunnel (the agent's `--transmit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transmit {
    /// Encapsulated by the program and redirected to the underlay interface
    /// (`bpf_redirect_neigh`) when there is one; else through the VXLAN device.
    Bpf,
    /// Always through the VXLAN device (tunnel key + redirect).
    Device,
}

/// What the bring-up needs (from the agent's validated settings).
#[derive(Clone, Debug)]
pub struct BringUp {
    /// Pin directory on bpffs.
    pub bpffs_dir: PathBuf,
    /// How programs attach (the kernel check's answer).
    pub attach: AttachMode,
    /// ipcache capacity.
    pub ipcache_max_entries: u32,
    /// Local endpoints capacity.
    pub local_endpoints_max_entries: u32,
    /// The VXLAN device (external mode).
    pub vxlan_dev: String,
    /// Its UDP port (what `from_underlay` decapsulates).
    pub vxlan_port: u16,
    /// Where `from_underlay` goes.
    pub underlay_dev: UnderlayDev,
    /// How tunnelled packets leave.
    pub transmit: Transmit,
    /// This node's IPv4 underlay address; `None` on an IPv6-only node.
    pub node_ip: Option<Ipv4Addr>,
    /// This node's IPv6 underlay address, if any (`from_underlay` decapsulates VXLAN to it;
    /// the source of VXLAN over IPv6).
    pub node_ip6: Option<Ipv6Addr>,
}

/// The datapath, up.
pub struct Up {
    /// The datapath with every map still in it.
    pub dp: Datapath,
    /// The device `from_underlay` is attached to, if any.
    pub underlay: Option<String>,
    /// Where VXLAN is received, and why (for the log and `/status`).
    pub receive_path: String,
    /// How tunnelled packets leave, and why (for the log and `/status`).
    pub transmit_path: String,
}

/// Brings the datapath up; see the module docs.
pub fn bring_up(cfg: &BringUp) -> Result<Up> {
    let mut dp = Datapath::load(&Config {
        pin_dir: Some(cfg.bpffs_dir.clone()),
        ipcache_max_entries: cfg.ipcache_max_entries,
        local_endpoints_max_entries: cfg.local_endpoints_max_entries,
        attach: cfg.attach,
    })?;
    // An IPv6-only node's underlay device is the one holding its IPv6 address.
    let Some(node_addr) = cfg.node_ip.map(IpAddr::V4).or(cfg.node_ip6.map(IpAddr::V6)) else {
        return Err(Error::InvalidConfig(
            "the node needs an underlay address (--node-ip or --node-ip6)".into(),
        ));
    };
    let vx = vxlan_dev::ensure(&cfg.vxlan_dev, cfg.vxlan_port, node_addr).map_err(|why| {
        Error::NoVxlanDevice {
            dev: cfg.vxlan_dev.clone(),
            why,
        }
    })?;
    let how = dp.attach(Program::FromOverlay, &cfg.vxlan_dev)?;
    info!(dev = %cfg.vxlan_dev, ?how, "from_overlay attached");
    let (underlay, receive_path) = receive_path(&cfg.underlay_dev, node_addr);
    // Decapsulation needs the port in the tunnel settings; 0 there turns it off (a pinned
    // from_underlay link left by an earlier agent then passes everything on).
    let port = if underlay.is_some() {
        cfg.vxlan_port
    } else {
        0
    };
    if let Some(dev) = &underlay {
        if ifaces::lookup(dev).is_none() {
            return Err(Error::NoUnderlayDevice { dev: dev.clone() });
        }
        let how = dp.attach(Program::FromUnderlay, dev)?;
        info!(%dev, port, ?how, "from_underlay attached");
    }
    info!(%receive_path, "VXLAN receive path");
    let (tx_ifindex, transmit_path) = transmit_path(cfg.transmit, &cfg.underlay_dev, cfg.node_ip);
    info!(%transmit_path, "VXLAN transmit path");
    let want = (
        vx.ifindex,
        cfg.node_ip.map_or([0; 4], |a| a.octets()),
        port.to_be_bytes(),
        cfg.node_ip6.map_or([0; 16], |a| a.octets()),
    );
    let have = dp.maps.tunnel.get()?;
    if (
        have.vxlan_ifindex,
        have.local_ipv4,
        have.vxlan_port,
        have.local_ipv6,
    ) != want
    {
        dp.maps
            .tunnel
            .set_dual(vx.ifindex, cfg.node_ip, cfg.node_ip6, port)?;
    }
    let have = dp.maps.tunnel.get()?;
    let want_tx = tx_ifindex.map(|i| (i, cfg.vxlan_port));
    let have_tx = (have.flags & tunnel_flags::BPF_TX != 0)
        .then_some((have.underlay_ifindex, u16::from_be_bytes(have.tx_port)));
    if have_tx != want_tx {
        dp.maps.tunnel.set_bpf_tx(want_tx)?;
    }
    Ok(Up {
        dp,
        underlay,
        receive_path,
        transmit_path,
    })
}

/// How tunnelled packets leave: the underlay interface `from_pod` redirects to after
/// encapsulating (`None`: the VXLAN device), and the reason, for the log and `/status`.
///
/// The underlay interface is `--underlay-dev` when named, else the one holding the node's
/// address: `bpf_redirect_neigh` looks up the route and the neighbour of the remote node
/// with that interface as the output device.
fn transmit_path(
    transmit: Transmit,
    underlay: &UnderlayDev,
    node_ip: Option<Ipv4Addr>,
) -> (Option<u32>, String) {
    if transmit == Transmit::Device {
        return (None, "VXLAN device (--transmit device)".to_owned());
    }
    let Some(node_ip) = node_ip else {
        return (
            None,
            "VXLAN device: no IPv4 underlay address (BPF transmit is VXLAN over IPv4)".to_owned(),
        );
    };
    let dev = match underlay {
        UnderlayDev::Named(dev) => Some(dev.clone()),
        UnderlayDev::Auto | UnderlayDev::Off => ifaces::with_ipv4(node_ip),
    };
    let Some(dev) = dev else {
        return (
            None,
            format!(
                "VXLAN device: no interface holds {node_ip} (name the underlay device with \
                 --underlay-dev to transmit in BPF)"
            ),
        );
    };
    match ifaces::lookup(&dev) {
        Some(i) => (
            Some(i.ifindex),
            format!(
                "BPF encapsulation to {dev} (VXLAN over IPv4; over IPv6 and packets above \
                 the MTU of {dev}: VXLAN device)"
            ),
        ),
        None => (
            None,
            format!("VXLAN device: the underlay device {dev} does not exist"),
        ),
    }
}

/// Where VXLAN for local pods is received: the device `from_underlay` goes on (if any), and
/// the reason, for the log and `/status`.
fn receive_path(underlay: &UnderlayDev, node_ip: IpAddr) -> (Option<String>, String) {
    match underlay {
        UnderlayDev::Off => (None, "VXLAN device (--underlay-dev off)".to_owned()),
        UnderlayDev::Named(dev) => (Some(dev.clone()), format!("from_underlay on {dev}")),
        UnderlayDev::Auto => match ifaces::with_addr(node_ip) {
            None => (
                None,
                format!(
                    "VXLAN device: no interface holds {node_ip} (name the underlay device with \
                     --underlay-dev to decapsulate there)"
                ),
            ),
            // Decapsulating before GRO would hand the pods one packet per wire segment,
            // where the VXLAN device aggregates the inner packets itself (gro_cells).
            Some(dev) if ifaces::gro_enabled(&dev) != Some(true) => (
                None,
                format!(
                    "VXLAN device: GRO is off on {dev} (`ethtool -K {dev} gro on`, then \
                     restart the agent, to decapsulate there)"
                ),
            ),
            Some(dev) => {
                let path = format!("from_underlay on {dev}");
                (Some(dev), path)
            }
        },
    }
}
