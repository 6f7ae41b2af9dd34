//! `net.IPNet` as Cilium stores it: `{"IP":"10.244.0.0","Mask":"////AA=="}`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{mask_bytes, mask_prefix_len};
use crate::{Error, Result};

/// An IP prefix such as `10.244.0.0/24`.
///
/// Encodes like Go's `net.IPNet`: `{"IP":"10.244.0.0","Mask":"////AA=="}` with
/// the mask as base64 of 4 (IPv4) or 16 (IPv6) bytes. Decodes that form or a
/// plain `"10.244.0.0/24"` string; non-contiguous masks are rejected.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct Cidr {
    /// The address as stored (normally the network address).
    pub addr: IpAddr,
    /// Prefix length: at most 32 for IPv4, 128 for IPv6.
    pub prefix_len: u8,
}

impl Cidr {
    /// Builds a prefix, checking the length fits the address family.
    pub fn new(addr: IpAddr, prefix_len: u8) -> Result<Self> {
        if prefix_len > max_len(&addr) {
            return Err(Error::InvalidCidr {
                value: format!("{addr}/{prefix_len}"),
                reason: "prefix length too long for the address family",
            });
        }
        Ok(Self { addr, prefix_len })
    }

    /// The mask bytes: 4 for IPv4, 16 for IPv6.
    pub fn mask_bytes(&self) -> Vec<u8> {
        mask_bytes(self.prefix_len, addr_len(&self.addr))
    }

    /// The same prefix with host bits cleared.
    pub fn network(&self) -> Self {
        let addr = match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a) & prefix_mask_u32(self.prefix_len);
                IpAddr::V4(Ipv4Addr::from(bits))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a) & prefix_mask_u128(self.prefix_len);
                IpAddr::V6(Ipv6Addr::from(bits))
            }
        };
        Self { addr, ..*self }
    }

    /// Whether `ip` lies inside the prefix.
    pub fn contains(&self, ip: &IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let m = prefix_mask_u32(self.prefix_len);
                u32::from(n) & m == u32::from(*a) & m
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let m = prefix_mask_u128(self.prefix_len);
                u128::from(n) & m == u128::from(*a) & m
            }
            _ => false,
        }
    }

    /// Builds the prefix from an address and Go `net.IPMask` bytes.
    pub fn from_ip_mask(addr: IpAddr, mask: &[u8]) -> Result<Self> {
        let invalid = |reason| Error::InvalidCidr {
            value: format!("{addr} mask {}", BASE64.encode(mask)),
            reason,
        };
        let mask = match (addr, mask.len()) {
            (IpAddr::V4(_), 4) | (IpAddr::V6(_), 16) => mask,
            // Go accepts an IPv4 address with a 16-byte (v4-in-v6) mask.
            (IpAddr::V4(_), 16) if mask[..12].iter().all(|b| *b == 0xff) => &mask[12..],
            _ => return Err(invalid("mask length does not match the address family")),
        };
        let prefix_len = mask_prefix_len(mask).ok_or_else(|| invalid("mask is not contiguous"))?;
        Ok(Self { addr, prefix_len })
    }
}

fn max_len(addr: &IpAddr) -> u8 {
    if addr.is_ipv4() {
        32
    } else {
        128
    }
}

fn addr_len(addr: &IpAddr) -> usize {
    if addr.is_ipv4() {
        4
    } else {
        16
    }
}

fn prefix_mask_u32(len: u8) -> u32 {
    u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0)
}

fn prefix_mask_u128(len: u8) -> u128 {
    u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0)
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl FromStr for Cidr {
    type Err = Error;

    /// Parses `addr/len` like Go's `net.ParseCIDR`: host bits are cleared.
    fn from_str(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidCidr {
            value: s.to_owned(),
            reason,
        };
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| invalid("missing '/' prefix length"))?;
        let addr: IpAddr = addr.parse().map_err(|_| invalid("invalid ip address"))?;
        if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("invalid prefix length"));
        }
        let prefix_len: u8 = len.parse().map_err(|_| invalid("invalid prefix length"))?;
        if prefix_len > max_len(&addr) {
            return Err(invalid("prefix length too long for the address family"));
        }
        Ok(Self { addr, prefix_len }.network())
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("IPNet", 2)?;
        st.serialize_field("IP", &self.addr.to_string())?;
        st.serialize_field("Mask", &BASE64.encode(self.mask_bytes()))?;
        st.end()
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CidrVisitor)
    }
}

