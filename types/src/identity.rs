//! Security identities: well-known label keys, reserved numeric identities and
//! the label strings stored under `cilium/state/identities/v1/id/<id>`.
//!
//! The kvstore form of a label set is `source:key=value;` per label, sorted by
//! key and always `;`-terminated (Cilium `LabelArray.Sort` +
//! `Label.FormatForKVStore`).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Label carrying the cluster name of an endpoint.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";
/// Label carrying the Kubernetes namespace of a pod.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Label carrying the service account of a pod.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// Prefix of labels copied from the pod's namespace.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
/// Source of labels derived from Kubernetes objects.
pub const SOURCE_K8S: &str = "k8s";
/// Source used when a label has none (Cilium `LabelSourceUnspec`).
pub const SOURCE_UNSPEC: &str = "unspec";
/// Source of reserved labels such as `reserved:host`.
pub const SOURCE_RESERVED: &str = "reserved";
/// Smallest numeric identity that is allocated for user workloads.
pub const MIN_USER_IDENTITY: u32 = 256;

/// Reserved numeric identities (Cilium `pkg/identity/numericidentity.go`).
pub mod reserved {
    /// Unknown / invalid identity (wildcard in policy maps).
    pub const UNKNOWN: u32 = 0;
    /// The local host.
    pub const HOST: u32 = 1;
    /// Anything outside the cluster.
    pub const WORLD: u32 = 2;
    /// Endpoints not managed by Cilium.
    pub const UNMANAGED: u32 = 3;
    /// Cilium health endpoints.
    pub const HEALTH: u32 = 4;
    /// Endpoints whose identity is not yet resolved.
    pub const INIT: u32 = 5;
    /// Other nodes of the cluster (and remote clusters).
    pub const REMOTE_NODE: u32 = 6;
    /// The Kubernetes API server.
    pub const KUBE_APISERVER: u32 = 7;
    /// Cilium's ingress proxy.
    pub const INGRESS: u32 = 8;
    /// IPv4 world (dual-stack split).
    pub const WORLD_IPV4: u32 = 9;
    /// IPv6 world (dual-stack split).
    pub const WORLD_IPV6: u32 = 10;

    /// The label name of a reserved identity, e.g. `host` for 1.
    pub fn name(id: u32) -> Option<&'static str> {
        Some(match id {
            UNKNOWN => "unknown",
            HOST => "host",
            WORLD => "world",
            UNMANAGED => "unmanaged",
            HEALTH => "health",
            INIT => "init",
            REMOTE_NODE => "remote-node",
            KUBE_APISERVER => "kube-apiserver",
            INGRESS => "ingress",
            WORLD_IPV4 => "world-ipv4",
            WORLD_IPV6 => "world-ipv6",
            _ => return None,
        })
    }
}

/// One label: `source:key=value`.
///
/// Ordering is by key, then source, then value, so that a sorted [`LabelArray`]
/// matches Cilium's key-only sort and stays deterministic on ties.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Label {
    /// Where the label comes from, e.g. `k8s`, `reserved`.
    pub source: String,
    /// The label key.
    pub key: String,
    /// The label value (may be empty).
    pub value: String,
}

impl Label {
    /// Builds a label from its three parts.
    pub fn new(
        source: impl Into<String>,
        key: impl Into<String>,
        value: impl Into<String>,
    ) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        }
    }

    /// Parses `source:key=value`: the source is the text before the first `:`,
    /// key and value split at the first `=` after it (no `=` means an empty
    /// value). A missing source or an empty key is an error.
    pub fn parse(s: &str) -> Result<Self> {
        let invalid = |reason| Error::InvalidLabel {
            label: s.to_owned(),
            reason,
        };
        let (source, rest) = s
            .split_once(':')
            .ok_or_else(|| invalid("missing source (expected source:key=value)"))?;
        if source.is_empty() {
            return Err(invalid("empty source"));
        }
        if s.contains(';') {
            return Err(invalid("contains ';'"));
        }
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        if key.is_empty() {
            return Err(invalid("empty key"));
        }
        Ok(Self::new(source, key, value))
    }

    /// Appends `source:key=value;` to `out` (Cilium `FormatForKVStore`).
    fn write_kvstore(&self, out: &mut String) {
        out.push_str(&self.source);
        out.push(':');
        out.push_str(&self.key);
        out.push('=');
        out.push_str(&self.value);
        out.push(';');
    }
}

impl Ord for Label {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (&self.key, &self.source, &self.value).cmp(&(&other.key, &other.source, &other.value))
    }
}

impl PartialOrd for Label {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}={}", self.source, self.key, self.value)
    }
}

impl FromStr for Label {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Self::parse(s)
    }
}

/// A numeric identity with its labels, as read from `cilium/state/identities/v1/id/<id>`:
/// the number from the key, parsed once where the entry is validated. Derefs to its labels.
#[derive(Clone, PartialEq, Eq, Debug, Default)]
pub struct Identity {
    /// The numeric identity.
    pub id: u32,
    /// Its labels.
    pub labels: LabelArray,
}

impl std::ops::Deref for Identity {
    type Target = LabelArray;

    fn deref(&self) -> &LabelArray {
        &self.labels
    }
}

/// A set of labels, always sorted (see [`Label`]'s ordering).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct LabelArray(Vec<Label>);

impl LabelArray {
    /// Sorts `labels` and wraps them.
    pub fn new(mut labels: Vec<Label>) -> Self {
        labels.sort();
        Self(labels)
    }

