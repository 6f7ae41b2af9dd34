//! Interface facts of the agent's own devices (the VXLAN and underlay devices): an
//! interface's index and MAC address, GRO, and which interface holds an address, in the
//! agent's network namespace. Pods' interfaces are found by [`crate::discovery`].
//!
//! Interface facts come from `if_nametoindex`/`if_nameindex` and the `SIOCGIFHWADDR` ioctl,
//! which answer for the calling process's network namespace however it got there
//! (`ip netns exec` remounts `/sys` for the namespace, `nsenter --net` does not; the values
//! are the same as `/sys/class/net/<name>/{ifindex,address}` when sysfs is the namespace's).
//!
//! It must not create, change or delete interfaces.

use std::collections::BTreeSet;
use std::ffi::{CStr, CString};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest interface name (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

/// A MAC address (for display).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An interface in the agent's network namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    /// Interface index.
    pub ifindex: u32,
    /// Hardware address.
    pub mac: [u8; 6],
}

/// Index and MAC of `name`, `None` if there is no such interface.
pub fn lookup(name: &str) -> Option<Interface> {
    if name.is_empty() || name.len() > IFNAME_MAX {
        return None;
    }
    let c = CString::new(name).ok()?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return None;
    }
    Some(Interface {
        ifindex,
        mac: hwaddr(&c)?,
    })
}

fn hwaddr(name: &CStr) -> Option<[u8; 6]> {
    // SAFETY: plain socket creation; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (≤ 15 bytes, checked by the
    // caller, the rest zero); SIOCGIFHWADDR writes only into it.
    let rc = unsafe { libc::ioctl(sock, libc::SIOCGIFHWADDR as _, &mut req) };
    // SAFETY: `sock` is ours.
    unsafe { libc::close(sock) };
    if rc != 0 {
        return None;
    }
    // SAFETY: after a successful SIOCGIFHWADDR the union holds `ifru_hwaddr`.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Some(mac)
}

/// Names of every interface in the agent's network namespace.
pub fn names() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    // SAFETY: returns a heap array terminated by a zero entry, or NULL.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return out;
    }
    let mut p = list;
    // SAFETY: walks the array up to its terminating zero entry; names are NUL-terminated;
    // the array is freed once, after the walk.
    unsafe {
        while (*p).if_index != 0 && !(*p).if_name.is_null() {
            out.insert(CStr::from_ptr((*p).if_name).to_string_lossy().into_owned());
            p = p.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// Whether generic receive offload is on for `name` (`ethtool -k <name>`'s
/// generic-receive-offload), `None` if it cannot be read.
pub fn gro_enabled(name: &str) -> Option<bool> {
    const SIOCETHTOOL: libc::c_ulong = 0x8946;
    const ETHTOOL_GGRO: u32 = 0x2b;
    #[repr(C)]
    struct EthtoolValue {
        cmd: u32,
        data: u32,
    }
    if name.is_empty() || name.len() > IFNAME_MAX {
        return None;
    }
    let mut value = EthtoolValue {
        cmd: ETHTOOL_GGRO,
        data: 0,
    };
    // SAFETY: plain socket creation; the fd is closed below.
    let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if sock < 0 {
        return None;
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (&mut value as *mut EthtoolValue).cast();
    // SAFETY: `req` names the interface (NUL-terminated, ≤ 15 bytes) and points at `value`,
    // which outlives the call; ETHTOOL_GGRO writes only `value.data`.
    let rc = unsafe { libc::ioctl(sock, SIOCETHTOOL as _, &mut req) };
    // SAFETY: `sock` is ours.
    unsafe { libc::close(sock) };
    (rc == 0).then_some(value.data != 0)
}

/// Name of the interface that holds the IPv4 address `ip` in the agent's network namespace
/// (the node's underlay device for its `--node-ip`), `None` if none does.
pub fn with_ipv4(ip: Ipv4Addr) -> Option<String> {
    with_addr(IpAddr::V4(ip))
}

/// Name of the interface that holds the address `ip` (either family) in the agent's network
/// namespace (the underlay device of an IPv6-only node holds its `--node-ip6`).
pub fn with_addr(ip: IpAddr) -> Option<String> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head into `list`; freed once below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return None;
    }
    let mut found = None;
    let mut p = list;
    // SAFETY: walks the linked list getifaddrs returned up to its NULL end; an AF_INET
    // address is a sockaddr_in, an AF_INET6 one a sockaddr_in6; names are NUL-terminated;
    // the list is freed once, after.
    unsafe {
        while !p.is_null() {
            let a = (*p).ifa_addr;
            let addr = if a.is_null() {
                None
            } else {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                }
            };
            if addr == Some(ip) {
                found = Some(CStr::from_ptr((*p).ifa_name).to_string_lossy().into_owned());
                break;
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gro_of_missing_interfaces_is_unknown() {
        assert_eq!(gro_enabled("cm-no-such-if"), None);
        // lo answers (its value is the kernel's business).
        assert!(gro_enabled("lo").is_some());
    }

    #[test]
    fn the_interface_holding_an_address_is_found() {
        assert_eq!(with_ipv4(Ipv4Addr::LOCALHOST).as_deref(), Some("lo"));
        // TEST-NET-3, assigned to nothing here.
        assert_eq!(with_ipv4(Ipv4Addr::new(203, 0, 113, 254)), None);
        assert_eq!(with_addr(Ipv6Addr::LOCALHOST.into()).as_deref(), Some("lo"));
        // The documentation prefix, assigned to nothing here.
        assert_eq!(with_addr("2001:db8::fe".parse().expect("ip")), None);
    }

    #[test]
    fn loopback_is_found() {
        let lo = lookup("lo").expect("lo exists");
        assert_eq!(lo.mac, [0; 6]);
        assert!(names().contains("lo"));
        assert!(lookup("nonexistent0").is_none());
        assert!(lookup("a-name-longer-than-fifteen").is_none());
    }
}
