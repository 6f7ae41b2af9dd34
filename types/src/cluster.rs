//! Cluster names, cluster IDs and the identity range each cluster owns.
//!
//! Numbering follows Cilium's `pkg/identity/numericidentity.go`: identities are
//! 24 bits on the wire; the top 8 (or 9) bits are the cluster ID.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// Longest cluster name Cilium accepts.
pub const CLUSTER_NAME_MAX_LEN: usize = 32;

/// A validated cluster name: 1 to 32 characters matching
/// `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$`.
///
/// Cluster names appear verbatim in etcd keys, so an invalid name would produce
/// keys that other clusters cannot parse.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct ClusterName(String);

impl ClusterName {
    /// Validates and wraps `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        match check_cluster_name(&name) {
            Ok(()) => Ok(Self(name)),
            Err(reason) => Err(Error::InvalidClusterName { name, reason }),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Unwraps the inner string.
    pub fn into_string(self) -> String {
        self.0
    }
}

fn check_cluster_name(name: &str) -> Result<(), &'static str> {
    let bytes = name.as_bytes();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return Err("must not be empty");
    };
    if bytes.len() > CLUSTER_NAME_MAX_LEN {
        return Err("must be at most 32 characters");
    }
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if !bytes.iter().all(|b| alnum(b) || *b == b'-') {
        return Err("must contain only lowercase letters, digits and '-'");
    }
    if !alnum(first) || !alnum(last) {
        return Err("must start and end with a lowercase letter or digit");
    }
    Ok(())
}

impl FromStr for ClusterName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl Serialize for ClusterName {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ClusterName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::new(s).map_err(serde::de::Error::custom)
    }
}

/// How many clusters a mesh may hold; decides how identity bits are split.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub enum MaxConnectedClusters {
    /// 255 clusters: 8 cluster-ID bits, 16 bits of cluster-local identity.
    #[default]
    Max255,
    /// 511 clusters: 9 cluster-ID bits, 15 bits of cluster-local identity.
    Max511,
}

impl MaxConnectedClusters {
    /// Parses the numeric setting; only 255 and 511 are allowed.
    pub fn from_u32(value: u32) -> Result<Self> {
        match value {
            255 => Ok(Self::Max255),
            511 => Ok(Self::Max511),
            _ => Err(Error::InvalidMaxConnectedClusters { value }),
        }
    }

    /// The numeric setting (255 or 511), also the highest valid cluster ID.
    pub fn as_u32(self) -> u32 {
        match self {
            Self::Max255 => 255,
            Self::Max511 => 511,
        }
    }

    /// Bits of an identity used for the cluster ID (8 or 9).
    pub fn cluster_id_bits(self) -> u32 {
        match self {
            Self::Max255 => 8,
            Self::Max511 => 9,
        }
    }

    /// Position of the cluster ID inside a 24-bit identity (16 or 15).
    pub fn identity_shift(self) -> u32 {
        NUMERIC_IDENTITY_BITS - self.cluster_id_bits()
    }
}

/// Bits of a numeric identity carried on the wire (VXLAN/Geneve VNI).
pub const NUMERIC_IDENTITY_BITS: u32 = 24;

impl fmt::Display for MaxConnectedClusters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.as_u32())
    }
}

impl Serialize for MaxConnectedClusters {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.as_u32())
    }
}

impl<'de> Deserialize<'de> for MaxConnectedClusters {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = u32::deserialize(d)?;
        Self::from_u32(v).map_err(serde::de::Error::custom)
    }
}

/// Checks that `id` is a usable cluster ID: `1..=max`. ID 0 is reserved for
/// clusters that are not part of a mesh and cannot be connected.
pub fn validate_cluster_id(id: u32, max: MaxConnectedClusters) -> Result<()> {
    if id == 0 {
        return Err(Error::InvalidClusterId {
            id,
            reason: "cluster id 0 is reserved".to_owned(),
        });
    }
    if id > max.as_u32() {
        return Err(Error::InvalidClusterId {
            id,
            reason: format!("must be between 1 and {max} (max connected clusters)"),
        });
    }
    Ok(())
}

/// Smallest identity allocated for cluster-local endpoints when the cluster ID is 0.
const MIN_IDENTITY_CLUSTER_ZERO: u32 = 256;

/// Inclusive range of numeric identities a cluster may allocate.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct IdentityRange {
    /// First identity of the range.
    pub min: u32,
    /// Last identity of the range (inclusive).
    pub max: u32,
}

impl IdentityRange {
    /// The range `[c << shift, ((c + 1) << shift) - 1]` owned by `cluster_id`;
    /// for `c == 0` the range starts at 256 (below are reserved identities).
    ///
    /// Cluster IDs above `max` are not validated here; the result saturates at
    /// `u32::MAX` instead of overflowing.
    pub fn for_cluster(cluster_id: u32, max: MaxConnectedClusters) -> Self {
        let shift = max.identity_shift();
        let c = u64::from(cluster_id);
        let lo = c << shift;
        let hi = ((c + 1) << shift) - 1;
        let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
        let min = if cluster_id == 0 {
            MIN_IDENTITY_CLUSTER_ZERO
        } else {
            clamp(lo)
        };
        Self {
            min,
            max: clamp(hi),
        }
    }

