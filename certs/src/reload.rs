//! TLS material that follows its files: a certificate, its key and the trusted CA bundle are
//! re-read whenever one of the files changed, checked at every handshake (as Cilium does:
//! its etcd clients and servers reload on each new connection).
//!
//! [`Reloading`] keeps the last good set of files parsed in memory. Every handshake asks it
//! for the current set ([`Reloading::current`]): that costs three `stat(2)` calls, and a
//! re-read only when a file's inode, size or modification time changed. The rustls configs
//! built by [`Reloading::client_config`] and [`Reloading::server_config`] resolve their own
//! certificate and build their peer verifier from that set, so a rotated certificate, key or
//! CA is used by the next handshake while established connections keep the session they
//! negotiated.
//!
//! A set that does not load (a half-written file, a key that does not match the new
//! certificate between the two renames of a rotation, a typo) never replaces a good one: the
//! previous set stays in use, the error is kept for [`Reloading::last_error`] and logged
//! once, and the next handshake tries again.
//!
//! Every live [`Reloading`] is listed by [`in_use`], so a process can report the certificates
//! it presents, when they expire, and which serial its last handshake presented, without
//! each caller threading them through.
//!
//! This module must not watch directories or spawn tasks: checking at the handshake is what
//! makes it correct for every process without a background job (a file that changes while no
//! connection is made is simply read by the next one).

use std::fmt;
use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::SystemTime;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ResolvesClientCert, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, ServerConfig, SignatureScheme,
};

use crate::describe::{describe, CertInfo};
use crate::fs::read_to_string;
use crate::issue::CertFiles;
use crate::pem::{certs, private_key};
use crate::tls::{provider, root_store};
use crate::{Error, Result};

/// ALPN of gRPC over TLS: etcd's Go server only speaks HTTP/2 on a connection that
/// negotiated it.
const H2: &[u8] = b"h2";

/// One loaded set of files.
#[derive(Debug)]
pub struct Loaded {
    /// The certificate chain and signing key presented to peers.
    pub certified: Arc<CertifiedKey>,
    /// Facts about the leaf certificate (serial, expiry, …).
    pub cert: CertInfo,
    /// Facts about every CA of the trusted bundle.
    pub cas: Vec<CertInfo>,
    server_verifier: Arc<WebPkiServerVerifier>,
    client_verifier: Arc<dyn ClientCertVerifier>,
}

/// What identifies a file's content cheaply: a rename changes the inode, a rewrite in place
/// the size or the modification time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: i64,
    mtime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        mtime: m.mtime(),
        mtime_nsec: m.mtime_nsec(),
    })
}

#[derive(Debug)]
struct State {
    stamps: [Option<Stamp>; 3],
    loaded: Arc<Loaded>,
    /// The last failed reload, until a reload succeeds.
    error: Option<String>,
    /// Reloads that replaced the set (0 = still the initial one).
    generation: u64,
    /// Serial of the certificate the last handshake presented, with its place in the
    /// process-wide order of handshakes.
    presented: Option<(u64, String)>,
}

/// Orders handshakes across every [`Reloading`], so the latest presentation of a file wins.
static HANDSHAKES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Every [`Reloading`] made in this process (dead ones are dropped when listed).
static REGISTRY: Mutex<Vec<Weak<Reloading>>> = Mutex::new(Vec::new());

/// A certificate in use by this process, as [`in_use`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InUse {
    /// The certificate file.
    pub cert: PathBuf,
    /// The CA bundle that verifies peers.
    pub ca: PathBuf,
    /// The certificate in use (the last set that loaded).
    pub info: CertInfo,
    /// The CA of the bundle that expires first.
    pub ca_not_after: Option<SystemTime>,
    /// Serial of the certificate the last handshake presented (`None` before the first).
    pub presented: Option<String>,
    /// Why the files on disk are not the ones in use, if they are not.
    pub reload_error: Option<String>,
}

