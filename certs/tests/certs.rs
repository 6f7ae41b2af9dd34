//! Issuance, file modes, inspection and real rustls handshakes over loopback TCP.

use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use clustermesh_certs::rustls::{self, pki_types::ServerName};
use clustermesh_certs::{
    client_config, describe, describe_file, issue_cluster_set, load_client_config, server_config,
    Ca, Error, ServerSpec, SERVER_NAME,
};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn cluster_set_files_modes_and_contents() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("certs/cluster1");
    let ca = Ca::generate("Cilium CA").unwrap();
    let spec = ServerSpec {
        extra_dns_names: vec!["cluster1.mesh.example".into()],
        extra_ips: vec!["10.0.0.7".parse().unwrap()],
        ..ServerSpec::default()
    };
    let set = issue_cluster_set(&ca, "cluster1", &dir, &spec).unwrap();

    assert_eq!(mode(&dir), 0o700);
    for (files, cn) in [
        (&set.admin, "admin-cluster1"),
        (&set.local, "local-cluster1"),
        (&set.remote, "remote"),
        (&set.remote_cluster, "remote-cluster1"),
        (&set.root, "root"),
        (&set.server, SERVER_NAME),
    ] {
        assert_eq!(mode(&files.key), 0o600, "{}", files.key.display());
        assert_eq!(mode(&files.cert), 0o644, "{}", files.cert.display());
        assert_eq!(files.ca, dir.join("ca.crt"));
        let info = describe_file(&files.cert).unwrap();
        assert_eq!(info.common_name, cn);
        assert_eq!(info.issuer, "CN=Cilium CA");
        assert!(!info.is_ca);
    }
    for stem in [
        "admin-cluster1",
        "local-cluster1",
        "remote",
        "remote-cluster1",
        "root",
    ] {
        assert!(dir.join(format!("{stem}.crt")).is_file(), "{stem}");
    }
    assert_eq!(read(&dir.join("ca.crt")), ca.cert_pem());
    // No temp files left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let server = describe(&read(&set.server.cert)).unwrap();
    assert_eq!(server.subject, "CN=clustermesh-apiserver.cilium.io");
    assert_eq!(
        server.dns_names,
        [
            "clustermesh-apiserver.cilium.io",
            "*.mesh.cilium.io",
            "clustermesh-apiserver.kube-system.svc",
            "cluster1.mesh.example"
        ]
    );
    let ips: Vec<IpAddr> = ["127.0.0.1", "::1", "10.0.0.7"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    assert_eq!(server.ip_addresses, ips);
    let now = SystemTime::now();
    assert!(server.is_valid_at(now));
    let days = server.not_after.duration_since(now).unwrap().as_secs() / 86_400;
    assert!((1093..=1095).contains(&days), "{days}");
    assert_eq!(server.sha256_fingerprint.len(), 32 * 3 - 1);
    assert!(server
        .sha256_fingerprint
        .chars()
        .all(|c| c == ':' || c.is_ascii_digit() || c.is_ascii_uppercase()));

    let ca_info = describe(ca.cert_pem()).unwrap();
    assert!(ca_info.is_ca);
    assert_eq!(ca_info.subject, ca_info.issuer);
    assert_eq!(ca.subject_key_id().len(), 20);
}

#[test]
fn ca_write_load_and_key_mode() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let ca = Ca::generate("Test CA").unwrap();
    ca.write(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join("ca.key")), 0o600);
    assert_eq!(mode(&dir.join("ca.crt")), 0o644);
    let loaded = Ca::load(&dir).unwrap();
    assert_eq!(loaded.cert_pem(), ca.cert_pem());
    assert_eq!(loaded.subject_key_id(), ca.subject_key_id());

    // Overwriting an existing, too-open key file still ends with 0600.
    std::fs::set_permissions(dir.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    ca.write(&dir).unwrap();
    assert_eq!(mode(&dir.join("ca.key")), 0o600);

    let missing = Ca::load(&tmp.path().join("nope")).unwrap_err();
    assert!(matches!(missing, Error::Io { .. }), "{missing}");
}

#[test]
fn imported_ca_issues_chaining_certs() -> anyhow::Result<()> {
    let original = Ca::generate("Cilium CA")?;
    let tmp = tempfile::tempdir()?;
    original.write(tmp.path())?;
    let imported = Ca::from_pem(
        &read(&tmp.path().join("ca.crt")),
        &read(&tmp.path().join("ca.key")),
    )?;
    assert_eq!(imported.subject_key_id(), original.subject_key_id());

    // A server from the original CA accepts a client issued by the imported copy.
    let server = original.issue_server(&ServerSpec::default())?;
    let client = imported.issue_client("remote-cluster2", 30)?;
    let info = describe(&client.cert_pem)?;
    assert_eq!(info.issuer, "CN=Cilium CA");
    handshake(
        &server_config(original.cert_pem(), &server.cert_pem, &server.key_pem)?,
        client_config(imported.cert_pem(), &client.cert_pem, &client.key_pem)?,
    )
    .context("handshake with a cert from the imported CA")?;
    Ok(())
}

