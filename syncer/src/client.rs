//! Connecting to etcd over mTLS from an [`EtcdConfig`].

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{split_endpoint, split_host_port, EtcdConfig};
use crate::{Error, Result};

/// Largest response a list may return (250k keys are about 80 MB, see TOOLCHAIN.md).
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024 * 1024;

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
    let (endpoints, server_name) = resolve_endpoints(cfg)?;
    let options = ConnectOptions::new()
        .with_tls(tls_options(cfg, &server_name)?)
        .with_connect_timeout(opts.connect_timeout)
        .with_keep_alive(opts.keepalive.0, opts.keepalive.1)
        .with_keep_alive_while_idle(true);
    let mut client = Client::connect(&endpoints, Some(options))
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
    Ok(client)
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
