//! The CA and the leaf certificates it issues.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateDer;
use time::{Duration, OffsetDateTime};
use x509_parser::extensions::ParsedExtension;

use crate::fs::{ensure_dir, read_to_string, write_atomic, PUBLIC_MODE, SECRET_MODE};
use crate::pem::{first_cert, parse_x509};
use crate::{Error, Result};

/// Default validity of the CA and of every leaf, as in Cilium's Helm chart
/// (`clustermesh.apiserver.tls.auto.certValidityDuration`).
pub const DEFAULT_VALIDITY_DAYS: u32 = 1095;
/// Common name Cilium gives a generated CA.
pub const DEFAULT_CA_COMMON_NAME: &str = "Cilium CA";
/// CN and first DNS SAN of the clustermesh-apiserver (etcd) server certificate.
pub const SERVER_NAME: &str = "clustermesh-apiserver.cilium.io";
/// Wildcard SAN that matches `<cluster>.mesh.cilium.io` endpoints.
pub const MESH_WILDCARD: &str = "*.mesh.cilium.io";
/// File name of the CA certificate inside a certificate directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the CA private key inside a CA directory.
pub const CA_KEY_FILE: &str = "ca.key";

/// Backdate `notBefore` so that peers with a slightly slow clock accept fresh certificates.
const CLOCK_SKEW: Duration = Duration::minutes(5);