#[test]
fn import_rejects_wrong_inputs() {
    let a = Ca::generate("A").unwrap();
    let b = Ca::generate("B").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    a.write(tmp.path()).unwrap();
    let a_key = read(&tmp.path().join("ca.key"));

    let mismatch = Ca::from_pem(b.cert_pem(), &a_key).unwrap_err();
    assert!(matches!(mismatch, Error::KeyMismatch { .. }), "{mismatch}");

    let leaf = a.issue_client("root", 1).unwrap();
    let not_ca = Ca::from_pem(&leaf.cert_pem, &leaf.key_pem).unwrap_err();
    assert!(matches!(not_ca, Error::NotCa { .. }), "{not_ca}");

    let no_key = Ca::from_pem(a.cert_pem(), "").unwrap_err();
    assert!(no_key.to_string().contains("no PRIVATE KEY"), "{no_key}");
}

#[test]
fn leaf_validity_is_capped_by_days_and_ca() {
    let ca = Ca::generate("Cilium CA").unwrap();
    let short = describe(&ca.issue_client("root", 2).unwrap().cert_pem).unwrap();
    let left = short.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(2 * 86_400) && left > Duration::from_secs(86_400));
    let long = describe(&ca.issue_client("root", 10_000).unwrap().cert_pem).unwrap();
    assert!(long.not_after <= describe(ca.cert_pem()).unwrap().not_after);
}

#[test]
fn mtls_handshake_over_loopback() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let ca = Ca::generate("Cilium CA")?;
    let set = issue_cluster_set(&ca, "c1", tmp.path(), &ServerSpec::default())?;
    let server = server_config(
        &read(&set.server.ca),
        &read(&set.server.cert),
        &read(&set.server.key),
    )?;
    let client = load_client_config(&set.root)?;
    handshake(&server, client)?;
    Ok(())
}

#[test]
fn handshake_fails_with_foreign_or_missing_client_cert() {
    let ca = Ca::generate("Cilium CA").unwrap();
    let other = Ca::generate("Cilium CA").unwrap();
    let server_leaf = ca.issue_server(&ServerSpec::default()).unwrap();
    let server = server_config(ca.cert_pem(), &server_leaf.cert_pem, &server_leaf.key_pem).unwrap();

    // Same CN, same issuer name, different key: must be refused.
    let foreign = other.issue_client("root", 30).unwrap();
    let client = client_config(ca.cert_pem(), &foreign.cert_pem, &foreign.key_pem).unwrap();
    let err = handshake(&server, client).unwrap_err();
    assert!(format!("{err:#}").contains("server"), "{err:#}");

    let mut roots = rustls::RootCertStore::empty();
    for der in rustls_pem_certs(ca.cert_pem()) {
        roots.add(der).unwrap();
    }
    let no_cert = rustls::ClientConfig::builder_with_provider(clustermesh_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let err = handshake(&server, no_cert).unwrap_err();
    assert!(format!("{err:#}").contains("server"), "{err:#}");
}

#[test]
fn client_rejects_server_from_other_ca() {
    let ca = Ca::generate("Cilium CA").unwrap();
    let other = Ca::generate("Cilium CA").unwrap();
    let server_leaf = other.issue_server(&ServerSpec::default()).unwrap();
    let server = server_config(
        other.cert_pem(),
        &server_leaf.cert_pem,
        &server_leaf.key_pem,
    )
    .unwrap();
    let client_leaf = other.issue_client("root", 30).unwrap();
    // Client trusts only `ca`, so the server's chain is unknown.
    let client = client_config(ca.cert_pem(), &client_leaf.cert_pem, &client_leaf.key_pem).unwrap();
    assert!(handshake(&server, client).is_err());
}

fn rustls_pem_certs(pem: &str) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Runs one TLS exchange (client sends "ping", server answers "pong") over loopback TCP.
/// Returns an error naming the side that failed; both sides must succeed.
fn handshake(server: &rustls::ServerConfig, client: rustls::ClientConfig) -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let server = Arc::new(server.clone());
    let server_side = thread::spawn(move || -> anyhow::Result<()> {
        let (tcp, _) = listener.accept()?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let conn = rustls::ServerConnection::new(server)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).context("server read")?;
        anyhow::ensure!(&buf == b"ping");
        tls.write_all(b"pong").context("server write")?;
        tls.flush()?;
        let peer = tls
            .conn
            .peer_certificates()
            .context("server saw no client certificate")?
            .len();
        anyhow::ensure!(peer >= 1);
        Ok(())
    });

    let client_result = (|| -> anyhow::Result<()> {
        let tcp = TcpStream::connect(addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let name = ServerName::try_from(SERVER_NAME)?;
        let conn = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        tls.write_all(b"ping").context("client write")?;
        tls.flush()?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).context("client read")?;
        anyhow::ensure!(&buf == b"pong");
        Ok(())
    })();
    let server_result = server_side
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))?;
    server_result.context("server")?;
    client_result.context("client")?;
    Ok(())
}