/// The certificates this process presents, one entry per certificate file, sorted by file.
/// Each is checked against its files first, so a rotation shows even before a handshake.
pub fn in_use() -> Vec<InUse> {
    let live: Vec<Arc<Reloading>> = {
        let mut reg = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
        reg.retain(|w| w.strong_count() > 0);
        reg.iter().filter_map(Weak::upgrade).collect()
    };
    let mut out: Vec<(u64, InUse)> = Vec::new();
    for r in live {
        let loaded = r.current();
        let state = r.state.lock().unwrap_or_else(PoisonError::into_inner);
        let seq = state.presented.as_ref().map_or(0, |(n, _)| *n);
        let entry = InUse {
            cert: r.files.cert.clone(),
            ca: r.files.ca.clone(),
            info: loaded.cert.clone(),
            ca_not_after: loaded.cas.iter().map(|c| c.not_after).min(),
            presented: state.presented.as_ref().map(|(_, s)| s.clone()),
            reload_error: state.error.clone(),
        };
        drop(state);
        match out.iter_mut().find(|(_, e)| e.cert == entry.cert) {
            // Several clients share a file: the latest handshake says what is presented now.
            Some(e) if e.0 < seq => *e = (seq, entry),
            Some(_) => {}
            None => out.push((seq, entry)),
        }
    }
    let mut out: Vec<InUse> = out.into_iter().map(|(_, e)| e).collect();
    out.sort_by(|a, b| a.cert.cmp(&b.cert));
    out
}

/// A certificate, key and CA bundle on disk, re-read when they change. See the module docs.
pub struct Reloading {
    files: CertFiles,
    state: Mutex<State>,
}

impl fmt::Debug for Reloading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reloading")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Reloading {
    /// Loads `files` once; an error here is a configuration error the caller reports.
    pub fn new(files: CertFiles) -> Result<Arc<Self>> {
        let stamps = stamps(&files);
        let loaded = Arc::new(load(&files)?);
        let me = Arc::new(Self {
            files,
            state: Mutex::new(State {
                stamps,
                loaded,
                error: None,
                generation: 0,
                presented: None,
            }),
        });
        REGISTRY
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Arc::downgrade(&me));
        Ok(me)
    }

    /// The current set, recorded as presented by a handshake.
    fn present(&self) -> Arc<CertifiedKey> {
        let loaded = self.current();
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .presented = Some((
            HANDSHAKES.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            loaded.cert.serial.clone(),
        ));
        loaded.certified.clone()
    }

    /// The files this set is read from.
    pub fn files(&self) -> &CertFiles {
        &self.files
    }

    /// The current set: re-read first if a file changed since the last look; on a failed
    /// re-read the previous set (see the module docs).
    pub fn current(&self) -> Arc<Loaded> {
        let now = stamps(&self.files);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now == state.stamps {
            return state.loaded.clone();
        }
        match load(&self.files) {
            Ok(loaded) => {
                tracing::info!(
                    cert = %self.files.cert.display(),
                    serial = %loaded.cert.serial,
                    not_after = %crate::describe::rfc3339(loaded.cert.not_after),
                    "TLS certificate files changed: new handshakes use the new certificate"
                );
                state.loaded = Arc::new(loaded);
                state.stamps = now;
                state.error = None;
                state.generation += 1;
            }
            Err(e) => {
                let text = error_chain(&e);
                if state.error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(
                        cert = %self.files.cert.display(),
                        error = %text,
                        "TLS certificate files changed but do not load: still using the previous ones"
                    );
                    state.error = Some(text);
                }
                // Not recording the stamps makes the next handshake try again (a rotation
                // renames the key and the certificate one after the other).
            }
        }
        state.loaded.clone()
    }

    /// Why the files on disk are not the ones in use, if they are not.
    pub fn last_error(&self) -> Option<String> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .error
            .clone()
    }

    /// How many times a changed set of files replaced the one in use.
    pub fn generation(&self) -> u64 {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .generation
    }

    /// A client config (mTLS, ALPN `h2`) presenting the current certificate and verifying
    /// servers against the current CA bundle, both looked up at every handshake.
    pub fn client_config(self: &Arc<Self>) -> Result<ClientConfig> {
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::Tls {
                what: "client config",
                source,
            })?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ServerVerifier(self.clone())))
            .with_client_cert_resolver(Arc::new(ClientCert(self.clone())));
        config.alpn_protocols = vec![H2.to_vec()];
        // A resumed session carries the identity of the handshake it resumes: after a
        // rotation the peer would still see the old certificate. Connections here are few and
        // long-lived, so every one gets a full handshake.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(config)
    }

    /// A server config (ALPN `h2`, then HTTP/1.1) presenting the current certificate and
    /// requiring a client certificate that chains to the current CA bundle, both looked up at
    /// every handshake.
    pub fn server_config(self: &Arc<Self>) -> Result<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|source| Error::Tls {
                what: "server config",
                source,
            })?
            .with_client_cert_verifier(Arc::new(ClientVerifier(self.clone())))
            .with_cert_resolver(Arc::new(ServerCert(self.clone())));
        config.alpn_protocols = vec![H2.to_vec(), b"http/1.1".to_vec()];
        // No resumption (see `client_config`): each connection is verified against, and
        // presented with, the files current at its own handshake.
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
        Ok(config)
    }
}

