//! Rotation without restarts, over real TLS connections on loopback: configs built by
//! `Reloading` present and trust what the files hold at each handshake, established
//! connections keep working, and a half-done rotation never replaces a good set.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use anyhow::{ensure, Context as _, Result};
use clustermesh_certs::rustls::{self, pki_types::ServerName};
use clustermesh_certs::{
    describe_der, describe_file, issue_cluster_set, rotate_dir, server_config, Ca, Reloading,
    ServerSpec, SERVER_NAME,
};

/// A TLS server on loopback: every accepted connection answers each 4-byte message with
/// "pong" and reports the serial of the client certificate it saw.
struct Server {
    addr: SocketAddr,
    seen: mpsc::Receiver<String>,
}

fn serve(config: rustls::ServerConfig) -> Result<Server> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let config = Arc::new(config);
    let (tx, seen) = mpsc::channel();
    thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let config = config.clone();
            let tx = tx.clone();
            thread::spawn(move || -> Result<()> {
                tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
                let mut tls = rustls::StreamOwned::new(rustls::ServerConnection::new(config)?, tcp);
                let mut buf = [0u8; 4];
                let mut reported = false;
                while tls.read_exact(&mut buf).is_ok() {
                    if !reported {
                        let der =
                            tls.conn.peer_certificates().context("no client cert")?[0].clone();
                        tx.send(describe_der(&der, "client certificate")?.serial)?;
                        reported = true;
                    }
                    tls.write_all(b"pong")?;
                    tls.flush()?;
                }
                Ok(())
            });
        }
    });
    Ok(Server { addr, seen })
}

type Client = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and exchanges one message: the stream and the server certificate's serial.
fn connect(addr: SocketAddr, config: &Arc<rustls::ClientConfig>) -> Result<(Client, String)> {
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ClientConnection::new(config.clone(), ServerName::try_from(SERVER_NAME)?)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    ping(&mut tls)?;
    let der = tls.conn.peer_certificates().context("no server cert")?[0].clone();
    let serial = describe_der(&der, "server certificate")?.serial;
    Ok((tls, serial))
}

fn ping(tls: &mut Client) -> Result<()> {
    tls.write_all(b"ping")?;
    tls.flush()?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf)?;
    ensure!(&buf == b"pong", "unexpected answer {buf:?}");
    Ok(())
}

fn serial(path: &Path) -> String {
    describe_file(path).unwrap().serial
}

#[test]
fn both_sides_use_rotated_files_at_the_next_handshake_and_keep_open_connections() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ca = Ca::generate("Cilium CA")?;
    let set = issue_cluster_set(&ca, "c1", tmp.path(), &ServerSpec::default())?;
    let server_files = Reloading::new(set.server.clone())?;
    let client_files = Reloading::new(set.root.clone())?;
    let server = serve(server_files.server_config()?)?;
    let client = Arc::new(client_files.client_config()?);

    let (old_server, old_client) = (serial(&set.server.cert), serial(&set.root.cert));
    let (mut open, seen_server) = connect(server.addr, &client)?;
    assert_eq!(seen_server, old_server);
    assert_eq!(
        server.seen.recv_timeout(Duration::from_secs(5))?,
        old_client
    );

    let rotated = rotate_dir(&ca, tmp.path(), None)?;
    assert_eq!(rotated.len(), 6, "{rotated:?}");
    let (new_server, new_client) = (serial(&set.server.cert), serial(&set.root.cert));
    assert_ne!(new_server, old_server);
    assert_ne!(new_client, old_client);
    for r in &rotated {
        assert_ne!(r.old_serial, r.new_serial, "{}", r.cert.display());
        assert_eq!(serial(&r.cert), r.new_serial);
        let mode = std::fs::metadata(&r.key)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", r.key.display());
    }
    // Same subject, SANs and a full validity again.
    let info = describe_file(&set.server.cert)?;
    assert_eq!(info.common_name, SERVER_NAME);
    assert!(info.dns_names.iter().any(|n| n == "*.mesh.cilium.io"));
    let days = info.not_after.duration_since(SystemTime::now())?.as_secs() / 86_400;
    assert!((1093..=1095).contains(&days), "{days}");

    // New handshakes: both sides present the new certificates, without a restart.
    let (_fresh, seen_server) = connect(server.addr, &client)?;
    assert_eq!(seen_server, new_server);
    assert_eq!(
        server.seen.recv_timeout(Duration::from_secs(5))?,
        new_client
    );
    assert_eq!(client_files.generation(), 1);
    assert_eq!(server_files.generation(), 1);
    // The connection made before the rotation keeps working.
    ping(&mut open).context("established connection after the rotation")?;
    // The process reports the certificate it presented last.
    let used = clustermesh_certs::reload::in_use();
    let root = used
        .iter()
        .find(|u| u.cert == set.root.cert)
        .context("root certificate listed in use")?;
    assert_eq!(root.presented.as_deref(), Some(new_client.as_str()));
    assert_eq!(root.info.serial, new_client);
    Ok(())
}

