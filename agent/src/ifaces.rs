//! The lab/CNI naming rules the agent relies on (docs/lab-datapath-contract.md) and the
//! interface facts it reads: host-side veth name of a pod, the pod's MAC, and an interface's
//! index and MAC address in the agent's network namespace.
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
use std::net::Ipv4Addr;

/// Longest interface name (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

/// Host-side veth of pod `namespace/name`: `lxc` + the first 11 hex characters of
/// SHA-256(`<namespace>/<name>`).
pub fn host_veth_name(namespace: &str, name: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("{namespace}/{name}").as_bytes(),
    );
    let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("lxc{}", &hex[..11])
}

/// The pod's `eth0` MAC: `0a:58:` + the 4 bytes of its IPv4 (Kubernetes' bridge CNI rule).
pub fn pod_mac(ip: Ipv4Addr) -> [u8; 6] {
    let o = ip.octets();
    [0x0a, 0x58, o[0], o[1], o[2], o[3]]
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_name_rule() {
        // `printf default/p1 | sha256sum` = 399fa1a0ede5f84...
        let n = host_veth_name("default", "p1");
        assert_eq!(n, "lxc399fa1a0ede");
        assert!(n.starts_with("lxc"));
        assert!(n.len() <= IFNAME_MAX);
        assert_ne!(n, host_veth_name("default", "p2"));
    }

    #[test]
    fn mac_rule() {
        assert_eq!(
            Mac(pod_mac(Ipv4Addr::new(10, 1, 2, 11))).to_string(),
            "0a:58:0a:01:02:0b"
        );
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
