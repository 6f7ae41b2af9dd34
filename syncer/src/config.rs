//! etcd client configuration files in the format of etcd's `clientv3/yaml`, as Cilium reads
//! them for remote clusters (`endpoints`, `trusted-ca-file`, `cert-file`, `key-file`) plus
//! the optional `cilium-host-aliases` list and, ours, the optional `cluster-cidr` list: the
//! remote cluster's pod CIDRs (written by `clustermesh connect` from the remote's own
//! settings), outside which none of its ipcache entries or node pod CIDRs is accepted
//! (`remote::validate`). Cilium ignores the key.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use clustermesh_types::cluster_cidrs::ClusterCidrs;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// One `cilium-host-aliases` entry: a host name and the IPs it resolves to without DNS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostAlias {
    /// Host name used in `endpoints` and for TLS server-name verification.
    pub hostname: String,
    /// Addresses to dial instead of resolving the name.
    pub ips: Vec<IpAddr>,
}

/// An etcd client configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct EtcdConfig {
    /// `https://host:port` URLs.
    pub endpoints: Vec<String>,
    /// CA bundle that the server certificate must chain to.
    #[serde(default, alias = "ca-file", skip_serializing_if = "Option::is_none")]
    pub trusted_ca_file: Option<PathBuf>,
    /// Client certificate (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Client key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// Host names resolved from this file rather than DNS.
    #[serde(
        default,
        rename = "cilium-host-aliases",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub host_aliases: Vec<HostAlias>,
    /// The remote cluster's pod CIDRs (IPv4 and IPv6): the only prefixes its entries may
    /// claim. Empty (absent): no such rule.
    #[serde(
        default,
        rename = "cluster-cidr",
        skip_serializing_if = "ClusterCidrs::is_empty"
    )]
    pub cluster_cidrs: ClusterCidrs,
}