#[test]
fn certificates_expiring_within_30_days_are_warned_about_by_file() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ca = Ca::generate("Cilium CA")?;
    let set = issue_cluster_set(&ca, "c1", tmp.path(), &ServerSpec::default())?;
    let soon = ca
        .issue_client_until(
            "local-c1",
            SystemTime::now() + Duration::from_secs(12 * 86_400),
        )?
        .write(tmp.path(), "local-c1")?;
    let _in_use = Reloading::new(soon.clone())?;
    let report = clustermesh_certs::expiry::report(
        &[(set.server.cert.as_path(), "server")],
        SystemTime::now(),
    );
    let mine: Vec<&String> = report
        .warnings
        .iter()
        .filter(|w| w.contains(&tmp.path().display().to_string()))
        .collect();
    assert_eq!(mine.len(), 1, "{:?}", report.warnings);
    assert!(
        mine[0].contains(&soon.cert.display().to_string()),
        "{}",
        mine[0]
    );
    assert!(
        mine[0].contains("in 11 days") || mine[0].contains("in 12 days"),
        "{}",
        mine[0]
    );
    assert!(mine[0].contains("clustermesh certs rotate"), "{}", mine[0]);
    let server = report
        .certificates
        .iter()
        .find(|c| c.file == set.server.cert)
        .context("the extra server certificate is listed")?;
    assert_eq!(server.role, "server");
    assert!(server.days_left > 1000);
    assert!(report
        .certificates
        .iter()
        .any(|c| c.file == soon.ca && c.role == "ca"));
    Ok(())
}

#[test]
fn a_key_without_its_certificate_keeps_the_previous_pair() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ca = Ca::generate("Cilium CA")?;
    let set = issue_cluster_set(&ca, "c1", tmp.path(), &ServerSpec::default())?;
    let server_leaf = std::fs::read_to_string(&set.server.cert)?;
    let server_key = std::fs::read_to_string(&set.server.key)?;
    let server = serve(server_config(ca.cert_pem(), &server_leaf, &server_key)?)?;
    let files = Reloading::new(set.root.clone())?;
    let client = Arc::new(files.client_config()?);
    let old = serial(&set.root.cert);

    // The first half of a rotation: the new key is in place, the certificate is not.
    let next = ca.issue_client("root", 30)?;
    std::fs::write(&set.root.key, &next.key_pem)?;
    connect(server.addr, &client).context("handshake during a half-done rotation")?;
    assert_eq!(server.seen.recv_timeout(Duration::from_secs(5))?, old);
    let err = files
        .last_error()
        .context("the failed reload is reported")?;
    assert!(err.contains("does not match"), "{err}");
    assert!(err.contains("root.crt"), "names the file: {err}");

    std::fs::write(&set.root.cert, &next.cert_pem)?;
    connect(server.addr, &client)?;
    assert_eq!(
        server.seen.recv_timeout(Duration::from_secs(5))?,
        serial(&set.root.cert)
    );
    assert!(files.last_error().is_none());
    Ok(())
}

#[test]
fn a_new_ca_in_the_bundle_is_trusted_at_the_next_handshake() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let ca = Ca::generate("Cilium CA")?;
    let set = issue_cluster_set(&ca, "c1", tmp.path(), &ServerSpec::default())?;
    let files = Reloading::new(set.root.clone())?;
    let client = Arc::new(files.client_config()?);

    // A server whose certificate a new CA issued (and which trusts both CAs).
    let next = Ca::generate("Cilium CA 2")?;
    let leaf = next.issue_server(&ServerSpec::default())?;
    let bundle = format!("{}{}", ca.cert_pem(), next.cert_pem());
    let server = serve(server_config(&bundle, &leaf.cert_pem, &leaf.key_pem)?)?;
    let err = connect(server.addr, &client)
        .err()
        .context("unknown CA accepted")?;
    assert!(format!("{err:#}").contains("UnknownIssuer"), "{err:#}");

    std::fs::write(&set.root.ca, &bundle)?;
    connect(server.addr, &client).context("after adding the new CA to the bundle")?;
    Ok(())
}

#[test]
fn expiring_certificates_can_be_issued() -> Result<()> {
    let ca = Ca::generate("Cilium CA")?;
    let in_ten_days = SystemTime::now() + Duration::from_secs(10 * 86_400);
    let soon = clustermesh_certs::describe(&ca.issue_client_until("root", in_ten_days)?.cert_pem)?;
    let left = soon.not_after.duration_since(SystemTime::now())?;
    assert!(left <= Duration::from_secs(10 * 86_400) && left > Duration::from_secs(9 * 86_400));
    let yesterday = SystemTime::now() - Duration::from_secs(86_400);
    let expired = clustermesh_certs::describe(&ca.issue_client_until("root", yesterday)?.cert_pem)?;
    assert!(!expired.is_valid_at(SystemTime::now()));
    assert!(expired.not_before < expired.not_after);
    Ok(())
}
