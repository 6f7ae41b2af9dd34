//! The agent creates its VXLAN device when the node has none, as on a Kubernetes node where
//! nothing else does (`datapath::vxlan_dev`): external mode, the VXLAN port, no learning,
//! up, and the underlay's MTU less the encapsulation of the underlay's family; an existing
//! device is left as it is.
//!
//! The agent runs in a network namespace this test creates (a veth pair as the underlay,
//! MTU 9000) with a private bpffs and no etcd: the bring-up, which creates the device,
//! comes before the etcd config is read, so the agent exits right after it, naming the
//! missing config. Needs root.

#![allow(unsafe_code)] // umount2 of the bpffs this test mounted; SAFETY note below.

mod netns_common;

use std::ffi::CString;
use std::process::Command;

use anyhow::{ensure, Context as _, Result};
use clustermesh_agent::kernel;
use netns_common::run;

const AGENT: &str = env!("CARGO_BIN_EXE_clustermesh-agent");

/// A namespace and a bpffs, both removed on drop.
struct Node {
    ns: String,
    bpffs: tempfile::TempDir,
}

impl Node {
    /// A namespace whose `eth0` (MTU 9000, up) holds `addr`.
    fn new(tag: &str, addr: &str) -> Result<Self> {
        let ns = format!("cmvxd{}-{tag}", std::process::id());
        run(&["ip", "netns", "add", &ns])?;
        let bpffs = tempfile::tempdir()?;
        let node = Node { ns, bpffs };
        let mounted = kernel::ensure_bpffs(node.bpffs.path()).map_err(anyhow::Error::msg)?;
        ensure!(mounted, "fresh temp dir was already bpffs?");
        let ns = node.ns.as_str();
        run(&[
            "ip", "-n", ns, "link", "add", "eth0", "mtu", "9000", "type", "veth", "peer", "name",
            "eth1", "mtu", "9000",
        ])?;
        run(&["ip", "-n", ns, "addr", "add", addr, "dev", "eth0", "nodad"])?;
        run(&["ip", "-n", ns, "link", "set", "eth1", "up"])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        Ok(node)
    }

    /// Runs the agent to the end of its bring-up (it then stops at the missing etcd config);
    /// returns its stderr.
    fn run_agent(&self, node_ip: &[&str]) -> Result<String> {
        let pins = self.bpffs.path().join("pins");
        let out = Command::new("ip")
            .args(["netns", "exec", &self.ns, AGENT])
            .args([
                "--cluster-name",
                "c9",
                "--cluster-id",
                "9",
                "--node-name",
                "n1",
            ])
            .args(node_ip)
            .args(["--etcd-config", "/nonexistent/etcd.yaml"])
            .args(["--clustermesh-config", "/nonexistent/mesh"])
            .args(["--dns-addr", "off"])
            .arg("--bpffs-dir")
            .arg(&pins)
            .output()?;
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        ensure!(
            !out.status.success() && err.contains("/nonexistent/etcd.yaml"),
            "the agent should get through its bring-up and stop at the etcd config:\n{err}"
        );
        Ok(err)
    }

    /// `ip -d -j link show cmvx0`, parsed.
    fn vxlan(&self) -> Result<serde_json::Value> {
        let out = run(&["ip", "-n", &self.ns, "-d", "-j", "link", "show", "cmvx0"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v.get(0).cloned().context("no cmvx0")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Ok(c) = CString::new(self.bpffs.path().as_os_str().as_encoded_bytes()) {
            // SAFETY: unmounting the bpffs this value mounted; pins go with it.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = run(&["ip", "netns", "del", &self.ns]);
    }
}

/// (external, dstport, learning, up, mtu) of a parsed `ip -d -j link` entry.
fn facts(v: &serde_json::Value) -> (bool, u64, bool, bool, u64) {
    let data = &v["linkinfo"]["info_data"];
    (
        data["external"].as_bool().unwrap_or(false),
        data["port"].as_u64().unwrap_or(0),
        data["learning"].as_bool().unwrap_or(true),
        v["flags"]
            .as_array()
            .is_some_and(|f| f.iter().any(|x| x == "UP")),
        v["mtu"].as_u64().unwrap_or(0),
    )
}

#[test]
fn a_missing_vxlan_device_is_created_with_the_underlay_mtu_less_the_encapsulation() -> Result<()> {
    // IPv4 underlay: 9000 - 50.
    let v4 = Node::new("v4", "198.18.9.11/24")?;
    let err = v4.run_agent(&["--node-ip", "198.18.9.11"])?;
    let dev = v4.vxlan()?;
    ensure!(
        dev["linkinfo"]["info_kind"] == "vxlan",
        "cmvx0 is not a VXLAN device: {dev}"
    );
    assert_eq!(
        facts(&dev),
        (true, 4789, false, true, 8950),
        "(external, dstport, learning, up, mtu) of the created device: {dev}\n{err}"
    );
    ensure!(
        err.contains("created the VXLAN device"),
        "the agent should say it created the device:\n{err}"
    );

    // IPv6-only underlay: 9000 - 70.
    let v6 = Node::new("v6", "2001:db8:0:9::11/64")?;
    let err = v6.run_agent(&["--node-ip6", "2001:db8:0:9::11"])?;
    assert_eq!(
        facts(&v6.vxlan()?).4,
        8930,
        "MTU of the device created on an IPv6 underlay:\n{err}"
    );
    Ok(())
}

#[test]
fn an_existing_vxlan_device_is_left_as_it_is() -> Result<()> {
    let node = Node::new("keep", "198.18.9.12/24")?;
    run(&[
        "ip", "-n", &node.ns, "link", "add", "cmvx0", "mtu", "1400", "type", "vxlan", "dstport",
        "4789", "external",
    ])?;
    run(&["ip", "-n", &node.ns, "link", "set", "cmvx0", "up"])?;
    let before = node.vxlan()?["ifindex"].clone();
    let err = node.run_agent(&["--node-ip", "198.18.9.12"])?;
    let dev = node.vxlan()?;
    ensure!(
        dev["ifindex"] == before && dev["mtu"] == 1400,
        "the operator's device was replaced or changed: {dev}\n{err}"
    );
    ensure!(
        !err.contains("created the VXLAN device"),
        "the agent says it created a device that existed:\n{err}"
    );
    Ok(())
}
