//! The etcd harness starts a real mTLS etcd that accepts only certificates from its CA.

use std::time::Duration;

use clustermesh_certs::Ca;
use clustermesh_tests::etcd::TestEtcd;
use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

fn options(tls: TlsOptions) -> ConnectOptions {
    ConnectOptions::new()
        .with_tls(tls)
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(3))
}

#[tokio::test]
async fn put_get_with_root_cert() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut client = etcd.client("root").await?;
    client.put("cilium/state/test", "hello", None).await?;
    let response = client.get("cilium/state/test", None).await?;
    assert_eq!(response.kvs().len(), 1);
    assert_eq!(response.kvs()[0].value_str()?, "hello");

    // Any CN issued on demand by the same CA is accepted (no RBAC yet).
    let mut other = etcd.client("remote-cluster9").await?;
    let response = other.get("cilium/state/test", None).await?;
    assert_eq!(response.kvs()[0].value(), b"hello");
    Ok(())
}

#[tokio::test]
async fn client_without_certificate_is_refused() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(etcd.ca().cert_pem()))
        .domain_name(clustermesh_certs::SERVER_NAME);
    let result = async {
        let mut client = Client::connect([etcd.endpoint()], Some(options(tls))).await?;
        client.put("k", "v", None).await
    }
    .await;
    assert!(result.is_err(), "put without client cert succeeded");

    // The same at the TLS layer: a rustls client without a certificate.
    let mut roots = clustermesh_certs::rustls::RootCertStore::empty();
    {
        use clustermesh_certs::rustls::pki_types::{pem::PemObject, CertificateDer};
        for der in CertificateDer::pem_slice_iter(etcd.ca().cert_pem().as_bytes()) {
            roots.add(der?)?;
        }
    }
    let config = clustermesh_certs::rustls::ClientConfig::builder_with_provider(
        clustermesh_certs::provider(),
    )
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let err = tls_round_trip(etcd.addr(), config).unwrap_err();
    assert!(format!("{err:#}").contains("BadCertificate"), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn client_certificate_from_another_ca_is_refused() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let other = Ca::generate("Cilium CA")?;
    let leaf = other.issue_client("root", 1)?;
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(etcd.ca().cert_pem()))
        .identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem))
        .domain_name(clustermesh_certs::SERVER_NAME);
    let result = async {
        let mut client = Client::connect([etcd.endpoint()], Some(options(tls))).await?;
        client.get("k", None).await
    }
    .await;
    assert!(result.is_err(), "get with a foreign client cert succeeded");

    let config =
        clustermesh_certs::client_config(etcd.ca().cert_pem(), &leaf.cert_pem, &leaf.key_pem)?;
    let err = tls_round_trip(etcd.addr(), config).unwrap_err();
    assert!(format!("{err:#}").contains("BadCertificate"), "{err:#}");

    // Positive control: the same probe with the harness's own root cert gets through.
    tls_round_trip(
        etcd.addr(),
        clustermesh_certs::load_client_config(&etcd.certs().root)?,
    )?;
    Ok(())
}

#[test]
fn restart_keeps_data_and_port_and_drop_cleans_up() -> anyhow::Result<()> {
    let mut etcd = TestEtcd::start()?;
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        etcd.client("root").await?.put("persist", "1", None).await?;
        anyhow::Ok(())
    })?;
    let endpoint = etcd.endpoint();
    let first_pid = etcd.pid().expect("running");

    etcd.kill();
    assert_eq!(etcd.pid(), None);
    etcd.restart()?;
    assert_eq!(etcd.endpoint(), endpoint);
    assert_ne!(etcd.pid(), Some(first_pid));
    let value = runtime.block_on(async {
        let response = etcd.client("root").await?.get("persist", None).await?;
        anyhow::Ok(response.kvs().first().map(|kv| kv.value().to_vec()))
    })?;
    assert_eq!(value.as_deref(), Some(&b"1"[..]));

    let yaml_path = etcd.dir().join("cfg/remote.yaml");
    etcd.write_client_config("remote", &yaml_path)?;
    let yaml: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(&yaml_path)?)?;
    assert_eq!(yaml["endpoints"][0].as_str(), Some(endpoint.as_str()));
    assert!(std::path::Path::new(yaml["key-file"].as_str().unwrap()).is_file());

    let pid = etcd.pid().expect("running");
    let dirs = [etcd.dir().to_path_buf(), etcd.data_dir().to_path_buf()];
    drop(etcd);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || is_zombie_or_gone(pid));
    for dir in dirs {
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
    Ok(())
}

#[tokio::test]
async fn stopped_process_times_out_then_recovers() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut client = etcd.client("root").await?;
    client.put("a", "1", None).await?;
    etcd.stop_process()?;
    let frozen = tokio::time::timeout(Duration::from_millis(500), client.get("a", None)).await;
    assert!(frozen.is_err() || frozen.is_ok_and(|r| r.is_err()));
    etcd.continue_process()?;
    let response = client.get("a", None).await?;
    assert_eq!(response.kvs()[0].value(), b"1");
    Ok(())
}

fn is_zombie_or_gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

/// Handshake and one etcd-independent read: with TLS 1.3 a refused client certificate only
/// shows up as an alert on the first read, so a handshake alone is not enough.
fn tls_round_trip(
    addr: std::net::SocketAddr,
    config: clustermesh_certs::rustls::ClientConfig,
) -> anyhow::Result<()> {
    use clustermesh_certs::rustls;
    use std::io::{Read, Write};
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    let name = rustls::pki_types::ServerName::try_from(clustermesh_certs::SERVER_NAME)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    // An HTTP/2 preface makes etcd answer with a SETTINGS frame if the session is accepted.
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")?;
    tls.flush()?;
    let mut buf = [0u8; 9];
    tls.read_exact(&mut buf)?;
    Ok(())
}
