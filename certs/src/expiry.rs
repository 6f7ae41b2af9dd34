//! What a process reports about its certificates: each file in use, its serial and expiry,
//! the serial its last handshake presented, and a warning for every certificate or CA that
//! expires within [`WARN_BEFORE`], naming the file and what to run.
//!
//! The list is the process's live [`crate::reload`] sets plus files it names itself (the
//! apiserver adds the embedded etcd's server certificate, which etcd reads, not us).
//!
//! This module must not decide what a process does about an expiry: it reports.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::describe::{describe_all, rfc3339};
use crate::fs::read_to_string;

/// Certificates expiring within this long are warned about (30 days).
pub const WARN_BEFORE: Duration = Duration::from_secs(30 * 86_400);

/// One certificate file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Certificate {
    /// The file.
    pub file: PathBuf,
    /// `client` (presented by this process), `ca` (verifies peers), or `server` (presented
    /// by a server this process runs).
    pub role: &'static str,
    /// Subject common name.
    pub common_name: String,
    /// Serial of the certificate in use.
    pub serial: String,
    /// End of validity, RFC 3339.
    pub not_after: String,
    /// End of validity, seconds since the epoch (for metrics).
    #[serde(skip)]
    pub not_after_unix: i64,
    /// Whole days left (negative once expired).
    pub days_left: i64,
    /// Serial the last handshake presented (client certificates; `None` before the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presented_serial: Option<String>,
    /// Why the file on disk is not the one in use, if it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reload_error: Option<String>,
}

/// Every certificate of a process and the warnings about them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    /// One entry per file, sorted by file.
    pub certificates: Vec<Certificate>,
    /// One line per certificate that expired or expires within [`WARN_BEFORE`], and per file
    /// that changed but does not load.
    pub warnings: Vec<String>,
}

fn unix(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

fn days_left(not_after: SystemTime, now: SystemTime) -> i64 {
    (unix(not_after) - unix(now)).div_euclid(86_400)
}

/// The report for this process at `now`: every live reloading set (client certificates and
/// their CA bundles) and `extra` files (`(file, role)`, read from disk now).
pub fn report(extra: &[(&Path, &'static str)], now: SystemTime) -> Report {
    let mut certs: Vec<Certificate> = Vec::new();
    let mut warnings = Vec::new();
    let mut push = |c: Certificate| {
        if !certs
            .iter()
            .any(|e| e.file == c.file && e.serial == c.serial)
        {
            certs.push(c);
        }
    };
    for u in crate::reload::in_use() {
        if let Some(err) = &u.reload_error {
            warnings.push(format!(
                "{} changed but does not load ({err}): the previous certificate stays in use",
                u.cert.display()
            ));
        }
        push(Certificate {
            file: u.cert.clone(),
            role: "client",
            common_name: u.info.common_name.clone(),
            serial: u.info.serial.clone(),
            not_after: rfc3339(u.info.not_after),
            not_after_unix: unix(u.info.not_after),
            days_left: days_left(u.info.not_after, now),
            presented_serial: u.presented.clone(),
            reload_error: u.reload_error.clone(),
        });
        extra_file(&u.ca, "ca", now, &mut push);
    }
    for (file, role) in extra {
        extra_file(file, role, now, &mut push);
    }
    certs.sort_by(|a, b| a.file.cmp(&b.file).then(a.serial.cmp(&b.serial)));
    for c in &certs {
        if let Some(w) = warning(c) {
            warnings.push(w);
        }
    }
    Report {
        certificates: certs,
        warnings,
    }
}

fn extra_file(
    file: &Path,
    role: &'static str,
    now: SystemTime,
    push: &mut impl FnMut(Certificate),
) {
    let Ok(pem) = read_to_string(file) else {
        return;
    };
    let Ok(infos) = describe_all(&pem) else {
        return;
    };
    // A CA bundle holds several certificates; a leaf file one (its chain is not ours).
    let take = if role == "ca" { infos.len() } else { 1 };
    for info in infos.into_iter().take(take) {
        push(Certificate {
            file: file.to_path_buf(),
            role,
            common_name: info.common_name.clone(),
            serial: info.serial.clone(),
            not_after: rfc3339(info.not_after),
            not_after_unix: unix(info.not_after),
            days_left: days_left(info.not_after, now),
            presented_serial: None,
            reload_error: None,
        });
    }
}

/// The warning for `c`, if it expired or expires within [`WARN_BEFORE`].
pub fn warning(c: &Certificate) -> Option<String> {
    let fix = if c.role == "ca" {
        "replace the CA and re-issue every certificate of the mesh from it"
    } else {
        "rotate it with `clustermesh certs rotate`"
    };
    if c.days_left < 0 {
        Some(format!(
            "certificate {} (CN {}) expired at {}: {fix}",
            c.file.display(),
            c.common_name,
            c.not_after
        ))
    } else if c.days_left < (WARN_BEFORE.as_secs() / 86_400) as i64 {
        Some(format!(
            "certificate {} (CN {}) expires at {} (in {} days): {fix}",
            c.file.display(),
            c.common_name,
            c.not_after,
            c.days_left
        ))
    } else {
        None
    }
}
