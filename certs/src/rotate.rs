//! Re-issuing the leaf certificates of a directory from the same CA (`clustermesh certs
//! rotate`): every `<stem>.crt` with a `<stem>.key` beside it that this CA signed gets a new
//! key and a new certificate with the same subject, SANs and usage, and a fresh validity.
//!
//! Each file is replaced atomically (temp file + rename, keys 0600 from the first byte), the
//! key before the certificate. A reader between the two renames sees a key that does not
//! match the certificate: [`crate::Reloading`] keeps the previous pair until both match, and
//! etcd, which loads the pair at each handshake, fails that one handshake. Nothing restarts:
//! the processes reading these files use the new ones at their next handshake.
//!
//! This module must not touch the CA (`ca.crt` is left alone), nor certificates another CA
//! signed (a peer's CA appended for `--allow-mismatching-ca` issues nothing here).

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use x509_parser::extensions::ParsedExtension;

use crate::describe::describe_file;
use crate::fs::read_to_string;
use crate::issue::{Ca, ServerSpec, CA_CERT_FILE, SERVER_NAME};
use crate::pem::{first_cert, parse_x509};
use crate::{Error, Result};

/// One certificate that was re-issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotated {
    /// The certificate file.
    pub cert: PathBuf,
    /// Its key file.
    pub key: PathBuf,
    /// Subject common name (the etcd user for client certificates).
    pub common_name: String,
    /// Serial before.
    pub old_serial: String,
    /// Serial now.
    pub new_serial: String,
    /// End of the new validity.
    pub not_after: SystemTime,
}

/// What a leaf of `dir` is, read from the certificate itself.
struct Found {
    stem: String,
    cert: PathBuf,
    server: bool,
    common_name: String,
    dns_names: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    serial: String,
    days: u32,
}

/// Re-issues every leaf of `dir` that `ca` signed. `validity_days` replaces each
/// certificate's own validity length when given. Returns what was rotated, sorted by file.
pub fn rotate_dir(ca: &Ca, dir: &Path, validity_days: Option<u32>) -> Result<Vec<Rotated>> {
    let found = leaves(ca, dir)?;
    let mut out = Vec::with_capacity(found.len());
    for f in found {
        let days = validity_days.unwrap_or(f.days).max(1);
        let leaf = if f.server {
            let namespace = f
                .dns_names
                .iter()
                .find_map(|n| {
                    n.strip_prefix("clustermesh-apiserver.")
                        .and_then(|rest| rest.strip_suffix(".svc"))
                })
                .unwrap_or("kube-system")
                .to_owned();
            ca.issue_server(&ServerSpec {
                namespace,
                extra_dns_names: f.dns_names.clone(),
                extra_ips: f.ips.clone(),
                validity_days: days,
            })?
        } else {
            ca.issue_client(&f.common_name, days)?
        };
        let files = leaf.write(dir, &f.stem)?;
        let info = describe_file(&files.cert)?;
        out.push(Rotated {
            cert: files.cert,
            key: files.key,
            common_name: f.common_name,
            old_serial: f.serial,
            new_serial: info.serial,
            not_after: info.not_after,
        });
    }
    Ok(out)
}

/// The leaves of `dir` that `ca` signed, sorted by file name.
fn leaves(ca: &Ca, dir: &Path) -> Result<Vec<Found>> {
    let entries = std::fs::read_dir(dir).map_err(|source| Error::Io {
        op: "read directory",
        path: dir.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(".crt") else {
            continue;
        };
        let key = dir.join(format!("{stem}.key"));
        if name == CA_CERT_FILE || name.starts_with('.') || !key.is_file() {
            continue;
        }
        let pem = read_to_string(&path)?;
        let what = path.display().to_string();
        let der = first_cert(&pem, &what)?;
        let x509 = parse_x509(&der, &what)?;
        if x509.is_ca() || !signed_by(&x509, ca) {
            continue;
        }
        let server = x509
            .extended_key_usage()
            .ok()
            .flatten()
            .is_some_and(|eku| eku.value.server_auth)
            || x509
                .subject()
                .iter_common_name()
                .any(|cn| cn.as_str().ok() == Some(SERVER_NAME));
        let info = describe_file(&path)?;
        let days = info
            .not_after
            .duration_since(info.not_before)
            .map(|d| ((d.as_secs() + 43_200) / 86_400) as u32)
            .unwrap_or(1);
        out.push(Found {
            stem: stem.to_owned(),
            cert: path,
            server,
            common_name: info.common_name,
            dns_names: info.dns_names,
            ips: info.ip_addresses,
            serial: info.serial,
            days,
        });
    }
    out.sort_by(|a, b| a.cert.cmp(&b.cert));
    Ok(out)
}

/// Whether `ca` issued `cert`: the authority key identifier names the CA's key, or, for a
/// certificate without one, the issuer name is the CA's subject.
fn signed_by(cert: &x509_parser::certificate::X509Certificate<'_>, ca: &Ca) -> bool {
    let aki = cert
        .iter_extensions()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        });
    match aki {
        Some(id) => id == ca.subject_key_id(),
        None => cert.issuer().to_string() == ca.subject(),
    }
}
