//! Why talking to an etcd failed, by cause, and what to do about it.
//!
//! The cause is read from the error itself, not from its text where the error carries it:
//! the source chain holds the [`DialError`](crate::transport::DialError) of a failed dial, the
//! `std::io::Error` of the socket (whose `get_ref` holds the `rustls::Error` of a handshake),
//! the `tonic::Status` of a request etcd answered. tonic turns a failed connect into a fresh
//! `Status::unavailable` that keeps only the text, though, and a watch stream that ended
//! reaches this module as text too: then the words rustls, hyper, tonic and etcd use are
//! read back (`invalid peer certificate: UnknownIssuer`, `received fatal alert:
//! BadCertificate`, `keep-alive timed out`, …), as the last resort.
//!
//! The classes are those an operator acts on differently: the network (`unreachable`), the
//! certificates (`tls`, with the problem and the file named), etcd's users (`auth`), etcd
//! itself (`etcd`). A hint never blames TLS for a timeout.
//!
//! This module must not do I/O beyond reading the certificate a hint names (to say whether
//! it expired).

use std::error::Error as StdError;
use std::path::Path;
use std::time::SystemTime;

use clustermesh_certs::rustls::{self, AlertDescription, CertificateError};
use serde::Serialize;

use crate::config::EtcdConfig;
use crate::transport::DialError;

/// What kind of problem stopped a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// The peer does not answer: refused, no route, timed out, keepalive lost.
    Unreachable,
    /// The TLS handshake failed: a certificate is not trusted, expired or for another name,
    /// or the peer refused ours.
    Tls,
    /// etcd refused the user named by the client certificate.
    Auth,
    /// etcd answered with an error.
    Etcd,
    /// A config file, or the remote's cluster configuration, is wrong.
    Config,
    /// Anything else.
    Other,
}

impl Class {
    /// Name used in status and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Unreachable => "unreachable",
            Class::Tls => "tls",
            Class::Auth => "auth",
            Class::Etcd => "etcd",
            Class::Config => "config",
            Class::Other => "other",
        }
    }
}

/// A classified failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The class.
    pub class: Class,
    /// What happened and what to do, naming files and endpoints.
    pub hint: String,
}

/// What the source chain of an error says.
#[derive(Default)]
struct Facts<'a> {
    dial: Option<&'a DialError>,
    rustls: Option<&'a rustls::Error>,
    io: Option<std::io::ErrorKind>,
    grpc: Option<(tonic::Code, String)>,
    text: String,
}

fn facts<'a>(err: &'a (dyn StdError + 'static)) -> Facts<'a> {
    let mut f = Facts::default();
    let mut next: Option<&'a (dyn StdError + 'static)> = Some(err);
    while let Some(e) = next {
        f.text.push_str(&e.to_string().to_lowercase());
        f.text.push('\n');
        if let Some(d) = e.downcast_ref::<DialError>() {
            f.dial.get_or_insert(d);
        }
        if let Some(r) = e.downcast_ref::<rustls::Error>() {
            f.rustls.get_or_insert(r);
        }
        if let Some(s) = e.downcast_ref::<tonic::Status>() {
            f.grpc.get_or_insert((s.code(), s.message().to_owned()));
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            f.io.get_or_insert(io.kind());
            // `io::Error::source` skips the error it wraps; look inside.
            if let Some(inner) = io.get_ref() {
                if let Some(r) = inner.downcast_ref::<rustls::Error>() {
                    f.rustls.get_or_insert(r);
                }
            }
        }
        // etcd-client's error has no `source`: go on into the Status it wraps, whose source
        // chain holds the DialError of a failed connect (a TCP connect or TLS handshake that
        // timed out during a partition was classed `other` without it).
        if let Some(etcd_client::Error::GRpcStatus(s)) = e.downcast_ref::<etcd_client::Error>() {
            next = Some(s);
            continue;
        }
        next = e.source();
    }
    f
}

