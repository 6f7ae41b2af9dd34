//! `IPIdentityPair` at `cilium/state/ip/v1/default/<ip>`.

use std::net::IpAddr;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::de::{ip_or_empty, null_default};
use super::{json_value, Cidr, SmolStr};
use crate::{Error, Result};

/// Maps an IP (or prefix) to its security identity and the node hosting it.
///
/// Strings are [`SmolStr`]s: an address, a namespace, a pod or service-account name fit in
/// 23 bytes inline, so a decoded entry allocates nothing beyond itself. A reader holds one
/// per remote endpoint (a million in a 511-cluster mesh); five heap strings of 32 bytes
/// each were a third of its memory per endpoint.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct IpIdentityPair {
    /// The address.
    #[serde(rename = "IP", deserialize_with = "ip_required")]
    pub ip: SmolStr,
    /// Mask bytes for a prefix entry; `None` for a host entry (omitted on
    /// write, as newest Cilium does; `null` and absent both decode to `None`).
    #[serde(
        rename = "Mask",
        default,
        skip_serializing_if = "Option::is_none",
        serialize_with = "mask_ser",
        deserialize_with = "mask_de"
    )]
    pub mask: Option<Vec<u8>>,
    /// IP of the node hosting the address (tunnel endpoint), `""` if none.
    #[serde(rename = "HostIP", default, deserialize_with = "ip_or_empty")]
    pub host_ip: SmolStr,
    /// Numeric security identity.
    #[serde(rename = "ID", default, deserialize_with = "null_default")]
    pub id: u32,
    /// Encryption key index.
    #[serde(rename = "Key", default, deserialize_with = "null_default")]
    pub key: u8,
    /// `""` from the clustermesh-apiserver; always written.
    #[serde(rename = "Metadata", default, deserialize_with = "null_default")]
    pub metadata: SmolStr,
    /// Namespace of the pod.
    #[serde(
        rename = "K8sNamespace",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "SmolStr::is_empty"
    )]
    pub k8s_namespace: SmolStr,
    /// Name of the pod.
    #[serde(
        rename = "K8sPodName",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "SmolStr::is_empty"
    )]
    pub k8s_pod_name: SmolStr,
    /// UID of the pod (newer Cilium).
    #[serde(
        rename = "K8sPodUID",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "SmolStr::is_empty"
    )]
    pub k8s_pod_uid: SmolStr,
    /// Service account of the pod.
    #[serde(
        rename = "K8sServiceAccount",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "SmolStr::is_empty"
    )]
    pub k8s_service_account: SmolStr,
    /// Named container ports of the pod.
    #[serde(
        rename = "NamedPorts",
        default,
        deserialize_with = "null_default",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub named_ports: Vec<NamedPort>,
}

/// A named container port.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Hash, Debug, Default)]
pub struct NamedPort {
    /// Port name.
    #[serde(rename = "Name", default, deserialize_with = "null_default")]
    pub name: String,
    /// Port number.
    #[serde(rename = "Port", default, deserialize_with = "null_default")]
    pub port: u16,
    /// `TCP`, `UDP`, `SCTP`.
    #[serde(rename = "Protocol", default, deserialize_with = "null_default")]
    pub protocol: String,
}

fn ip_required<'de, D: Deserializer<'de>>(d: D) -> Result<SmolStr, D::Error> {
    let s = SmolStr::deserialize(d)?;
    if s.parse::<IpAddr>().is_err() {
        return Err(serde::de::Error::custom(format_args!(
            "invalid ip address {s:?}"
        )));
    }
    Ok(s)
}

fn mask_ser<S: Serializer>(mask: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
    match mask {
        Some(m) => s.serialize_str(&BASE64.encode(m)),
        None => s.serialize_none(),
    }
}

fn mask_de<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
    Option::<String>::deserialize(d)?
        .map(|m| {
            BASE64
                .decode(m.as_bytes())
                .map_err(|e| serde::de::Error::custom(format_args!("invalid base64 Mask: {e}")))
        })
        .transpose()
}

json_value!(IpIdentityPair, |v: IpIdentityPair,
                             _: &[u8]|
 -> Result<IpIdentityPair> {
    v.check_mask()?;
    Ok(v)
});

impl IpIdentityPair {
    /// The kvstore key suffix: the IP for a host entry, `ip/len` for a prefix
    /// (Go `PrefixString`).
    pub fn prefix_string(&self) -> String {
        match self.prefix_len() {
            Some(len) => format!("{}/{len}", self.ip),
            None => self.ip.to_string(),
        }
    }

