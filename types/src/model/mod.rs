//! Values stored under the keys of [`crate::kvstore`].
//!
//! Every type encodes to compact JSON that is byte-identical to Cilium's Go
//! `encoding/json` output: same field names, declaration order and
//! `omitempty` behaviour, maps sorted by key. Decoders follow Go's lenient
//! rules: unknown fields are ignored, missing fields and `null` take the zero
//! value. They never panic; on failure the [`crate::Error`] names the type.
//!
//! `decode` only checks what Go's `json.Unmarshal` would reject (bad JSON,
//! wrong types, unparsable IPs, CIDRs and timestamps). Cilium's additional
//! semantic checks live in each type's `validate()`.

mod cidr;
mod cluster_config;
pub mod endpoint_slice;
mod ipcache;
mod node;
mod service;
mod service_export;
mod time;

pub use cidr::Cidr;
pub use cluster_config::{Capabilities, ClusterConfig, EndpointSlicesExportMode};
pub use endpoint_slice::EndpointSlice;
pub use ipcache::{IpIdentityPair, IpcacheEntry, NamedPort};
pub use node::{Node, NodeAddress};
pub use service::{
    AddrMap, BackendZone, ClusterService, ForZone, L4Addr, PortConfiguration, SmolStr,
};
pub use service_export::{ClientIpConfig, ServiceExport, ServiceExportPort, SessionAffinityConfig};
pub use time::{format_rfc3339, parse_rfc3339};

/// A value type stored in the kvstore, for code that is generic over values.
///
/// Each type also has inherent `decode`/`encode` methods with the same meaning.
pub trait Value: Sized {
    /// Short type name used in errors, e.g. `Node`.
    const KIND: &'static str;
    /// Decodes a kvstore value.
    fn decode(bytes: &[u8]) -> crate::Result<Self>;
    /// Encodes the value exactly as Cilium would.
    fn encode(&self) -> Vec<u8>;
}

/// Implements `decode`/`encode` and [`Value`] for a serde type. `$check` runs
/// after JSON decoding for rules serde cannot express.
///
/// `fast` (optional) is a decoder for the common shape of the value that returns `None`
/// for anything it does not handle; serde then decodes, and stays the reference.
macro_rules! json_value {
    (@impl $t:ident, $check:expr, $fast:expr) => {
        impl $t {
            /// Decodes a kvstore value (JSON). Never panics; unknown fields are
            /// ignored and missing fields take their zero value.
            pub fn decode(bytes: &[u8]) -> $crate::Result<Self> {
                #[allow(clippy::redundant_closure_call)]
                let value: Self = match ($fast)(bytes) {
                    Some(v) => v,
                    None => serde_json::from_slice(bytes).map_err(|source| {
                        $crate::Error::Decode {
                            kind: stringify!($t),
                            source,
                        }
                    })?,
                };
                #[allow(clippy::redundant_closure_call)]
                ($check)(value, bytes)
            }

            /// Encodes the value as compact JSON, byte-identical to Cilium.
            pub fn encode(&self) -> Vec<u8> {
                // Serialization cannot fail: every field is a string, number,
                // bool, sequence or string-keyed map, and no custom serializer
                // returns an error.
                serde_json::to_vec(self).unwrap_or_default()
            }
        }

        impl $crate::model::Value for $t {
            const KIND: &'static str = stringify!($t);
            fn decode(bytes: &[u8]) -> $crate::Result<Self> {
                $t::decode(bytes)
            }
            fn encode(&self) -> Vec<u8> {
                $t::encode(self)
            }
        }
    };
    ($t:ident, fast: $fast:path) => {
        json_value!(@impl $t, |v, _| Ok(v), |bytes| $fast(bytes));
    };
    ($t:ident, $check:expr) => {
        json_value!(@impl $t, $check, |_| None);
    };
    ($t:ident) => {
        json_value!($t, |v, _| Ok(v));
    };
}
pub(crate) use json_value;

/// serde helpers shared by the value types.
pub(crate) mod de {
    use std::net::IpAddr;

    use serde::{Deserialize, Deserializer};

    /// Go semantics: `null` leaves the zero value.
    pub(crate) fn null_default<'de, D, T>(d: D) -> Result<T, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de> + Default,
    {
        Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
    }

    /// A Go `net.IP` field: `""`/`null` (nil IP) or a parsable address, kept verbatim.
    pub(crate) fn ip_or_empty<'de, D, S>(d: D) -> Result<S, D::Error>
    where
        D: Deserializer<'de>,
        S: Deserialize<'de> + Default + AsRef<str>,
    {
        let s: S = null_default(d)?;
        let text = s.as_ref();
        if !text.is_empty() && text.parse::<IpAddr>().is_err() {
            return Err(serde::de::Error::custom(format_args!(
                "invalid ip address {text:?}"
            )));
        }
        Ok(s)
    }

    pub(crate) fn is_false(b: &bool) -> bool {
        !*b
    }

    pub(crate) fn is_zero_u32(v: &u32) -> bool {
        *v == 0
    }
}

/// Number of leading one bits if `mask` is contiguous (ones then zeros).
pub(crate) fn mask_prefix_len(mask: &[u8]) -> Option<u8> {
    let mut ones: u32 = 0;
    let mut seen_zero = false;
    for &b in mask {
        if seen_zero {
            if b != 0 {
                return None;
            }
            continue;
        }
        let lead = b.leading_ones();
        if b.checked_shl(lead).unwrap_or(0) != 0 {
            return None;
        }
        ones += lead;
        if lead < 8 {
            seen_zero = true;
        }
    }
    u8::try_from(ones).ok()
}

/// Mask bytes for a prefix length: `len` bytes, leading `prefix_len` bits set.
pub(crate) fn mask_bytes(prefix_len: u8, len: usize) -> Vec<u8> {
    let mut remaining = usize::from(prefix_len);
    (0..len)
        .map(|_| {
            let bits = remaining.min(8);
            remaining -= bits;
            match bits {
                0 => 0,
                b => 0xffu8 << (8 - b),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(mask_prefix_len(&[255, 255, 255, 0]), Some(24));
        assert_eq!(mask_prefix_len(&[255, 255, 255, 255]), Some(32));
        assert_eq!(mask_prefix_len(&[0, 0, 0, 0]), Some(0));
        assert_eq!(mask_prefix_len(&[255, 0xf0, 0, 0]), Some(12));
        assert_eq!(mask_prefix_len(&[255, 0, 255, 0]), None);
        assert_eq!(mask_prefix_len(&[0b1011_0000, 0, 0, 0]), None);
        assert_eq!(mask_bytes(24, 4), vec![255, 255, 255, 0]);
        assert_eq!(mask_bytes(12, 4), vec![255, 0xf0, 0, 0]);
        assert_eq!(mask_bytes(200, 4), vec![255; 4]);
        for len in 0..=128u8 {
            assert_eq!(mask_prefix_len(&mask_bytes(len, 16)), Some(len));
        }
    }
}