/// Classifies `err`, met while talking to the etcd of `cfg` (whose files the hint names).
pub fn classify(err: &(dyn StdError + 'static), cfg: Option<&EtcdConfig>) -> Failure {
    let f = facts(err);
    let endpoint = f
        .dial
        .map(|d| d.endpoint.clone())
        .or_else(|| cfg.map(|c| c.endpoints.join(",")))
        .unwrap_or_else(|| "the etcd endpoint".into());
    if let Some(r) = f.rustls {
        return tls(r, &endpoint, cfg);
    }
    if let Some(r) = rustls_from_text(&f.text) {
        return tls(&r, &endpoint, cfg);
    }
    if let Some((code, message)) = &f.grpc {
        let lower = message.to_lowercase();
        if matches!(
            code,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ) || lower.contains("permission denied")
            || lower.contains("user name not found")
            || lower.contains("user name is empty")
            || lower.contains("invalid auth token")
        {
            return auth(message, cfg);
        }
        if lower.contains("etcdserver:") || lower.contains("mvcc:") {
            return Failure {
                class: Class::Etcd,
                hint: format!(
                    "etcd at {endpoint} answered with an error ({message}): see that etcd's log"
                ),
            };
        }
    }
    classify_text(&f.text, f.io, &endpoint, cfg)
}

/// Classifies a failure known only by its text (see the module docs).
pub fn classify_message(text: &str, cfg: Option<&EtcdConfig>) -> Failure {
    let endpoint = cfg
        .map(|c| c.endpoints.join(","))
        .unwrap_or_else(|| "the etcd endpoint".into());
    let lower = text.to_lowercase();
    if let Some(r) = rustls_from_text(&lower) {
        return tls(&r, &endpoint, cfg);
    }
    classify_text(&lower, None, &endpoint, cfg)
}

/// The rustls error whose `Display` text is in `lower` (lower-cased), if any.
fn rustls_from_text(lower: &str) -> Option<rustls::Error> {
    use clustermesh_certs::rustls::pki_types::UnixTime;
    let cert = |e| Some(rustls::Error::InvalidCertificate(e));
    if let Some(rest) = lower.split("received fatal alert: ").nth(1) {
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect();
        let alert = match name.as_str() {
            "certificateexpired" => AlertDescription::CertificateExpired,
            "unknownca" => AlertDescription::UnknownCA,
            "certificateunknown" => AlertDescription::CertificateUnknown,
            "certificaterequired" => AlertDescription::CertificateRequired,
            "certificaterevoked" => AlertDescription::CertificateRevoked,
            "unsupportedcertificate" => AlertDescription::UnsupportedCertificate,
            "accessdenied" => AlertDescription::AccessDenied,
            "handshakefailure" => AlertDescription::HandshakeFailure,
            _ => AlertDescription::BadCertificate,
        };
        return Some(rustls::Error::AlertReceived(alert));
    }
    if !lower.contains("invalid peer certificate")
        && !lower.contains("certificate not valid")
        && !lower.contains("certificate expired")
    {
        return None;
    }
    if lower.contains("unknownissuer") || lower.contains("badsignature") {
        return cert(CertificateError::UnknownIssuer);
    }
    if let Some(rest) = lower.split("is not valid after ").nth(1) {
        let secs: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(secs) = secs.parse::<u64>() {
            let t = |s| UnixTime::since_unix_epoch(std::time::Duration::from_secs(s));
            return cert(CertificateError::ExpiredContext {
                time: t(secs),
                not_after: t(secs),
            });
        }
        return cert(CertificateError::Expired);
    }
    if lower.contains("expired") {
        return cert(CertificateError::Expired);
    }
    if lower.contains("not valid yet") || lower.contains("notvalidyet") {
        return cert(CertificateError::NotValidYet);
    }
    if lower.contains("not valid for name") || lower.contains("notvalidforname") {
        return cert(CertificateError::NotValidForName);
    }
    cert(CertificateError::BadEncoding)
}

fn classify_text(
    text: &str,
    io: Option<std::io::ErrorKind>,
    endpoint: &str,
    cfg: Option<&EtcdConfig>,
) -> Failure {
    use std::io::ErrorKind as K;
    let unreachable = |what: &str| {
        Failure {
        class: Class::Unreachable,
        hint: format!(
            "etcd at {endpoint} is not reachable ({what}): check the network to it and that its clustermesh-apiserver runs; what was read from it stays in use meanwhile"
        ),
    }
    };
    if text.contains("too_many_pings") || text.contains("enhance your calm") {
        return Failure {
            class: Class::Etcd,
            hint: format!(
                "etcd at {endpoint} closed the connection for pinging too often: start it with --grpc-keepalive-min-time no longer than the client's keepalive interval, or raise the client's interval"
            ),
        };
    }
    if let Some(kind) = io {
        match kind {
            K::ConnectionRefused => {
                return unreachable("connection refused: nothing listens on that port")
            }
            K::TimedOut => return unreachable("timed out"),
            K::HostUnreachable | K::NetworkUnreachable => return unreachable("no route to it"),
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::UnexpectedEof => {
                return unreachable("the connection was cut")
            }
            _ => {}
        }
    }
    for (words, what) in [
        ("keep-alive timed out", "no answer to keepalive pings"),
        ("keepalive", "no answer to keepalive pings"),
        (
            "connection refused",
            "connection refused: nothing listens on that port",
        ),
        ("no route to host", "no route to it"),
        ("network is unreachable", "no route to it"),
        ("timed out", "timed out"),
        // The dialer's own timeout (`transport::Dialer`), when only its text survives.
        ("no answer within", "timed out"),
        ("deadline", "timed out"),
        ("connection reset", "the connection was cut"),
        ("broken pipe", "the connection was cut"),
        ("connection closed", "the connection was cut"),
        ("transport error", "the connection was lost"),
        ("stream closed", "the connection was lost"),
        ("error trying to connect", "cannot connect"),
    ] {
        if text.contains(words) {
            return unreachable(what);
        }
    }
    if text.contains("permission denied") || text.contains("user name") {
        return auth(text, cfg);
    }
    if text.contains("etcdserver:") {
        return Failure {
            class: Class::Etcd,
            hint: format!("etcd at {endpoint} answered with an error: see that etcd's log"),
        };
    }
    Failure {
        class: Class::Other,
        hint: "check the endpoint, the certificates and that etcd is running".into(),
    }
}

/// Classifies a failed remote-cluster session; `cfg` is the etcd config it used (the
/// remote's file, or the local etcd's in KVStoreMesh mode).
pub fn classify_remote(err: &crate::remote::Error, cfg: Option<&EtcdConfig>) -> Failure {
    use crate::remote::Error as R;
    use crate::watcher::Error as W;
    let config = |hint: String| Failure {
        class: Class::Config,
        hint,
    };
    let syncer = |e: &crate::Error| {
        match e {
        crate::Error::Connect { class, hint, .. } => Failure {
            class: *class,
            hint: hint.clone(),
        },
        crate::Error::Etcd { source, .. } => classify(source, cfg),
        crate::Error::Timeout { what, endpoints } => Failure {
            class: Class::Unreachable,
            hint: format!(
                "etcd at {endpoints} is not reachable ({what} timed out): check the network to it and that its clustermesh-apiserver runs; what was read from it stays in use meanwhile"
            ),
        },
        e => config(e.to_string()),
    }
    };
    match err {
        R::Syncer(e) | R::Read(W::Syncer(e)) => syncer(e),
        R::Read(W::WatchEnded { reason, .. }) => classify_message(reason, cfg),
        R::Read(W::ClusterIdChanged { .. }) | R::Read(W::InvalidResponse { .. }) => Failure {
            class: Class::Etcd,
            hint: format!("{err}: a different etcd answers behind the endpoint; resyncing everything"),
        },
        R::Read(W::WatchLagged { .. }) => Failure {
            class: Class::Other,
            hint: err.to_string(),
        },
        R::HeartbeatStale(d) => Failure {
            class: Class::Other,
            hint: format!(
                "etcd answers but the remote's clustermesh-apiserver has not written its heartbeat for {}s: is it running?",
                d.as_secs()
            ),
        },
        R::ConfigNotFound { .. }
        | R::ConfigRefused(_)
        | R::ConfigChanged { .. }
        | R::InvalidConfig(_)
        | R::Watch { .. } => {
            config(err.to_string())
        }
        R::Resolve { host, .. } => config(format!(
            "cannot resolve {host}: fix DNS or /etc/hosts, or add it to cilium-host-aliases in the file"
        )),
    }
}

fn file_of(p: &Option<std::path::PathBuf>) -> String {
    p.as_deref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "(not set)".into())
}

