//! Certificate expiry as metrics, read at every scrape from what the process uses
//! ([`clustermesh_certs::expiry::report`]):
//!
//! * `clustermesh_tls_certificate_expiry_timestamp_seconds{file, role, serial}`: when each
//!   certificate in use (and each CA that verifies peers) expires;
//! * `clustermesh_tls_certificates_expiring`: how many expired or expire within 30 days, the
//!   one number to alert on (the file is named in `/status`'s warnings and in the gauge above).
//!
//! This module must not cache: a rotation shows at the next scrape.

use std::path::PathBuf;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

pub use clustermesh_certs::expiry::Report;

/// Files the process names itself on top of its live TLS sets, with their role.
#[derive(Debug, Clone, Default)]
pub struct Extra(pub Vec<(PathBuf, &'static str)>);

impl Extra {
    /// The certificate report for `/status`.
    pub fn report(&self) -> clustermesh_certs::expiry::Report {
        let extra: Vec<(&std::path::Path, &'static str)> =
            self.0.iter().map(|(p, r)| (p.as_path(), *r)).collect();
        clustermesh_certs::expiry::report(&extra, SystemTime::now())
    }
}

#[derive(Debug)]
struct Certificates(Extra);

type Labels = Vec<(&'static str, String)>;

impl Collector for Certificates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let report = self.0.report();
        let expiry = Family::<Labels, Gauge>::default();
        let mut expiring = 0i64;
        for c in &report.certificates {
            expiry
                .get_or_create(&vec![
                    ("file", c.file.display().to_string()),
                    ("role", c.role.to_owned()),
                    ("serial", c.serial.clone()),
                ])
                .set(c.not_after_unix);
            if clustermesh_certs::expiry::warning(c).is_some() {
                expiring += 1;
            }
        }
        let e = encoder.encode_descriptor(
            "clustermesh_tls_certificate_expiry_timestamp_seconds",
            "When each certificate in use expires (seconds since the epoch)",
            None,
            expiry.metric_type(),
        )?;
        expiry.encode(e)?;
        let count = ConstGauge::new(expiring);
        let e = encoder.encode_descriptor(
            "clustermesh_tls_certificates_expiring",
            "Certificates in use that expired or expire within 30 days (see /status warnings)",
            None,
            count.metric_type(),
        )?;
        count.encode(e)
    }
}

/// Registers the certificate metrics in `registry` (top level, no prefix).
pub fn register(registry: &mut Registry, extra: Extra) {
    registry.register_collector(Box::new(Certificates(extra)));
}
