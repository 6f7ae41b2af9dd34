use std::path::PathBuf;

/// Errors from certificate issuance, parsing, file I/O and TLS configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// rcgen refused to build or sign a certificate.
    #[error("failed to generate {what}")]
    Generate {
        /// What was being generated, e.g. `CA certificate` or `client certificate "root"`.
        what: String,
        #[source]
        source: rcgen::Error,
    },

    /// A DNS name cannot be put into a certificate.
    #[error("invalid DNS name {name:?} for a certificate SAN")]
    InvalidDnsName {
        /// The offending name.
        name: String,
        #[source]
        source: rcgen::Error,
    },

    /// PEM text could not be decoded.
    #[error("invalid PEM in {what}")]
    Pem {
        /// Which input, e.g. `CA certificate`.
        what: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },

    /// The PEM input contained no block of the expected kind.
    #[error("no {kind} found in {what}")]
    PemMissing {
        /// Expected PEM kind (`CERTIFICATE`, `PRIVATE KEY`).
        kind: &'static str,
        /// Which input.
        what: String,
    },

    /// DER certificate bytes could not be parsed as X.509.
    #[error("invalid X.509 certificate in {what}")]
    X509 {
        /// Which input.
        what: String,
        #[source]
        source: x509_parser::error::X509Error,
    },

    /// The CA private key could not be loaded for signing.
    #[error(
        "cannot use the CA private key: it must be an unencrypted PKCS#8 ECDSA P-256/P-384, \
         Ed25519 or RSA key (\"BEGIN PRIVATE KEY\"); convert a SEC1/PKCS#1 key with \
         `openssl pkcs8 -topk8 -nocrypt -in ca.key -out ca.pk8.key`"
    )]
    CaKey {
        #[source]
        source: rcgen::Error,
    },

    /// The imported CA certificate cannot serve as an issuer.
    #[error("imported CA certificate {subject:?} cannot be used as an issuer")]
    CaCert {
        /// Subject of the certificate.
        subject: String,
        #[source]
        source: rcgen::Error,
    },

    /// The imported certificate is not a CA (basicConstraints CA:FALSE or absent).
    #[error("certificate {subject:?} is not a CA certificate (basicConstraints CA is not true)")]
    NotCa {
        /// Subject of the certificate.
        subject: String,
    },

    /// The private key does not belong to the certificate.
    #[error("private key does not match the public key of certificate {subject:?}")]
    KeyMismatch {
        /// Subject of the certificate.
        subject: String,
    },

    /// A filesystem operation failed.
    #[error("failed to {op} {}", path.display())]
    Io {
        /// What was attempted: `read`, `write`, `create directory`, ...
        op: &'static str,
        /// The path involved.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// rustls rejected the configuration.
    #[error("failed to build TLS {what}")]
    Tls {
        /// Which piece: `client config`, `server config`, `root store`.
        what: &'static str,
        #[source]
        source: rustls::Error,
    },

    /// The server certificate verifier could not be built.
    #[error("failed to build the server certificate verifier")]
    ServerVerifier {
        #[source]
        source: rustls::client::VerifierBuilderError,
    },

    /// The client certificate verifier could not be built.
    #[error("failed to build the client certificate verifier")]
    ClientVerifier {
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
}

/// Result alias with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