fn stamps(files: &CertFiles) -> [Option<Stamp>; 3] {
    [stamp(&files.ca), stamp(&files.cert), stamp(&files.key)]
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn load(files: &CertFiles) -> Result<Loaded> {
    let ca_pem = read_to_string(&files.ca)?;
    let cert_pem = read_to_string(&files.cert)?;
    let key_pem = read_to_string(&files.key)?;
    let ca_what = files.ca.display().to_string();
    let cert_what = files.cert.display().to_string();
    let roots = Arc::new(root_store(&ca_pem, &ca_what)?);
    let chain = certs(&cert_pem, &cert_what)?;
    let key = private_key(&key_pem, &files.key.display().to_string())?;
    let cert = describe(&cert_pem)?;
    let cas = crate::describe::describe_all(&ca_pem)?;
    let provider = provider();
    let certified =
        CertifiedKey::from_der(chain, key, &provider).map_err(|source| match source {
            rustls::Error::InconsistentKeys(_) => Error::KeyMismatch {
                subject: format!("{} in {cert_what}", cert.subject),
            },
            source => Error::Tls {
                what: "certified key",
                source,
            },
        })?;
    let server_verifier =
        WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|source| Error::ServerVerifier { source })?;
    let client_verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .map_err(|source| Error::ClientVerifier { source })?;
    Ok(Loaded {
        certified: Arc::new(certified),
        cert,
        cas,
        server_verifier,
        client_verifier,
    })
}

#[derive(Debug)]
struct ClientCert(Arc<Reloading>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.present())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct ServerCert(Arc<Reloading>);

impl ResolvesServerCert for ServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.present())
    }
}

/// Verifies a server's chain against the CA bundle current at the handshake.
#[derive(Debug)]
struct ServerVerifier(Arc<Reloading>);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.current().server_verifier.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .server_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().server_verifier.supported_verify_schemes()
    }
}

/// Verifies a client's chain against the CA bundle current at the handshake.
#[derive(Debug)]
struct ClientVerifier(Arc<Reloading>);

impl ClientCertVerifier for ClientVerifier {
    /// No hints: they would have to outlive a reload. Clients then send the one certificate
    /// they have, which is what every client of this project does anyway.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0
            .current()
            .client_verifier
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().client_verifier.supported_verify_schemes()
    }
}

/// When `info` expires relative to `now`: the time left, or `None` once expired.
pub fn time_left(info: &CertInfo, now: SystemTime) -> Option<std::time::Duration> {
    info.not_after.duration_since(now).ok()
}
