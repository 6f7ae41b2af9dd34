//! Connecting to etcd over mTLS from an [`EtcdConfig`].

use std::time::Duration;

use etcd_client::{Certificate, ConnectOptions, Identity, TlsOptions};

use crate::config::{split_endpoint, split_host_port, EtcdConfig};
use crate::{Error, Result};

/// Largest response a list may return (250k keys are about 80 MB, see TOOLCHAIN.md).
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

/// A connection to one etcd cluster, from [`connect`] (clones share it).
///
/// The crates above hand it to this crate's functions ([`crate::Writer::new`],
/// [`crate::list::list_prefix`], [`crate::auth`]) and never speak etcd's API themselves:
/// `etcd-client` has its one home here, so a change of client or of etcd's API stays here.
#[derive(Clone)]
pub struct Client(pub(crate) etcd_client::Client);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Client")
    }
}

impl Client {
    /// Asks etcd for its status: `Ok` if the cluster answers (a cheap liveness probe).
    pub async fn probe(&self) -> Result<()> {
        self.0
            .clone()
            .status()
            .await
            .map(|_| ())
            .map_err(|source| Error::Etcd {
                op: "status",
                key: String::new(),
                source,
            })
    }
}

/// Knobs for [`connect`].
#[derive(Debug, Clone)]
pub struct ConnectConfig {
    /// TCP + TLS connect timeout per endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive interval and timeout (Cilium: 15 s / 25 s).
    pub keepalive: (Duration, Duration),
}

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive: (Duration::from_secs(15), Duration::from_secs(25)),
        }
    }
}

/// The endpoints to dial and the name to verify the server certificate against, after
/// applying `cilium-host-aliases`.
pub fn resolve_endpoints(cfg: &EtcdConfig) -> Result<(Vec<String>, String)> {
    let mut out = Vec::new();
    let mut server_name = None;
    for e in &cfg.endpoints {
        let (_, hp) = split_endpoint(e).map_err(|reason| Error::Endpoint {
            endpoint: e.clone(),
            reason,
        })?;
        let (host, port) = split_host_port(hp).ok_or_else(|| Error::Endpoint {
            endpoint: e.clone(),
            reason: "want https://host:port".into(),
        })?;
        server_name.get_or_insert_with(|| host.to_string());
        match cfg.host_aliases.iter().find(|a| a.hostname == host) {
            Some(alias) => {
                for ip in &alias.ips {
                    out.push(match ip {
                        std::net::IpAddr::V4(v4) => format!("https://{v4}:{port}"),
                        std::net::IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
                    });
                }
            }
            None => out.push(format!("https://{hp}")),
        }
    }
    let server_name = server_name.ok_or_else(|| Error::Endpoint {
        endpoint: String::new(),
        reason: "no endpoints".into(),
    })?;
    Ok((out, server_name))
}

/// [`resolve_endpoints`], then every remaining host name resolved with hickory-resolver
/// (see [`crate::resolve`]): the addresses to dial, and the name the server certificate
/// must carry.
pub async fn dial_endpoints(cfg: &EtcdConfig) -> Result<(Vec<String>, String)> {
    let (endpoints, server_name) = resolve_endpoints(cfg)?;
    let mut out = Vec::with_capacity(endpoints.len());
    for e in endpoints {
        let hp = e.trim_start_matches("https://");
        let Some((host, port)) = split_host_port(hp) else {
            out.push(e);
            continue;
        };
        if host.parse::<std::net::IpAddr>().is_ok() {
            out.push(e);
            continue;
        }
        let ips = crate::resolve::lookup(host)
            .await
            .map_err(|err| Error::Endpoint {
                endpoint: e.clone(),
                reason: format!(
                    "cannot resolve {host}: {err}; fix DNS or /etc/hosts, or add the name to cilium-host-aliases in the file"
                ),
            })?;
        for ip in ips {
            out.push(match ip {
                std::net::IpAddr::V4(v4) => format!("https://{v4}:{port}"),
                std::net::IpAddr::V6(v6) => format!("https://[{v6}]:{port}"),
            });
        }
    }
    Ok((out, server_name))
}