    /// Prefix length of a prefix entry (ones in the mask, like Go's
    /// `IPMask.Size`), `None` for a host entry.
    pub fn prefix_len(&self) -> Option<u8> {
        let mask = self.mask.as_deref()?;
        let ones: u32 = mask
            .iter()
            .map_while(|b| (*b != 0).then(|| b.leading_ones()))
            .sum();
        Some(u8::try_from(ones).unwrap_or(u8::MAX))
    }

    /// Sets the entry to the prefix `cidr` (IP and mask).
    pub fn set_prefix(&mut self, cidr: &Cidr) {
        self.ip = SmolStr::new(cidr.addr.to_string());
        self.mask = Some(cidr.mask_bytes());
    }

    /// Decodes a value and checks it belongs under `key_suffix`, the part of
    /// the key after `cilium/state/ip/v1/default/` (Cilium checks the same).
    pub fn decode_with_key(key_suffix: &str, bytes: &[u8]) -> Result<Self> {
        let v = Self::decode(bytes)?;
        let expected = v.prefix_string();
        if expected != key_suffix {
            return Err(Error::InvalidValue {
                kind: "IpIdentityPair",
                reason: format!("key {key_suffix:?} does not match value prefix {expected:?}"),
            });
        }
        Ok(v)
    }

    /// Whether `key_suffix` (the key after `cilium/state/ip/v1/default/`) is this entry's
    /// [`Self::prefix_string`], compared without building the string.
    pub fn is_keyed_by(&self, key_suffix: &str) -> bool {
        let Some(rest) = key_suffix.strip_prefix(self.ip.as_str()) else {
            return false;
        };
        match (self.prefix_len(), rest.strip_prefix('/')) {
            (None, None) => rest.is_empty(),
            (Some(len), Some(bits)) => {
                // Canonical decimal, as `format!` writes it: digits only, no leading zero.
                bits.bytes().all(|b| b.is_ascii_digit())
                    && (bits.len() == 1 || !bits.starts_with('0'))
                    && bits.parse() == Ok(len)
            }
            _ => false,
        }
    }

    fn check_mask(&self) -> Result<()> {
        let Some(mask) = &self.mask else {
            return Ok(());
        };
        let addr: IpAddr = self.ip.parse().map_err(|_| Error::InvalidValue {
            kind: "IpIdentityPair",
            reason: format!("invalid ip {:?}", self.ip),
        })?;
        Cidr::from_ip_mask(addr, mask).map_err(|e| Error::InvalidValue {
            kind: "IpIdentityPair",
            reason: e.to_string(),
        })?;
        Ok(())
    }
}

/// An ipcache entry with its addresses parsed, once, where it is validated: the prefix it
/// claims (a host entry is a `/32` or `/128`) and the node it is tunnelled to. Consumers read
/// [`Self::prefix`] and [`Self::host`] and never parse the pair's strings again; the pair
/// itself (what the publisher wrote, for mirroring and display) is reachable through
/// `Deref`.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct IpcacheEntry {
    /// `IP` and `Mask` as a prefix, the address as published (host bits not cleared).
    pub prefix: Cidr,
    /// `HostIP`, `None` if empty.
    pub host: Option<IpAddr>,
    /// The entry as published.
    pub pair: IpIdentityPair,
}

impl IpcacheEntry {
    /// Parses `pair`'s address, mask and host address. A mask longer than the address
    /// family (a 16-byte mask on an IPv4 address, `/120` in Go's `PrefixString`) is refused:
    /// no datapath could program its key.
    pub fn new(pair: IpIdentityPair) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidValue {
            kind: "IpIdentityPair",
            reason,
        };
        let addr: IpAddr = pair
            .ip
            .parse()
            .map_err(|_| invalid(format!("invalid ip {:?}", pair.ip)))?;
        let bits = pair
            .prefix_len()
            .unwrap_or(if addr.is_ipv4() { 32 } else { 128 });
        let prefix = Cidr::new(addr, bits).map_err(|e| invalid(e.to_string()))?;
        let host = match pair.host_ip.as_str() {
            "" => None,
            h => Some(
                h.parse()
                    .map_err(|_| invalid(format!("invalid HostIP {h:?}")))?,
            ),
        };
        Ok(Self { prefix, host, pair })
    }
}

impl std::ops::Deref for IpcacheEntry {
    type Target = IpIdentityPair;

    fn deref(&self) -> &IpIdentityPair {
        &self.pair
    }
}