fn auth(message: &str, cfg: Option<&EtcdConfig>) -> Failure {
    let user = cfg
        .and_then(|c| c.cert_file.as_deref())
        .and_then(|p| clustermesh_certs::describe_file(p).ok())
        .map(|i| i.common_name)
        .unwrap_or_else(|| "named by the client certificate's CN".into());
    Failure {
        class: Class::Auth,
        hint: format!(
            "etcd refused user {user} ({}): the user or its role is missing in that etcd; run `clustermesh connect` again",
            message.trim()
        ),
    }
}

/// Classifies a TLS error met with `endpoint` (a refused client certificate names the
/// cert-file of `cfg` and says whether it expired).
pub fn classify_tls(err: &rustls::Error, endpoint: &str, cfg: Option<&EtcdConfig>) -> Failure {
    tls(err, endpoint, cfg)
}

fn tls(err: &rustls::Error, endpoint: &str, cfg: Option<&EtcdConfig>) -> Failure {
    let ca = cfg.map(|c| file_of(&c.trusted_ca_file)).unwrap_or_default();
    let cert = cfg.and_then(|c| c.cert_file.clone());
    let hint = match err {
        rustls::Error::InvalidCertificate(e) => match e {
            CertificateError::UnknownIssuer | CertificateError::BadSignature => format!(
                "the server certificate of {endpoint} does not chain to trusted-ca-file {ca} (unknown CA): both clusters must share a CA, or connect with --allow-mismatching-ca"
            ),
            CertificateError::Expired => {
                format!("the server certificate of {endpoint} has expired: rotate it on that cluster (`clustermesh certs rotate`)")
            }
            CertificateError::ExpiredContext { not_after, .. } => format!(
                "the server certificate of {endpoint} expired at {}: rotate it on that cluster (`clustermesh certs rotate`)",
                unix(*not_after)
            ),
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => format!(
                "the server certificate of {endpoint} is not valid yet: check the clocks of both machines"
            ),
            CertificateError::NotValidForName => format!(
                "the server certificate of {endpoint} is not valid for the endpoint's host name (wrong name): re-issue it with --extra-dns/--extra-ip"
            ),
            CertificateError::NotValidForNameContext { expected, presented } => format!(
                "the server certificate of {endpoint} is not valid for {} (wrong name; it names {}): re-issue it with --extra-dns/--extra-ip",
                expected.to_str(),
                presented.join(", ")
            ),
            other => format!("the server certificate of {endpoint} is refused ({other})"),
        },
        rustls::Error::AlertReceived(alert) => return rejected(*alert, endpoint, cert.as_deref(), &ca),
        rustls::Error::NoCertificatesPresented => format!("{endpoint} presented no certificate: is it an etcd with TLS?"),
        other => format!("TLS with {endpoint} failed: {other}"),
    };
    Failure {
        class: Class::Tls,
        hint,
    }
}

