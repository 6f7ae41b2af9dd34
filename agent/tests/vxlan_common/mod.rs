//! A VXLAN datagram as it arrives on a node's underlay device, for the BPF_PROG_TEST_RUN
//! suites that feed `from_underlay` (`programs`, `policy_datapath`).

use std::net::Ipv4Addr;

/// Outer Ethernet + IPv4 + UDP + VXLAN around `inner` (an Ethernet frame).
#[derive(Clone)]
pub struct Vxlan {
    /// Outer IPv4 header (20 bytes, or more with options); total length is filled in by
    /// [`Vxlan::frame`], the checksum is left 0 (nothing on the receive path checks it
    /// before the programs).
    pub outer: Vec<u8>,
    pub dport: u16,
    /// The VXLAN flags byte (0x08: valid VNI).
    pub flags: u8,
    pub vni: u32,
    pub inner: Vec<u8>,
}

impl Vxlan {
    /// From `src` to `dst`:`dport`, DF set, VNI `vni`.
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, dport: u16, vni: u32, inner: &[u8]) -> Self {
        let mut outer = vec![0x45, 0, 0, 0, 0x12, 0x34, 0x40, 0, 64, 17, 0, 0];
        outer.extend_from_slice(&src.octets());
        outer.extend_from_slice(&dst.octets());
        Self {
            outer,
            dport,
            flags: 0x08,
            vni,
            inner: inner.to_vec(),
        }
    }

    /// The frame's bytes.
    pub fn frame(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&[0x02, 0, 0, 0, 0x0d, 0x01]); // the node's underlay MAC
        p.extend_from_slice(&[0x02, 0, 0, 0, 0x0d, 0xfe]); // the router
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        let udp_len = (8 + 8 + self.inner.len()) as u16;
        let mut outer = self.outer.clone();
        let total = (outer.len() as u16 + udp_len).to_be_bytes();
        outer[2..4].copy_from_slice(&total);
        p.extend_from_slice(&outer);
        p.extend_from_slice(&51_234u16.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&udp_len.to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no UDP checksum
        let vni = self.vni.to_be_bytes();
        p.extend_from_slice(&[self.flags, 0, 0, 0, vni[1], vni[2], vni[3], 0]);
        p.extend_from_slice(&self.inner);
        p
    }
}
