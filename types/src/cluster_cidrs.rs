//! A cluster's pod CIDRs (`--cluster-cidr`, as kube-controller-manager's; Cilium's
//! `clusterPoolIPv4PodCIDRList`/`clusterPoolIPv6PodCIDRList`): the address space its pods,
//! endpoints and nodes' pod CIDRs (`IPv4AllocCIDR`/`IPv6AllocCIDR`) must come from.
//!
//! The same rule is applied on both sides of the mesh: the apiserver does not export an
//! address outside its own cluster's CIDRs, and a remote reader refuses an ipcache entry
//! outside the remote's CIDRs (a remote could otherwise claim any address, a public one
//! included, and have its traffic tunnelled to it). An empty set is "no rule": every
//! prefix is accepted, as before the setting existed. A set that names only one family
//! holds no address of the other: with `10.1.0.0/16` alone, every IPv6 address is outside.
//!
//! It only decides membership; it does no I/O and logs nothing.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Cidr;
use crate::{Error, Result};

/// The CIDRs of one cluster, IPv4 and IPv6, in the order given (duplicates dropped).
#[derive(Clone, Default, PartialEq, Eq, Hash, Debug)]
pub struct ClusterCidrs(Vec<Cidr>);

impl ClusterCidrs {
    /// Parses CIDRs, each item one CIDR or a comma-separated list (`10.1.0.0/16,fd00:1::/64`);
    /// blank items are skipped, so an empty setting is no rule. A CIDR with host bits set
    /// (`10.1.2.3/16`) is refused rather than silently widened: it is most likely a typo.
    pub fn parse<S: AsRef<str>>(items: impl IntoIterator<Item = S>) -> Result<Self> {
        let mut out: Vec<Cidr> = Vec::new();
        for item in items {
            for text in item.as_ref().split(',').map(str::trim) {
                if text.is_empty() {
                    continue;
                }
                let cidr: Cidr = text.parse()?;
                let written = text
                    .split_once('/')
                    .and_then(|(a, _)| a.parse::<IpAddr>().ok());
                if written != Some(cidr.addr) {
                    return Err(Error::InvalidCidr {
                        value: text.to_owned(),
                        reason: "host bits are set: write the network address",
                    });
                }
                if !out.contains(&cidr) {
                    out.push(cidr);
                }
            }
        }
        Ok(Self(out))
    }

    /// Whether no CIDR is configured (no rule: everything is inside).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The CIDRs.
    pub fn iter(&self) -> impl Iterator<Item = &Cidr> {
        self.0.iter()
    }

    /// Whether `ip` is inside one of the CIDRs (always, when there are none).
    pub fn contains_ip(&self, ip: &IpAddr) -> bool {
        self.is_empty() || self.0.iter().any(|c| c.contains(ip))
    }

    /// Whether all of `prefix` is inside one of the CIDRs (always, when there are none):
    /// a node's `/24` inside the cluster's `/16`, never the `/8` around it.
    pub fn contains_prefix(&self, prefix: &Cidr) -> bool {
        self.is_empty()
            || self
                .0
                .iter()
                .any(|c| c.prefix_len <= prefix.prefix_len && c.contains(&prefix.addr))
    }

    /// The CIDRs as strings (`10.1.0.0/16`), for settings files and messages.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }
}

impl fmt::Display for ClusterCidrs {
    /// Comma-separated, as the flag takes them; `(none)` when empty.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(none)");
        }
        f.write_str(&self.to_strings().join(","))
    }
}

impl Serialize for ClusterCidrs {
    /// A list of `addr/len` strings.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_strings().serialize(s)
    }
}

impl<'de> Deserialize<'de> for ClusterCidrs {
    /// A list of strings (each may be a comma list) or one comma-separated string.
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            One(String),
            Many(Vec<String>),
        }
        let items = match Form::deserialize(d)? {
            Form::One(s) => vec![s],
            Form::Many(v) => v,
        };
        ClusterCidrs::parse(items).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn membership_per_family() {
        let c = ClusterCidrs::parse(["10.1.0.0/16, fd00:1::/64", "10.1.0.0/16"]).unwrap();
        assert_eq!(c.to_strings(), ["10.1.0.0/16", "fd00:1::/64"]);
        assert!(c.contains_ip(&ip("10.1.200.3")));
        assert!(!c.contains_ip(&ip("10.2.0.1")));
        assert!(c.contains_ip(&ip("fd00:1::5")));
        assert!(!c.contains_ip(&ip("fd00:2::5")));
        assert!(c.contains_prefix(&"10.1.3.0/24".parse().unwrap()));
        assert!(!c.contains_prefix(&"10.0.0.0/8".parse().unwrap()));
        assert!(!c.contains_prefix(&"fd00:1::/48".parse().unwrap()));
        let v4_only = ClusterCidrs::parse(["10.1.0.0/16"]).unwrap();
        assert!(
            !v4_only.contains_ip(&ip("fd00:1::5")),
            "no IPv6 CIDR: outside"
        );
        assert_eq!(c.to_string(), "10.1.0.0/16,fd00:1::/64");
    }

    #[test]
    fn empty_is_no_rule() {
        let c = ClusterCidrs::parse(["", " , "]).unwrap();
        assert!(c.is_empty());
        assert!(c.contains_ip(&ip("8.8.8.8")));
        assert!(c.contains_prefix(&"0.0.0.0/0".parse().unwrap()));
        assert_eq!(c.to_string(), "(none)");
    }

    #[test]
    fn bad_cidrs_are_named() {
        let e = ClusterCidrs::parse(["10.1.0.0/16,10.1.2.3/16"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.1.2.3/16") && e.contains("host bits"), "{e}");
        let e = ClusterCidrs::parse(["10.1.0.0"]).unwrap_err().to_string();
        assert!(e.contains("10.1.0.0"), "{e}");
        let e = ClusterCidrs::parse(["fd00::/129"]).unwrap_err().to_string();
        assert!(e.contains("fd00::/129"), "{e}");
    }

    #[test]
    fn serde_forms() {
        let c: ClusterCidrs = serde_json::from_str(r#""10.1.0.0/16,fd00:1::/64""#).unwrap();
        assert_eq!(c.to_strings().len(), 2);
        let c2: ClusterCidrs = serde_json::from_str(r#"["10.1.0.0/16","fd00:1::/64"]"#).unwrap();
        assert_eq!(c, c2);
        assert_eq!(
            serde_json::to_string(&c).unwrap(),
            r#"["10.1.0.0/16","fd00:1::/64"]"#
        );
        assert!(serde_json::from_str::<ClusterCidrs>(r#"["nope"]"#).is_err());
    }
}