/// A certificate authority able to sign server and client certificates.
pub struct Ca {
    cert_pem: String,
    key_pem: String,
    subject: String,
    subject_key_id: Vec<u8>,
    not_after: OffsetDateTime,
    issuer: Issuer<'static, KeyPair>,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.subject)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Generates a self-signed ECDSA P-256 CA valid for [`DEFAULT_VALIDITY_DAYS`].
    pub fn generate(common_name: &str) -> Result<Ca> {
        let what = || format!("CA certificate {common_name:?}");
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Generate {
                what: what(),
                source,
            })?;
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - CLOCK_SKEW;
        params.not_after = now + Duration::days(i64::from(DEFAULT_VALIDITY_DAYS));
        let cert = params.self_signed(&key).map_err(|source| Error::Generate {
            what: what(),
            source,
        })?;
        let cert_pem = cert.pem();
        let key_pem = key.serialize_pem();
        let issuer = Issuer::new(params, key);
        let info = CaCertInfo::parse(cert.der())?;
        Ok(Ca {
            cert_pem,
            key_pem,
            subject: info.subject,
            subject_key_id: info.subject_key_id,
            not_after: info.not_after,
            issuer,
        })
    }

    /// Imports an existing CA from PEM; the result can sign new leaves.
    ///
    /// The key must be unencrypted PKCS#8 (`BEGIN PRIVATE KEY`) and must match the certificate,
    /// and the certificate must be a CA (`basicConstraints CA:TRUE`).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Ca> {
        let der = first_cert(cert_pem, "CA certificate")?;
        let info = CaCertInfo::parse(&der)?;
        if !info.is_ca {
            return Err(Error::NotCa {
                subject: info.subject,
            });
        }
        // Reject obviously wrong input with a PEM-level error before rcgen's opaque one.
        crate::pem::private_key(key_pem, "CA private key")?;
        let key = KeyPair::from_pem(key_pem).map_err(|source| Error::CaKey { source })?;
        if key.subject_public_key_info() != info.spki {
            return Err(Error::KeyMismatch {
                subject: info.subject,
            });
        }
        let issuer = Issuer::from_ca_cert_der(&der, key).map_err(|source| Error::CaCert {
            subject: info.subject.clone(),
            source,
        })?;
        Ok(Ca {
            cert_pem: normalize_pem(cert_pem),
            key_pem: normalize_pem(key_pem),
            subject: info.subject,
            subject_key_id: info.subject_key_id,
            not_after: info.not_after,
            issuer,
        })
    }

    /// Loads `ca.crt` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Ca> {
        let cert = read_to_string(&dir.join(CA_CERT_FILE))?;
        let key = read_to_string(&dir.join(CA_KEY_FILE))?;
        Ca::from_pem(&cert, &key)
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600) into `dir`, creating it with 0700 if missing.
    /// Existing files are replaced atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        ensure_dir(dir)?;
        write_atomic(
            &dir.join(CA_CERT_FILE),
            self.cert_pem.as_bytes(),
            PUBLIC_MODE,
        )?;
        write_atomic(&dir.join(CA_KEY_FILE), self.key_pem.as_bytes(), SECRET_MODE)
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PEM (PKCS#8). Secret: only for storing the CA where the mesh's
    /// CA lives (a 0600 file, the `cilium-ca` Secret), never for logs.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// The subject key identifier of the CA certificate (the AKI of every leaf it issues);
    /// empty if an imported certificate has no SKI extension.
    pub fn subject_key_id(&self) -> Vec<u8> {
        self.subject_key_id.clone()
    }

    /// The CA subject as an RFC 4514 string, e.g. `CN=Cilium CA`.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Issues the clustermesh-apiserver (etcd) server certificate.
    ///
    /// EKU carries serverAuth and clientAuth: etcd also uses this certificate as a client.
    pub fn issue_server(&self, spec: &ServerSpec) -> Result<Leaf> {
        let mut dns = vec![
            SERVER_NAME.to_owned(),
            MESH_WILDCARD.to_owned(),
            format!("clustermesh-apiserver.{}.svc", spec.namespace),
        ];
        for name in &spec.extra_dns_names {
            if !dns.contains(name) {
                dns.push(name.clone());
            }
        }
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(Ipv6Addr::LOCALHOST),
        ];
        for ip in &spec.extra_ips {
            if !ips.contains(ip) {
                ips.push(*ip);
            }
        }
        let mut sans = Vec::with_capacity(dns.len() + ips.len());
        for name in dns {
            let ia5 = name
                .as_str()
                .try_into()
                .map_err(|source| Error::InvalidDnsName {
                    name: name.clone(),
                    source,
                })?;
            sans.push(SanType::DnsName(ia5));
        }
        sans.extend(ips.into_iter().map(SanType::IpAddress));
        self.issue_leaf(
            SERVER_NAME,
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            self.validity(spec.validity_days),
        )
    }

    /// Issues a client certificate (EKU clientAuth) whose CN is the etcd user name:
    /// `admin-<cluster>`, `local-<cluster>`, `remote`, `remote-<cluster>` or `root`.
    pub fn issue_client(&self, common_name: &str, validity_days: u32) -> Result<Leaf> {
        self.issue_leaf(
            common_name,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            self.validity(validity_days),
        )
    }

    /// Issues a client certificate like [`Self::issue_client`] that is valid until
    /// `not_after` (and from a day before it at the latest): short-lived certificates, and
    /// expired or nearly expired ones to check how expiry is reported.
    pub fn issue_client_until(&self, common_name: &str, not_after: SystemTime) -> Result<Leaf> {
        let not_after = OffsetDateTime::from(not_after).min(self.not_after);
        let not_before =
            (OffsetDateTime::now_utc() - CLOCK_SKEW).min(not_after - Duration::days(1));
        self.issue_leaf(
            common_name,
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            (not_before, not_after),
        )
    }

    /// `validity_days` from now (backdated by the clock skew allowance), never past the CA.
    fn validity(&self, validity_days: u32) -> (OffsetDateTime, OffsetDateTime) {
        let now = OffsetDateTime::now_utc();
        // A leaf never outlives its CA: it would stop verifying at the CA's expiry anyway,
        // and reporting the real end date is more honest.
        (
            now - CLOCK_SKEW,
            (now + Duration::days(i64::from(validity_days))).min(self.not_after),
        )
    }

    fn issue_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        ekus: Vec<ExtendedKeyUsagePurpose>,
        (not_before, not_after): (OffsetDateTime, OffsetDateTime),
    ) -> Result<Leaf> {
        let what = || format!("certificate {common_name:?}");
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| Error::Generate {
                what: what(),
                source,
            })?;
        let mut params = CertificateParams::default();
        params.distinguished_name = common_name_dn(common_name);
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = sans;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = ekus;
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| Error::Generate {
                what: what(),
                source,
            })?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Parameters of the server certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerSpec {
    /// Namespace of the `clustermesh-apiserver` Service (adds `clustermesh-apiserver.<ns>.svc`).
    pub namespace: String,
    /// Extra DNS SANs (Helm `tls.server.extraDnsNames`).
    pub extra_dns_names: Vec<String>,
    /// Extra IP SANs (Helm `tls.server.extraIpAddresses`).
    pub extra_ips: Vec<IpAddr>,
    /// Validity in days.
    pub validity_days: u32,
}