struct CidrVisitor;

impl<'de> Visitor<'de> for CidrVisitor {
    type Value = Cidr;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a CIDR string or an {\"IP\",\"Mask\"} object")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Cidr, E> {
        v.parse().map_err(E::custom)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Cidr, A::Error> {
        let mut ip: Option<String> = None;
        let mut mask: Option<String> = None;
        while let Some(key) = map.next_key::<String>()? {
            match key.as_str() {
                "IP" => ip = map.next_value()?,
                "Mask" => mask = map.next_value()?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        let ip = ip.ok_or_else(|| de::Error::custom("cidr: missing IP"))?;
        let mask = mask.ok_or_else(|| de::Error::custom("cidr: missing Mask"))?;
        let addr: IpAddr = ip
            .parse()
            .map_err(|_| de::Error::custom(format_args!("cidr: invalid IP {ip:?}")))?;
        let mask = BASE64
            .decode(mask.as_bytes())
            .map_err(|e| de::Error::custom(format_args!("cidr: invalid base64 Mask: {e}")))?;
        Cidr::from_ip_mask(addr, &mask).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_go_ipnet() {
        let v4: Cidr = "10.244.0.0/24".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&v4).unwrap(),
            r#"{"IP":"10.244.0.0","Mask":"////AA=="}"#
        );
        let v6: Cidr = "fd00:10:244::/64".parse().unwrap();
        assert_eq!(
            serde_json::to_string(&v6).unwrap(),
            r#"{"IP":"fd00:10:244::","Mask":"//////////8AAAAAAAAAAA=="}"#
        );
        assert_eq!(v6.to_string(), "fd00:10:244::/64");
    }

    #[test]
    fn decodes_object_or_string() {
        let a: Cidr =
            serde_json::from_str(r#"{"IP":"10.244.0.0","Mask":"////AA==","X":1}"#).unwrap();
        let b: Cidr = serde_json::from_str(r#""10.244.0.0/24""#).unwrap();
        assert_eq!(a, b);
        let c: Cidr = serde_json::from_str(r#""10.244.0.7/24""#).unwrap();
        assert_eq!(c, b, "string form clears host bits like net.ParseCIDR");
        let d: Cidr =
            serde_json::from_str(r#"{"IP":"10.0.0.0","Mask":"/////////////////wAAAA=="}"#).unwrap();
        assert_eq!(d.to_string(), "10.0.0.0/8");
    }

    #[test]
    fn rejects_bad_masks() {
        for bad in [
            r#"{"IP":"10.0.0.0","Mask":"/wD/AA=="}"#,
            r#"{"IP":"10.0.0.0","Mask":"////"}"#,
            r#"{"IP":"10.0.0.0","Mask":null}"#,
            r#"{"IP":"10.0.0.0"}"#,
            r#"{"IP":"fd00::","Mask":"////AA=="}"#,
            r#"{"IP":"nope","Mask":"////AA=="}"#,
            r#""10.0.0.0/33""#,
            r#""10.0.0.0""#,
            r#""10.0.0.0/+8""#,
            r#"42"#,
        ] {
            assert!(serde_json::from_str::<Cidr>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn contains_and_new() {
        let c: Cidr = "10.244.0.0/16".parse().unwrap();
        assert!(c.contains(&"10.244.9.9".parse().unwrap()));
        assert!(!c.contains(&"10.245.0.0".parse().unwrap()));
        assert!(!c.contains(&"::1".parse().unwrap()));
        assert!(Cidr::new("::".parse().unwrap(), 129).is_err());
        assert_eq!(
            Cidr::new("::".parse().unwrap(), 0).unwrap().mask_bytes(),
            vec![0; 16]
        );
    }
}