    /// Builds the array from a CiliumIdentity's `security-labels` map, whose
    /// keys are `source:key` (e.g. `k8s:app`). A key without `:` gets the
    /// `unspec` source, as in Cilium's `NewLabel`.
    pub fn from_map(map: &BTreeMap<String, String>) -> Self {
        let labels = map
            .iter()
            .map(
                |(source_and_key, value)| match source_and_key.split_once(':') {
                    Some((source, key)) if !source.is_empty() => Label::new(source, key, value),
                    Some((_, key)) => Label::new(SOURCE_UNSPEC, key, value),
                    None => Label::new(SOURCE_UNSPEC, source_and_key, value),
                },
            )
            .collect();
        Self::new(labels)
    }

    /// The kvstore value: `source:key=value;` for each label, sorted, always
    /// `;`-terminated.
    pub fn to_kvstore_string(&self) -> String {
        let mut out = String::with_capacity(
            self.0
                .iter()
                .map(|l| l.source.len() + l.key.len() + l.value.len() + 3)
                .sum(),
        );
        for label in &self.0 {
            label.write_kvstore(&mut out);
        }
        out
    }

    /// Parses a kvstore value. Empty segments (e.g. after the final `;`) are
    /// skipped; any malformed label fails the whole value.
    pub fn parse_kvstore(s: &str) -> Result<Self> {
        let labels = s
            .split(';')
            .filter(|segment| !segment.is_empty())
            .map(Label::parse)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::new(labels))
    }

    /// The first label with this key, whatever its source.
    pub fn get(&self, key: &str) -> Option<&Label> {
        // Sorted by key first, so a binary search finds the first match.
        let idx = self.0.partition_point(|l| l.key.as_str() < key);
        self.0.get(idx).filter(|l| l.key == key)
    }

    /// Iterates over the labels in order.
    pub fn iter(&self) -> std::slice::Iter<'_, Label> {
        self.0.iter()
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no labels.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The labels as a sorted slice.
    pub fn as_slice(&self) -> &[Label] {
        &self.0
    }

    /// Unwraps the sorted labels.
    pub fn into_vec(self) -> Vec<Label> {
        self.0
    }

    /// The labels as a `source:key → value` map (inverse of [`Self::from_map`]).
    pub fn to_map(&self) -> BTreeMap<String, String> {
        self.0
            .iter()
            .map(|l| (format!("{}:{}", l.source, l.key), l.value.clone()))
            .collect()
    }
}

impl fmt::Display for LabelArray {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_kvstore_string())
    }
}

impl<'a> IntoIterator for &'a LabelArray {
    type Item = &'a Label;
    type IntoIter = std::slice::Iter<'a, Label>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl FromIterator<Label> for LabelArray {
    fn from_iter<I: IntoIterator<Item = Label>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LITERAL: &str =
        "k8s:app=baz;k8s:io.cilium.k8s.policy.cluster=cluster3;k8s:io.kubernetes.pod.namespace=bar;";

    #[test]
    fn from_security_labels_map() {
        let map: BTreeMap<String, String> = [
            ("k8s:io.kubernetes.pod.namespace", "bar"),
            ("k8s:app", "baz"),
            ("k8s:io.cilium.k8s.policy.cluster", "cluster3"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let arr = LabelArray::from_map(&map);
        assert_eq!(arr.to_kvstore_string(), LITERAL);
        assert_eq!(arr.to_map(), map);
    }

    #[test]
    fn sorted_by_key_not_source() {
        let arr = LabelArray::new(vec![
            Label::new("k8s", "b", "1"),
            Label::new("reserved", "a", ""),
            Label::new("any", "c", "x"),
        ]);
        assert_eq!(arr.to_kvstore_string(), "reserved:a=;k8s:b=1;any:c=x;");
        assert_eq!(arr.get("b").map(|l| l.value.as_str()), Some("1"));
        assert!(arr.get("zz").is_none());
    }

    #[test]
    fn parse_round_trip() {
        let arr = LabelArray::parse_kvstore(LITERAL).unwrap();
        assert_eq!(arr.len(), 3);
        assert_eq!(arr.get(CLUSTER_LABEL).unwrap().value, "cluster3");
        assert_eq!(arr.to_kvstore_string(), LITERAL);
        // Missing trailing ';' is accepted; output is always terminated.
        let arr = LabelArray::parse_kvstore("k8s:app=baz").unwrap();
        assert_eq!(arr.to_kvstore_string(), "k8s:app=baz;");
        assert!(LabelArray::parse_kvstore("").unwrap().is_empty());
    }

    #[test]
    fn parse_errors() {
        let err = LabelArray::parse_kvstore("k8s:app=baz;garbage;").unwrap_err();
        assert!(err.to_string().contains("\"garbage\""), "{err}");
        assert!(err.to_string().contains("missing source"), "{err}");
        assert!(LabelArray::parse_kvstore(":app=x;").is_err());
        assert!(LabelArray::parse_kvstore("k8s:=x;").is_err());
    }

    #[test]
    fn label_parse() {
        let l = Label::parse("k8s:app=foo").unwrap();
        assert_eq!(l, Label::new("k8s", "app", "foo"));
        let l = Label::parse("reserved:host").unwrap();
        assert_eq!(l, Label::new("reserved", "host", ""));
        let l = Label::parse("k8s:a:b=c=d").unwrap();
        assert_eq!(l, Label::new("k8s", "a:b", "c=d"));
        assert_eq!(l.to_string(), "k8s:a:b=c=d");
    }

    #[test]
    fn reserved_names() {
        assert_eq!(reserved::name(reserved::HOST), Some("host"));
        assert_eq!(reserved::name(reserved::REMOTE_NODE), Some("remote-node"));
        assert_eq!(reserved::name(reserved::WORLD_IPV6), Some("world-ipv6"));
        assert_eq!(reserved::name(MIN_USER_IDENTITY), None);
    }
}
