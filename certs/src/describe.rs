//! Human-oriented inspection of certificates (`clustermesh certs show`).

use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use x509_parser::extensions::GeneralName;
use x509_parser::time::ASN1Time;

use crate::fs::read_to_string;
use crate::pem::{certs, parse_x509};
use crate::Result;

/// The facts about a certificate an operator asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertInfo {
    /// Subject, RFC 4514 style (`CN=root`).
    pub subject: String,
    /// Issuer, RFC 4514 style.
    pub issuer: String,
    /// First common name of the subject (empty if none).
    pub common_name: String,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP subject alternative names.
    pub ip_addresses: Vec<IpAddr>,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// SHA-256 of the DER encoding, `AA:BB:..` upper-case hex.
    pub sha256_fingerprint: String,
    /// Whether basicConstraints says CA:TRUE.
    pub is_ca: bool,
    /// Serial number, `aa:bb:..` hex.
    pub serial: String,
}

impl CertInfo {
    /// Whether the certificate is valid at `now`.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.not_before <= now && now <= self.not_after
    }
}

/// Describes the first certificate in `cert_pem`.
pub fn describe(cert_pem: &str) -> Result<CertInfo> {
    let mut all = describe_all(cert_pem)?;
    // `describe_all` returns at least one element.
    Ok(all.swap_remove(0))
}

/// Describes every certificate in `cert_pem` (a chain or a CA bundle), in order.
pub fn describe_all(cert_pem: &str) -> Result<Vec<CertInfo>> {
    certs(cert_pem, "certificate PEM")?
        .iter()
        .map(|der| describe_der(der, "certificate PEM"))
        .collect()
}

/// Describes the first certificate in the PEM file at `path`.
pub fn describe_file(path: &Path) -> Result<CertInfo> {
    let pem = read_to_string(path)?;
    let what = path.display().to_string();
    let der = crate::pem::first_cert(&pem, &what)?;
    describe_der(&der, &what)
}

/// Describes a DER certificate (e.g. one a peer presented); `what` names it in errors.
pub fn describe_der(der: &[u8], what: &str) -> Result<CertInfo> {
    let x509 = parse_x509(der, what)?;
    let common_name = x509
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    if let Ok(Some(san)) = x509.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => {
                    if let Some(ip) = ip_from_bytes(bytes) {
                        ip_addresses.push(ip);
                    }
                }
                _ => {}
            }
        }
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    Ok(CertInfo {
        subject: x509.subject().to_string(),
        issuer: x509.issuer().to_string(),
        common_name,
        dns_names,
        ip_addresses,
        not_before: system_time(x509.validity().not_before),
        not_after: system_time(x509.validity().not_after),
        sha256_fingerprint: hex_colon(digest.as_ref(), true),
        is_ca: x509.is_ca(),
        serial: hex_colon(x509.raw_serial(), false),
    })
}

/// `t` as RFC 3339 UTC (`2026-01-01T00:00:00Z`), for messages and status.
pub fn rfc3339(t: SystemTime) -> String {
    clustermesh_types::model::format_rfc3339(t)
}

fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn system_time(t: ASN1Time) -> SystemTime {
    let secs = t.timestamp();
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

fn hex_colon(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_formatting() {
        assert_eq!(hex_colon(&[0xab, 0x01], true), "AB:01");
        assert_eq!(hex_colon(&[0xab, 0x01], false), "ab:01");
        assert_eq!(hex_colon(&[], true), "");
    }

    #[test]
    fn garbage_pem_is_an_error() {
        assert!(describe("not a pem").is_err());
        assert!(
            describe("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n").is_err()
        );
    }
}
