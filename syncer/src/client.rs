//! Connecting to etcd over mTLS from an [`EtcdConfig`].

use std::time::Duration;

use clustermesh_certs::{CertFiles, Reloading};
use etcd_client::{Certificate, Channel, ConnectOptions, Identity, TlsOptions};

use crate::config::{split_endpoint, split_host_port, EtcdConfig};
use crate::{transport, Error, Result};

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
    /// TCP connect and TLS handshake timeout, each, per endpoint.
    pub connect_timeout: Duration,
    /// HTTP/2 keepalive interval and timeout while a stream is open: a dead peer ends the
    /// connection's streams within `interval + timeout`. Default 1 s + 2 s, so a partition
    /// shows within 5 s (Cilium's 15 s + 25 s took 40 s). The etcd must accept pings that
    /// often: `--grpc-keepalive-min-time` at most the interval (the embedded etcd has it).
    pub keepalive: (Duration, Duration),
}

/// Default HTTP/2 keepalive interval of every etcd client.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// Default HTTP/2 keepalive timeout of every etcd client.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

impl Default for ConnectConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(5),
            keepalive: (KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT),
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

/// The certificate, key and CA files named in `cfg`.
pub fn tls_files(cfg: &EtcdConfig) -> Result<CertFiles> {
    let need = |p: &Option<std::path::PathBuf>, what: &'static str| {
        p.clone().ok_or(Error::MissingTlsFile { what })
    };
    Ok(CertFiles {
        ca: need(&cfg.trusted_ca_file, "read trusted-ca-file")?,
        cert: need(&cfg.cert_file, "read cert-file")?,
        key: need(&cfg.key_file, "read key-file")?,
    })
}

/// mTLS options for a plain `etcd_client` connection from the files named in `cfg`, read
/// once (the tests' raw clients; the products connect through [`connect`], whose TLS
/// re-reads the files at every handshake).
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
/// The connection re-reads the certificate files at every handshake (see
/// [`crate::transport`]), also when it reconnects on its own after etcd restarted. It is made
/// lazily, so a `status` call proves the TLS handshake and the client certificate were
/// accepted; a failure is classified ([`crate::failure`]) into a hint about what to fix.
pub async fn connect(cfg: &EtcdConfig, opts: &ConnectConfig) -> Result<Client> {
    let (endpoints, server_name) = dial_endpoints(cfg).await?;
    let files = tls_files(cfg)?;
    let tls = Reloading::new(files.clone()).map_err(|source| Error::Tls {
        cert: files.cert.clone(),
        source,
    })?;
    let dial: Vec<String> = endpoints
        .iter()
        .map(|e| e.trim_start_matches("https://").to_owned())
        .collect();
    let dialer = transport::Dialer::new(dial, &server_name, &tls, opts.connect_timeout)?;
    let tls_errors = dialer.clone();
    let channel = transport::channel(
        dialer,
        &transport::Http2 {
            keepalive_interval: opts.keepalive.0,
            keepalive_timeout: opts.keepalive.1,
        },
    )?;
    let failed = |source: etcd_client::Error, tls: Option<clustermesh_certs::rustls::Error>| {
        // A refused client certificate shows only as "connection closed" to the request.
        let failure = match tls {
            Some(tls) => crate::failure::classify_tls(&tls, &endpoints.join(","), Some(cfg)),
            None => crate::failure::classify(&source, Some(cfg)),
        };
        Error::Connect {
            endpoints: endpoints.join(","),
            class: failure.class,
            hint: failure.hint,
            source,
        }
    };
    let mut client =
        etcd_client::Client::from_channel(Channel::Tonic(channel), Some(ConnectOptions::new()))
            .await
            .map_err(|source| failed(source, tls_errors.last_tls_error()))?;
    let status = tokio::time::timeout(opts.connect_timeout * 2, client.status())
        .await
        .map_err(|_| Error::Timeout {
            what: "etcd status",
            endpoints: endpoints.join(","),
        })?;
    if let Err(source) = status {
        let tls = match tls_errors.last_tls_error() {
            Some(tls) => Some(tls),
            None => {
                tls_errors.diagnose().await;
                tls_errors.last_tls_error()
            }
        };
        return Err(failed(source, tls));
    }
    Ok(Client(client))
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
            cluster_cidrs: Default::default(),
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
