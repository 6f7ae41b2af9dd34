//! The crate-wide error type.

/// Everything that can go wrong while validating, parsing or decoding schema data.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A cluster name does not match `^([a-z0-9][-a-z0-9]*)?[a-z0-9]$` or is too long.
    #[error("invalid cluster name {name:?}: {reason}")]
    InvalidClusterName {
        /// The rejected name.
        name: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// A `max-connected-clusters` value other than 255 or 511.
    #[error("invalid max connected clusters {value}: allowed values are 255 and 511")]
    InvalidMaxConnectedClusters {
        /// The rejected value.
        value: u32,
    },

    /// A cluster ID outside `1..=max`.
    #[error("invalid cluster id {id}: {reason}")]
    InvalidClusterId {
        /// The rejected ID.
        id: u32,
        /// Why it was rejected.
        reason: String,
    },

    /// A label or label string that cannot be parsed.
    #[error("invalid label {label:?}: {reason}")]
    InvalidLabel {
        /// The offending label text.
        label: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An etcd key that does not have the expected prefix or shape.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey {
        /// The offending key.
        key: String,
        /// Why it was rejected.
        reason: String,
    },

    /// A value that is not well-formed JSON for its type.
    #[error("cannot decode {kind} value")]
    Decode {
        /// The value type that failed, e.g. `Node`.
        kind: &'static str,
        /// The JSON error, with line and column.
        #[source]
        source: serde_json::Error,
    },

    /// A value that decoded but breaks a rule of its type.
    #[error("invalid {kind} value: {reason}")]
    InvalidValue {
        /// The value type, e.g. `ClusterService`.
        kind: &'static str,
        /// The broken rule.
        reason: String,
    },

    /// A CIDR in string or `{IP, Mask}` form that cannot be parsed.
    #[error("invalid cidr {value:?}: {reason}")]
    InvalidCidr {
        /// The offending text.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },

    /// An RFC 3339 timestamp that cannot be parsed.
    #[error("invalid rfc3339 timestamp {value:?}: {reason}")]
    InvalidTimestamp {
        /// The offending text.
        value: String,
        /// Why it was rejected.
        reason: &'static str,
    },
}

/// Result with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