    /// Whether `id` lies inside the range.
    pub fn contains(&self, id: u32) -> bool {
        (self.min..=self.max).contains(&id)
    }

    /// Number of identities in the range.
    pub fn len(&self) -> u32 {
        if self.max < self.min {
            0
        } else {
            (self.max - self.min).saturating_add(1)
        }
    }

    /// Whether the range holds no identity.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for IdentityRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.min, self.max)
    }
}

/// The cluster ID encoded in a numeric identity: `(id >> shift) & max`.
pub fn cluster_id_of_identity(identity: u32, max: MaxConnectedClusters) -> u32 {
    (identity >> max.identity_shift()) & max.as_u32()
}

/// Name, ID and mesh size of one cluster.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct ClusterInfo {
    /// The cluster name used in etcd keys.
    pub name: ClusterName,
    /// The cluster ID (1..=max).
    pub id: u32,
    /// The mesh size setting, shared by all clusters of a mesh.
    pub max_connected_clusters: MaxConnectedClusters,
}

impl ClusterInfo {
    /// Checks the cluster ID against the mesh size (the name is valid by construction).
    pub fn validate(&self) -> Result<()> {
        validate_cluster_id(self.id, self.max_connected_clusters)
    }

    /// The identities this cluster may allocate.
    pub fn identity_range(&self) -> IdentityRange {
        IdentityRange::for_cluster(self.id, self.max_connected_clusters)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for ok in ["a", "cluster1", "c-3", "0", "a1-b2", &"a".repeat(32)] {
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Cluster",
            "-a",
            "a-",
            "a_b",
            "a.b",
            &"a".repeat(33),
            "é",
        ] {
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
        let err = ClusterName::new("UP").unwrap_err().to_string();
        assert!(err.contains("\"UP\""), "{err}");
    }

    #[test]
    fn cluster_name_serde_validates() {
        let n: ClusterName = serde_json::from_str("\"cluster3\"").unwrap();
        assert_eq!(n.as_str(), "cluster3");
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"cluster3\"");
        assert!(serde_json::from_str::<ClusterName>("\"-bad\"").is_err());
        assert_eq!("x1".parse::<ClusterName>().unwrap().to_string(), "x1");
    }

    #[test]
    fn max_connected_clusters() {
        assert_eq!(
            MaxConnectedClusters::default(),
            MaxConnectedClusters::Max255
        );
        assert_eq!(MaxConnectedClusters::from_u32(511).unwrap().as_u32(), 511);
        let err = MaxConnectedClusters::from_u32(256).unwrap_err().to_string();
        assert!(err.contains("255") && err.contains("511"), "{err}");
        assert_eq!(MaxConnectedClusters::Max255.identity_shift(), 16);
        assert_eq!(MaxConnectedClusters::Max511.identity_shift(), 15);
        assert_eq!(MaxConnectedClusters::Max511.cluster_id_bits(), 9);
    }

    #[test]
    fn cluster_ids() {
        let m = MaxConnectedClusters::Max255;
        assert!(validate_cluster_id(0, m)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        assert!(validate_cluster_id(1, m).is_ok());
        assert!(validate_cluster_id(255, m).is_ok());
        assert!(validate_cluster_id(256, m).is_err());
        assert!(validate_cluster_id(511, MaxConnectedClusters::Max511).is_ok());
    }

    #[test]
    fn identity_ranges_255() {
        let m = MaxConnectedClusters::Max255;
        let r1 = IdentityRange::for_cluster(1, m);
        assert_eq!((r1.min, r1.max), (65536, 131071));
        assert_eq!(r1.len(), 65536);
        let r3 = IdentityRange::for_cluster(3, m);
        assert!(r3.contains(199472));
        assert!(!r3.contains(196607));
        let r255 = IdentityRange::for_cluster(255, m);
        assert_eq!((r255.min, r255.max), (16711680, 16777215));
        let r0 = IdentityRange::for_cluster(0, m);
        assert_eq!((r0.min, r0.max), (256, 65535));
        assert_eq!(cluster_id_of_identity(199472, m), 3);
        assert_eq!(cluster_id_of_identity(16777215, m), 255);
        let info = ClusterInfo {
            name: ClusterName::new("cluster3").unwrap(),
            id: 3,
            max_connected_clusters: m,
        };
        assert!(info.validate().is_ok());
        assert!(info.identity_range().contains(199472));
    }

    #[test]
    fn identity_ranges_511() {
        let m = MaxConnectedClusters::Max511;
        for c in [1u32, 2, 3, 100, 511] {
            let r = IdentityRange::for_cluster(c, m);
            assert_eq!((r.min, r.max), (c * 32768, c * 32768 + 32767));
            assert_eq!(cluster_id_of_identity(r.min, m), c);
            assert_eq!(cluster_id_of_identity(r.max, m), c);
        }
        assert_eq!(IdentityRange::for_cluster(0, m).min, 256);
        // Out-of-range IDs must not overflow.
        let r = IdentityRange::for_cluster(u32::MAX, m);
        assert_eq!(r.max, u32::MAX);
    }
}