/// Builds the mTLS options from the files named in `cfg`.
pub fn tls_options(cfg: &EtcdConfig, server_name: &str) -> Result<TlsOptions> {
    let read = |p: &Option<std::path::PathBuf>, what: &'static str| -> Result<Vec<u8>> {
        let p = p.as_ref().ok_or(Error::MissingTlsFile { what })?;
        std::fs::read(p).map_err(|source| Error::Io {
            what,
            path: p.clone(),
            source,
        })
    };
    let ca = read(&cfg.trusted_ca_file, "read trusted-ca-file")?;
    let cert = read(&cfg.cert_file, "read cert-file")?;
    let key = read(&cfg.key_file, "read key-file")?;
    Ok(TlsOptions::new()
        .ca_certificate(Certificate::from_pem(ca))
        .identity(Identity::from_pem(cert, key))
        .domain_name(server_name.trim_start_matches('[').trim_end_matches(']')))
}

/// Connects to the etcd described by `cfg` with mTLS and checks that it answers.
///
/// etcd-client connects lazily, so a `status` call proves the TLS handshake and the client
/// certificate were accepted; its error is turned into a hint about what to fix.
pub async fn connect(cfg: &EtcdConfig, opts: &ConnectConfig) -> Result<Client> {
    let (endpoints, server_name) = dial_endpoints(cfg).await?;
    let options = ConnectOptions::new()
        .with_tls(tls_options(cfg, &server_name)?)
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(opts.keepalive.0, opts.keepalive.1)
        .with_keep_alive_while_idle(true);
    let mut client = etcd_client::Client::connect(&endpoints, Some(options))
        .await
        .map_err(|source| Error::Connect {
            endpoints: endpoints.join(","),
            hint: hint_for(&source),
            source,
        })?;
    tokio::time::timeout(opts.connect_timeout * 2, client.status())
        .await
        .map_err(|_| Error::Timeout {
            what: "etcd status",
            endpoints: endpoints.join(","),
        })?
        .map_err(|source| Error::Connect {
            endpoints: endpoints.join(","),
            hint: hint_for(&source),
            source,
        })?;
    Ok(Client(client))
}

/// A short, actionable explanation for a connect failure.
pub fn hint_for(e: &etcd_client::Error) -> String {
    let text = format!("{e:?}").to_lowercase();
    if text.contains("unknownissuer")
        || text.contains("unknown issuer")
        || text.contains("invalid peer certificate")
    {
        "the server certificate does not chain to trusted-ca-file: both clusters must share a CA (or connect with --allow-mismatching-ca)".into()
    } else if text.contains("certificate required")
        || text.contains("bad certificate")
        || text.contains("unknown ca")
        || text.contains("handshake")
        || text.contains("tls")
    {
        "TLS handshake refused: the client certificate must be issued by the CA that etcd trusts"
            .into()
    } else if text.contains("notvalidforname") || text.contains("not valid for name") {
        "the server certificate is not valid for the endpoint host name: add it with --extra-dns/--extra-ip when issuing the server certificate".into()
    } else if text.contains("permission denied") || text.contains("user name is empty") {
        "etcd refused the user named by the client certificate's CN".into()
    } else if text.contains("connection refused")
        || text.contains("transport error")
        || text.contains("deadline")
        || text.contains("timed out")
    {
        "etcd is not reachable at that address: is it running, and is the port right?".into()
    } else {
        "check the endpoint, the certificates and that etcd is running".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoints: &[&str], aliases: &str) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            trusted_ca_file: None,
            cert_file: None,
            key_file: None,
            host_aliases: serde_yaml::from_str(aliases).unwrap_or_default(),
        }
    }

    #[tokio::test]
    async fn names_are_resolved_aliases_first_and_ips_kept() {
        let cfg = config(
            &[
                "https://c2.mesh.cilium.io:2379",
                "https://localhost:2380",
                "https://10.0.0.9:2381",
            ],
            "- hostname: c2.mesh.cilium.io\n  ips: [192.0.2.7]\n",
        );
        let (dial, server_name) = dial_endpoints(&cfg).await.unwrap();
        assert_eq!(server_name, "c2.mesh.cilium.io");
        assert_eq!(dial[0], "https://192.0.2.7:2379");
        assert_eq!(dial[1], "https://127.0.0.1:2380");
        assert_eq!(
            dial.last().map(String::as_str),
            Some("https://10.0.0.9:2381")
        );
    }

    #[tokio::test]
    async fn an_unresolvable_name_says_what_to_do() {
        let cfg = config(&["https://cluster9.mesh.invalid:2379"], "");
        let err = dial_endpoints(&cfg).await.unwrap_err().to_string();
        assert!(
            err.contains("cannot resolve cluster9.mesh.invalid"),
            "{err}"
        );
        assert!(err.contains("cilium-host-aliases"), "{err}");
    }
}