impl EtcdConfig {
    /// Parses and validates a config file's text; `origin` names it in errors.
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self> {
        let cfg: EtcdConfig = serde_yaml::from_str(text).map_err(|source| Error::ConfigParse {
            path: origin.to_path_buf(),
            source,
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    /// Reads and validates a config file. Relative certificate paths are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            what: "read etcd config",
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_yaml(&text, path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        for p in [
            &mut cfg.trusted_ca_file,
            &mut cfg.cert_file,
            &mut cfg.key_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(cfg)
    }

    /// Writes the file (0600: it names key material locations).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_yaml::to_string(self).map_err(|source| Error::ConfigParse {
            path: path.to_path_buf(),
            source,
        })?;
        write_private(path, text.as_bytes())
    }

    fn validate(&self, origin: &Path) -> Result<()> {
        let bad = |reason: String| Error::ConfigInvalid {
            path: origin.to_path_buf(),
            reason,
        };
        if self.endpoints.is_empty() {
            return Err(bad("no endpoints".into()));
        }
        for e in &self.endpoints {
            let (scheme, _) = split_endpoint(e).map_err(|r| bad(format!("endpoint {e:?}: {r}")))?;
            if scheme != "https" {
                return Err(bad(format!(
                    "endpoint {e:?} is not https: clustermesh only talks to etcd over mTLS"
                )));
            }
        }
        if self.trusted_ca_file.is_none() || self.cert_file.is_none() || self.key_file.is_none() {
            return Err(bad(
                "trusted-ca-file, cert-file and key-file are all required (mTLS)".into(),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.host_aliases {
            if a.hostname.is_empty() {
                return Err(bad(
                    "cilium-host-aliases entry with an empty hostname".into()
                ));
            }
            if a.ips.is_empty() {
                return Err(bad(format!(
                    "cilium-host-aliases entry {:?} has no ips",
                    a.hostname
                )));
            }
            if !seen.insert(a.hostname.as_str()) {
                return Err(bad(format!(
                    "cilium-host-aliases lists {:?} twice",
                    a.hostname
                )));
            }
        }
        Ok(())
    }
}

/// The `cluster-cidr` of a remote cluster config file, read on its own: the agents' files
/// (KVStoreMesh mode) only name the local etcd, so the rest of the file is not checked
/// here. A file without the key has no rule; a CIDR that does not parse is an error naming
/// the file (a remote must not be read without the rule its file asks for).
pub fn remote_cluster_cidrs(path: &Path) -> Result<ClusterCidrs> {
    #[derive(Deserialize)]
    struct OnlyCidrs {
        #[serde(default, rename = "cluster-cidr")]
        cluster_cidrs: ClusterCidrs,
    }
    let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
        what: "read remote cluster config",
        path: path.to_path_buf(),
        source,
    })?;
    let only: OnlyCidrs = serde_yaml::from_str(&text).map_err(|source| Error::ConfigParse {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(only.cluster_cidrs)
}

/// Splits `https://host:port` into (scheme, host:port).
pub(crate) fn split_endpoint(e: &str) -> std::result::Result<(&str, &str), String> {
    let (scheme, rest) = e
        .split_once("://")
        .ok_or_else(|| "missing scheme (want https://host:port)".to_string())?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() {
        return Err("missing host".into());
    }
    Ok((scheme, rest))
}

/// Splits `host:port` / `[v6]:port` into host and port.
pub(crate) fn split_host_port(hp: &str) -> Option<(&str, u16)> {
    if let Some(rest) = hp.strip_prefix('[') {
        let (host, port) = rest.split_once("]:")?;
        return Some((host, port.parse().ok()?));
    }
    let (host, port) = hp.rsplit_once(':')?;
    Some((host, port.parse().ok()?))
}

/// Writes a file that is created 0600 from the start.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let io = |source| Error::Io {
        what: "write file",
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp~");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cilium_file() {
        let text = "endpoints:\n- https://cluster2.mesh.cilium.io:2379\ntrusted-ca-file: /var/lib/cilium/clustermesh/common-etcd-client-ca.crt\nkey-file: /var/lib/cilium/clustermesh/common-etcd-client.key\ncert-file: /var/lib/cilium/clustermesh/common-etcd-client.crt\ncilium-host-aliases:\n- hostname: cluster2.mesh.cilium.io\n  ips: [172.18.255.201]\n";
        let cfg = EtcdConfig::from_yaml(text, Path::new("cluster2")).unwrap();
        assert_eq!(cfg.endpoints, vec!["https://cluster2.mesh.cilium.io:2379"]);
        assert_eq!(cfg.host_aliases[0].ips[0].to_string(), "172.18.255.201");
    }

    #[test]
    fn rejects_plaintext_and_missing_certs() {
        let e = EtcdConfig::from_yaml(
            "endpoints: [http://127.0.0.1:2379]\ntrusted-ca-file: a\ncert-file: b\nkey-file: c\n",
            Path::new("x"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("not https"), "{e}");
        let e = EtcdConfig::from_yaml("endpoints: [https://127.0.0.1:2379]\n", Path::new("x"))
            .unwrap_err();
        assert!(e.to_string().contains("required"), "{e}");
        let e = EtcdConfig::from_yaml("endpoints: [", Path::new("x")).unwrap_err();
        assert!(e.to_string().contains("x"), "{e}");
    }

    #[test]
    fn cluster_cidrs_round_trip_and_bad_ones_are_named() {
        let text = "endpoints: [https://127.0.0.1:2379]\ntrusted-ca-file: a\ncert-file: b\nkey-file: c\ncluster-cidr: [10.2.0.0/16, \"fd00:2::/64\"]\n";
        let cfg = EtcdConfig::from_yaml(text, Path::new("c2")).unwrap();
        assert_eq!(
            cfg.cluster_cidrs.to_strings(),
            ["10.2.0.0/16", "fd00:2::/64"]
        );
        let again = serde_yaml::to_string(&cfg).unwrap();
        assert_eq!(EtcdConfig::from_yaml(&again, Path::new("c2")).unwrap(), cfg);
        let none = EtcdConfig::from_yaml(&text.replace("cluster-cidr", "x-other"), Path::new("c2"))
            .unwrap();
        assert!(none.cluster_cidrs.is_empty());
        assert!(!serde_yaml::to_string(&none)
            .unwrap()
            .contains("cluster-cidr"));
        let e = EtcdConfig::from_yaml(&text.replace("10.2.0.0/16", "10.2.0.0/99"), Path::new("c2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c2") && e.contains("10.2.0.0/99"), "{e}");
    }

    #[test]
    fn host_port_split() {
        assert_eq!(split_host_port("127.0.0.1:2379"), Some(("127.0.0.1", 2379)));
        assert_eq!(split_host_port("[::1]:2379"), Some(("::1", 2379)));
        assert_eq!(split_host_port("a.b:x"), None);
    }
}