/// The server refused our client certificate: say why, from the certificate itself when it
/// explains it (expired), else name the file and what it must chain to.
fn rejected(alert: AlertDescription, endpoint: &str, cert: Option<&Path>, ca: &str) -> Failure {
    let file = cert
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the client certificate".into());
    let info = cert.and_then(|p| clustermesh_certs::describe_file(p).ok());
    let now = SystemTime::now();
    let hint = match info {
        Some(i) if i.not_after < now => format!(
            "cert-file {file} expired at {}: etcd at {endpoint} refuses it; rotate it (`clustermesh certs rotate`), it is read again at the next connection",
            clustermesh_certs::rfc3339(i.not_after)
        ),
        Some(i) if i.not_before > now => format!(
            "cert-file {file} is valid only from {}: check the clocks",
            clustermesh_certs::rfc3339(i.not_before)
        ),
        _ => format!(
            "etcd at {endpoint} refused cert-file {file} ({alert:?}): it must be issued by a CA that etcd trusts (trusted-ca-file here: {ca})"
        ),
    };
    Failure {
        class: Class::Tls,
        hint,
    }
}

fn unix(t: clustermesh_certs::rustls::pki_types::UnixTime) -> String {
    clustermesh_certs::rfc3339(SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(t.as_secs()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dial(source: std::io::Error) -> DialError {
        DialError {
            endpoint: "198.18.2.1:2379".into(),
            stage: "TLS handshake",
            source,
        }
    }

    #[test]
    fn a_timeout_is_never_a_tls_problem() {
        let e = dial(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "no answer within 5s",
        ));
        let f = classify(&e, None);
        assert_eq!(f.class, Class::Unreachable);
        assert!(f.hint.contains("198.18.2.1:2379"), "{}", f.hint);
        assert!(
            !f.hint.contains("CA") && !f.hint.contains("certificate"),
            "{}",
            f.hint
        );
        let f = classify_message(
            "watch of cilium/state/ ended: h2 protocol error: keep-alive timed out",
            None,
        );
        assert_eq!(f.class, Class::Unreachable);
        assert!(f.hint.contains("keepalive"), "{}", f.hint);
        // Seen in the fault suite: a reconnect during a partition, as etcd-client returns it
        // (its error has no `source`; the Status's text is all that is read without help).
        let f = classify_message(
            "grpc request error: status: Unavailable, message: \"TCP connect to 198.18.2.2:2379 failed: no answer within 5s\"",
            None,
        );
        assert_eq!(f.class, Class::Unreachable, "{}", f.hint);
        let status = tonic::Status::from_error(Box::new(dial(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the dialer's words",
        ))));
        let f = classify(&etcd_client::Error::GRpcStatus(status), None);
        assert_eq!(f.class, Class::Unreachable, "{}", f.hint);
        assert!(f.hint.contains("198.18.2.1:2379"), "{}", f.hint);
    }

    #[test]
    fn tls_problems_are_named() {
        let wrap = |r: rustls::Error| dial(std::io::Error::new(std::io::ErrorKind::InvalidData, r));
        let f = classify(
            &wrap(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            )),
            None,
        );
        assert_eq!(f.class, Class::Tls);
        assert!(f.hint.contains("unknown CA"), "{}", f.hint);
        let f = classify(
            &wrap(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            )),
            None,
        );
        assert!(f.hint.contains("wrong name"), "{}", f.hint);
        let f = classify(
            &wrap(rustls::Error::InvalidCertificate(
                CertificateError::ExpiredContext {
                    time: clustermesh_certs::rustls::pki_types::UnixTime::since_unix_epoch(
                        std::time::Duration::from_secs(1_800_000_000),
                    ),
                    not_after: clustermesh_certs::rustls::pki_types::UnixTime::since_unix_epoch(
                        std::time::Duration::from_secs(1_767_225_600),
                    ),
                },
            )),
            None,
        );
        assert!(
            f.hint.contains("expired at 2026-01-01T00:00:00Z"),
            "{}",
            f.hint
        );
        let f = classify(
            &wrap(rustls::Error::AlertReceived(
                AlertDescription::BadCertificate,
            )),
            None,
        );
        assert_eq!(f.class, Class::Tls);
        assert!(f.hint.contains("refused"), "{}", f.hint);
    }

    #[test]
    fn tonic_text_is_read_back() {
        // What tonic keeps of a failed connect: its text only.
        let f = classify_message("status: Unavailable, message: \"TLS handshake to 127.0.0.1:2379 failed: invalid peer certificate: UnknownIssuer\"", None);
        assert_eq!(f.class, Class::Tls);
        assert!(f.hint.contains("unknown CA"), "{}", f.hint);
        let f = classify_message(
            "tls handshake failed: received fatal alert: BadCertificate",
            None,
        );
        assert_eq!(f.class, Class::Tls);
        assert!(f.hint.contains("refused"), "{}", f.hint);
        let f = classify_message("invalid peer certificate: certificate expired: verification time 1800000000 (UNIX), but certificate is not valid after 1767225600 (32774400 seconds ago)", None);
        assert!(
            f.hint.contains("expired at 2026-01-01T00:00:00Z"),
            "{}",
            f.hint
        );
    }

    #[test]
    fn etcd_refusing_the_user_is_auth() {
        let s = tonic::Status::permission_denied("etcdserver: permission denied");
        assert_eq!(classify(&s, None).class, Class::Auth);
        let s = tonic::Status::unknown("etcdserver: mvcc: required revision has been compacted");
        assert_eq!(classify(&s, None).class, Class::Etcd);
    }
}