impl Default for ServerSpec {
    fn default() -> Self {
        Self {
            namespace: "kube-system".to_owned(),
            extra_dns_names: Vec::new(),
            extra_ips: Vec::new(),
            validity_days: DEFAULT_VALIDITY_DAYS,
        }
    }
}

/// A freshly issued certificate and its private key, both PEM.
#[derive(Clone)]
pub struct Leaf {
    /// Certificate PEM.
    pub cert_pem: String,
    /// PKCS#8 private key PEM.
    pub key_pem: String,
}

impl fmt::Debug for Leaf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Leaf")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl Leaf {
    /// Writes `<stem>.crt` (0644) and `<stem>.key` (0600) into `dir` (created 0700 if missing).
    ///
    /// The returned [`CertFiles::ca`] points at `dir/ca.crt`, which this method does not write.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<CertFiles> {
        ensure_dir(dir)?;
        let files = CertFiles {
            ca: dir.join(CA_CERT_FILE),
            cert: dir.join(format!("{stem}.crt")),
            key: dir.join(format!("{stem}.key")),
        };
        write_atomic(&files.key, self.key_pem.as_bytes(), SECRET_MODE)?;
        write_atomic(&files.cert, self.cert_pem.as_bytes(), PUBLIC_MODE)?;
        Ok(files)
    }
}

/// Paths of a CA bundle, a certificate and its key on disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// CA certificate(s) that verify the peer.
    pub ca: PathBuf,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, mode 0600).
    pub key: PathBuf,
}

/// Everything one cluster's clustermesh-apiserver and its clients need.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterCertSet {
    /// Directory holding all files.
    pub dir: PathBuf,
    /// etcd server certificate (`server.{crt,key}`).
    pub server: CertFiles,
    /// `admin-<cluster>`: apiserver and kvstoremesh to the local etcd.
    pub admin: CertFiles,
    /// `local-<cluster>`: agents to the local etcd (KVStoreMesh on).
    pub local: CertFiles,
    /// `remote`: peers in authMode legacy/migration.
    pub remote: CertFiles,
    /// `remote-<cluster>`: this cluster as a peer in authMode cluster.
    pub remote_cluster: CertFiles,
    /// `root`: etcd superuser, used to bootstrap RBAC.
    pub root: CertFiles,
}

/// Issues and writes the full certificate set of `cluster` into `dir`:
/// `ca.crt`, `server.*`, `admin-<c>.*`, `local-<c>.*`, `remote.*`, `remote-<c>.*`, `root.*`.
///
/// Client certificates use `spec.validity_days` as well.
pub fn issue_cluster_set(
    ca: &Ca,
    cluster: &str,
    dir: &Path,
    spec: &ServerSpec,
) -> Result<ClusterCertSet> {
    ensure_dir(dir)?;
    write_atomic(
        &dir.join(CA_CERT_FILE),
        ca.cert_pem().as_bytes(),
        PUBLIC_MODE,
    )?;
    let days = spec.validity_days;
    let client = |cn: &str| -> Result<CertFiles> { ca.issue_client(cn, days)?.write(dir, cn) };
    Ok(ClusterCertSet {
        dir: dir.to_path_buf(),
        server: ca.issue_server(spec)?.write(dir, "server")?,
        admin: client(&format!("admin-{cluster}"))?,
        local: client(&format!("local-{cluster}"))?,
        remote: client("remote")?,
        remote_cluster: client(&format!("remote-{cluster}"))?,
        root: client("root")?,
    })
}

fn common_name_dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

/// Ensures PEM text ends with a newline so concatenated bundles stay valid.
fn normalize_pem(pem: &str) -> String {
    let trimmed = pem.trim();
    format!("{trimmed}\n")
}

/// What we need to know about a CA certificate before trusting it as an issuer.
struct CaCertInfo {
    subject: String,
    is_ca: bool,
    spki: Vec<u8>,
    subject_key_id: Vec<u8>,
    not_after: OffsetDateTime,
}

impl CaCertInfo {
    fn parse(der: &CertificateDer<'_>) -> Result<Self> {
        let x509 = parse_x509(der, "CA certificate")?;
        let subject_key_id = x509
            .iter_extensions()
            .find_map(|ext| match ext.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(id.0.to_vec()),
                _ => None,
            })
            .unwrap_or_default();
        Ok(Self {
            subject: x509.subject().to_string(),
            is_ca: x509.is_ca(),
            spki: x509.public_key().raw.to_vec(),
            subject_key_id,
            not_after: x509.validity().not_after.to_datetime(),
        })
    }
}
