//! PEM decoding helpers shared by the issuer, `describe` and the TLS builders.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Error, Result};

/// All `CERTIFICATE` blocks in `pem`, in order; at least one.
pub(crate) fn certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| Error::Pem {
            what: what.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(Error::PemMissing {
            kind: "CERTIFICATE",
            what: what.to_owned(),
        });
    }
    Ok(certs)
}

/// The first `CERTIFICATE` block in `pem`.
pub(crate) fn first_cert(pem: &str, what: &str) -> Result<CertificateDer<'static>> {
    let mut certs = certs(pem, what)?;
    // `certs` guarantees at least one element.
    Ok(certs.swap_remove(0))
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in `pem`.
pub(crate) fn private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => Error::PemMissing {
            kind: "PRIVATE KEY",
            what: what.to_owned(),
        },
        source => Error::Pem {
            what: what.to_owned(),
            source,
        },
    })
}

/// Parses DER as X.509.
pub(crate) fn parse_x509<'a>(
    der: &'a [u8],
    what: &str,
) -> Result<x509_parser::certificate::X509Certificate<'a>> {
    use x509_parser::nom::Err;
    x509_parser::parse_x509_certificate(der)
        .map(|(_, cert)| cert)
        .map_err(|e| Error::X509 {
            what: what.to_owned(),
            source: match e {
                Err::Error(e) | Err::Failure(e) => e,
                Err::Incomplete(_) => x509_parser::error::X509Error::InvalidCertificate,
            },
        })
}
