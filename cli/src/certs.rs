//! `clustermesh certs`: create or import the shared CA, issue a cluster's certificate set and
//! inspect certificate files. All crypto lives in `clustermesh-certs`; this module only maps
//! flags to calls and failures to advice.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{bail, Context as _};
use clustermesh_certs::{
    describe_all, issue_cluster_set, rotate_dir, Ca, CertFiles, CertInfo, ServerSpec, CA_CERT_FILE,
    CA_KEY_FILE, DEFAULT_CA_COMMON_NAME, DEFAULT_VALIDITY_DAYS,
};
use clustermesh_types::cluster::ClusterName;

/// Certificate management subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CertsCommand {
    /// Generate a new self-signed CA (ECDSA P-256, 1095 days) into DIR/ca.crt and DIR/ca.key.
    ///
    /// Every cluster of a mesh must use the same CA: create it once, copy the directory.
    CreateCa {
        /// Directory to write ca.crt and ca.key into (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Common name of the CA.
        #[arg(long, default_value = DEFAULT_CA_COMMON_NAME)]
        common_name: String,
        /// Replace an existing ca.key. Certificates signed by the old CA stop verifying.
        #[arg(long)]
        force: bool,
    },
    /// Import an existing CA (e.g. the `cilium-ca` secret's ca.crt/ca.key) into DIR.
    ImportCa {
        /// CA certificate PEM.
        #[arg(long, value_name = "FILE")]
        cert: PathBuf,
        /// CA private key PEM (unencrypted PKCS#8, `BEGIN PRIVATE KEY`).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// Directory to write ca.crt and ca.key into (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Replace an existing ca.key in DIR.
        #[arg(long)]
        force: bool,
    },
    /// Issue the server, admin, local, remote, remote-<cluster> and root certificates of a
    /// cluster, signed by the CA in --ca-dir.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Cluster name (1-32 of `a-z0-9-`, starting and ending alphanumeric).
        #[arg(long, value_name = "NAME", value_parser = parse_cluster_name)]
        cluster: ClusterName,
        /// Directory to write the certificates into (created with mode 0700).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Namespace of the clustermesh-apiserver Service (adds a `*.<ns>.svc` SAN).
        #[arg(long, default_value = "kube-system")]
        namespace: String,
        /// Extra DNS name for the server certificate; repeatable.
        #[arg(long = "extra-dns", value_name = "NAME")]
        extra_dns: Vec<String>,
        /// Extra IP address for the server certificate; repeatable.
        #[arg(long = "extra-ip", value_name = "IP")]
        extra_ip: Vec<IpAddr>,
        /// Validity of the issued certificates in days (capped at the CA's expiry).
        #[arg(long, default_value_t = DEFAULT_VALIDITY_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        validity_days: u32,
    },
    /// Re-issue every leaf certificate in --dir that the CA in --ca-dir signed: new keys, same
    /// names and usage, a fresh validity.
    ///
    /// Each file is replaced atomically (keys 0600). Nothing needs a restart: etcd and every
    /// clustermesh process use the new certificates at their next handshake, and connections
    /// made before keep working.
    Rotate {
        /// Directory holding ca.crt and ca.key.
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// The certificate directory (`<state-dir>/certs` of `clustermesh enable`, or the
        /// --out of `certs issue`).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Validity of the new certificates in days (default: each certificate's own
        /// validity length, capped at the CA's expiry).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        validity_days: Option<u32>,
    },
    /// Print subject, issuer, SANs, expiry and SHA-256 fingerprint of certificate files.
    Show {
        /// PEM files; every certificate in each file is shown.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Output format.
        #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

/// Output format of `certs show`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Human-readable text.
    Text,
    /// One JSON array with an entry per file.
    Json,
}

fn parse_cluster_name(s: &str) -> Result<ClusterName, String> {
    ClusterName::new(s).map_err(|e| e.to_string())
}

/// Runs a `certs` subcommand, writing results to stdout.
pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_to(cmd, &mut out)
}

/// Like [`run`], writing results to `out` (for tests).
pub fn run_to(cmd: CertsCommand, out: &mut dyn Write) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::CreateCa {
            out: dir,
            common_name,
            force,
        } => {
            refuse_overwrite(&dir, force)?;
            let ca = Ca::generate(&common_name)
                .with_context(|| format!("generate CA {common_name:?}"))?;
            ca.write(&dir)
                .with_context(|| format!("write CA to {}", dir.display()))?;
            writeln!(
                out,
                "created CA {:?} in {}: {CA_CERT_FILE} (share with every cluster), {CA_KEY_FILE} (keep private)",
                ca.subject(),
                dir.display()
            )?;
        }
        CertsCommand::ImportCa {
            cert,
            key,
            out: dir,
            force,
        } => {
            refuse_overwrite(&dir, force)?;
            let cert_pem = read(&cert, "CA certificate")?;
            let key_pem = read(&key, "CA private key")?;
            let ca = Ca::from_pem(&cert_pem, &key_pem).with_context(|| {
                format!("import CA from {} and {}", cert.display(), key.display())
            })?;
            ca.write(&dir)
                .with_context(|| format!("write CA to {}", dir.display()))?;
            writeln!(out, "imported CA {:?} into {}", ca.subject(), dir.display())?;
        }
        CertsCommand::Issue {
            ca_dir,
            cluster,
            out: dir,
            namespace,
            extra_dns,
            extra_ip,
            validity_days,
        } => {
            let ca = load_ca(&ca_dir)?;
            let spec = ServerSpec {
                namespace,
                extra_dns_names: extra_dns,
                extra_ips: extra_ip,
                validity_days,
            };
            let set = issue_cluster_set(&ca, cluster.as_str(), &dir, &spec).with_context(|| {
                format!(
                    "issue certificates for cluster {cluster} into {}",
                    dir.display()
                )
            })?;
            writeln!(
                out,
                "issued certificates for cluster {cluster} in {} (signed by {:?}):",
                set.dir.display(),
                ca.subject()
            )?;
            for (role, files) in [
                ("etcd server", &set.server),
                ("apiserver/kvstoremesh -> local etcd", &set.admin),
                ("agents -> local etcd", &set.local),
                ("peers, authMode legacy", &set.remote),
                ("peers, authMode cluster", &set.remote_cluster),
                ("etcd superuser", &set.root),
            ] {
                writeln!(out, "  {:<22} {}", file_stem(files), role)?;
            }
        }
        CertsCommand::Rotate {
            ca_dir,
            dir,
            validity_days,
        } => {
            let ca = load_ca(&ca_dir)?;
            let rotated = rotate_dir(&ca, &dir, validity_days)
                .with_context(|| format!("rotate the certificates in {}", dir.display()))?;
            if rotated.is_empty() {
                bail!(
                    "no certificate in {} was issued by the CA in {} ({:?}): check --dir and --ca-dir",
                    dir.display(),
                    ca_dir.display(),
                    ca.subject()
                );
            }
            writeln!(
                out,
                "rotated {} certificates in {} (signed by {:?}):",
                rotated.len(),
                dir.display(),
                ca.subject()
            )?;
            for r in &rotated {
                writeln!(
                    out,
                    "  {:<22} CN={:<32} serial {} -> {}, valid until {}",
                    r.cert
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    r.common_name,
                    r.old_serial,
                    r.new_serial,
                    rfc3339(r.not_after)
                )?;
            }
            // A lab cluster's pods read the certificates from their Secrets' files: write
            // them again, as a kubelet updates a mounted Secret.
            if let Some((pods, cluster)) =
                crate::lab::install::refresh(&dir).with_context(|| {
                    format!("updating the lab pods' Secret files from {}", dir.display())
                })?
            {
                writeln!(
                    out,
                    "updated the Secret files of {pods} pods of lab cluster {cluster} (as a kubelet updates mounted Secrets)"
                )?;
            }
            writeln!(
                out,
                "running processes use them at their next handshake; no restart needed"
            )?;
        }
        CertsCommand::Show { files, output } => show(&files, output, out)?,
    }
    Ok(())
}

fn refuse_overwrite(dir: &Path, force: bool) -> anyhow::Result<()> {
    let key = dir.join(CA_KEY_FILE);
    if key.exists() && !force {
        bail!(
            "{} already exists: refusing to replace the CA (certificates it signed would stop \
             verifying); pass --force to replace it, or choose another --out",
            key.display()
        );
    }
    Ok(())
}

fn load_ca(dir: &Path) -> anyhow::Result<Ca> {
    for file in [CA_CERT_FILE, CA_KEY_FILE] {
        if !dir.join(file).exists() {
            bail!(
                "{file} not found in {dir}: run `clustermesh certs create-ca --out {dir}` (or \
                 `clustermesh certs import-ca --cert FILE --key FILE --out {dir}`) first",
                dir = dir.display()
            );
        }
    }
    Ca::load(dir).with_context(|| format!("load CA from {}", dir.display()))
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("read {what} {}", path.display()))
}

fn file_stem(files: &CertFiles) -> String {
    files
        .cert
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn show(files: &[PathBuf], output: Output, out: &mut dyn Write) -> anyhow::Result<()> {
    let now = SystemTime::now();
    let mut described = Vec::with_capacity(files.len());
    for file in files {
        let pem = read(file, "certificate")?;
        let infos = describe_all(&pem).with_context(|| format!("show {}", file.display()))?;
        described.push((file, infos));
    }
    match output {
        Output::Json => {
            let json: Vec<_> = described
                .iter()
                .map(|(file, infos)| {
                    serde_json::json!({
                        "file": file.display().to_string(),
                        "certificates": infos.iter().map(|i| info_json(i, now)).collect::<Vec<_>>(),
                    })
                })
                .collect();
            serde_json::to_writer_pretty(&mut *out, &json)?;
            writeln!(out)?;
        }
        Output::Text => {
            for (file, infos) in &described {
                writeln!(out, "{}:", file.display())?;
                for (n, info) in infos.iter().enumerate() {
                    if infos.len() > 1 {
                        writeln!(out, "  [{n}]")?;
                    }
                    write_info_text(info, now, out)?;
                }
            }
        }
    }
    Ok(())
}

fn write_info_text(info: &CertInfo, now: SystemTime, out: &mut dyn Write) -> anyhow::Result<()> {
    let list = |items: Vec<String>| {
        if items.is_empty() {
            "-".to_owned()
        } else {
            items.join(", ")
        }
    };
    writeln!(out, "  subject:      {}", info.subject)?;
    writeln!(out, "  issuer:       {}", info.issuer)?;
    writeln!(out, "  CA:           {}", info.is_ca)?;
    writeln!(out, "  DNS names:    {}", list(info.dns_names.clone()))?;
    writeln!(
        out,
        "  IP addresses: {}",
        list(info.ip_addresses.iter().map(IpAddr::to_string).collect())
    )?;
    writeln!(out, "  not before:   {}", rfc3339(info.not_before))?;
    writeln!(
        out,
        "  not after:    {} ({})",
        rfc3339(info.not_after),
        remaining_text(info, now)
    )?;
    writeln!(out, "  SHA-256:      {}", info.sha256_fingerprint)?;
    writeln!(out, "  serial:       {}", info.serial)?;
    Ok(())
}

fn info_json(info: &CertInfo, now: SystemTime) -> serde_json::Value {
    serde_json::json!({
        "subject": info.subject,
        "issuer": info.issuer,
        "common_name": info.common_name,
        "is_ca": info.is_ca,
        "dns_names": info.dns_names,
        "ip_addresses": info.ip_addresses,
        "not_before": rfc3339(info.not_before),
        "not_after": rfc3339(info.not_after),
        "days_remaining": days_remaining(info.not_after, now),
        "expired": info.not_after < now,
        "sha256_fingerprint": info.sha256_fingerprint,
        "serial": info.serial,
    })
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Whole days until `not_after` (negative once expired).
fn days_remaining(not_after: SystemTime, now: SystemTime) -> i64 {
    const DAY: u64 = 86_400;
    match not_after.duration_since(now) {
        Ok(left) => i64::try_from(left.as_secs() / DAY).unwrap_or(i64::MAX),
        Err(past) => -i64::try_from(past.duration().as_secs().div_ceil(DAY)).unwrap_or(i64::MAX),
    }
}

fn remaining_text(info: &CertInfo, now: SystemTime) -> String {
    if info.not_before > now {
        return "NOT YET VALID".to_owned();
    }
    match days_remaining(info.not_after, now) {
        d if d < 0 => format!("EXPIRED {} days ago", -d),
        d => format!("{d} days remaining"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use std::os::unix::fs::PermissionsExt;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: CertsCommand,
    }

    fn exec(args: &[&str]) -> anyhow::Result<String> {
        let cli = Cli::try_parse_from(std::iter::once("certs").chain(args.iter().copied()))?;
        let mut buf = Vec::new();
        run_to(cli.cmd, &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn create_issue_show() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let out = tmp.path().join("c1");
        exec(&["create-ca", "--out", s(&ca_dir)]).unwrap();
        let mode = std::fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A second create-ca must not silently replace the CA.
        let err = exec(&["create-ca", "--out", s(&ca_dir)]).unwrap_err();
        assert!(format!("{err:#}").contains("--force"), "{err:#}");
        exec(&[
            "create-ca",
            "--out",
            s(&ca_dir),
            "--force",
            "--common-name",
            "Other CA",
        ])
        .unwrap();

        let text = exec(&[
            "issue",
            "--ca-dir",
            s(&ca_dir),
            "--cluster",
            "cluster-1",
            "--out",
            s(&out),
            "--namespace",
            "mesh",
            "--extra-dns",
            "c1.example.org",
            "--extra-ip",
            "192.0.2.10",
        ])
        .unwrap();
        assert!(text.contains("remote-cluster-1"), "{text}");
        for f in [
            "ca.crt",
            "server.key",
            "admin-cluster-1.crt",
            "local-cluster-1.key",
            "remote.crt",
            "root.key",
        ] {
            assert!(out.join(f).is_file(), "{f}");
        }

        let text = exec(&["show", s(&out.join("server.crt"))]).unwrap();
        assert!(
            text.contains("subject:      CN=clustermesh-apiserver.cilium.io"),
            "{text}"
        );
        assert!(text.contains("issuer:       CN=Other CA"), "{text}");
        assert!(text.contains("clustermesh-apiserver.mesh.svc"), "{text}");
        assert!(
            text.contains("c1.example.org") && text.contains("192.0.2.10"),
            "{text}"
        );
        assert!(text.contains("days remaining"), "{text}");

        let json = exec(&[
            "show",
            "-o",
            "json",
            s(&out.join("root.crt")),
            s(&out.join("ca.crt")),
        ])
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v[0]["certificates"][0]["common_name"], "root");
        assert_eq!(v[1]["certificates"][0]["is_ca"], true);
        let days = v[0]["certificates"][0]["days_remaining"].as_i64().unwrap();
        assert!((1093..=1095).contains(&days), "{days}");
        assert_eq!(
            v[0]["certificates"][0]["sha256_fingerprint"]
                .as_str()
                .unwrap()
                .len(),
            95
        );
    }

    #[test]
    fn rotate_reissues_every_leaf_with_the_same_names() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("ca");
        let out = tmp.path().join("c1");
        exec(&["create-ca", "--out", s(&ca_dir)]).unwrap();
        exec(&[
            "issue",
            "--ca-dir",
            s(&ca_dir),
            "--cluster",
            "c1",
            "--out",
            s(&out),
            "--namespace",
            "mesh",
            "--extra-ip",
            "192.0.2.10",
            "--validity-days",
            "30",
        ])
        .unwrap();
        let before = |f: &str| clustermesh_certs::describe_file(&out.join(f)).unwrap();
        let (server, root) = (before("server.crt"), before("root.crt"));
        let text = exec(&["rotate", "--ca-dir", s(&ca_dir), "--dir", s(&out)]).unwrap();
        assert!(text.contains("rotated 6 certificates"), "{text}");
        assert!(
            text.contains(&root.serial),
            "old serials are printed: {text}"
        );
        let (server2, root2) = (before("server.crt"), before("root.crt"));
        assert_ne!(server.serial, server2.serial);
        assert_ne!(root.serial, root2.serial);
        assert_eq!(server.dns_names, server2.dns_names);
        assert_eq!(server.ip_addresses, server2.ip_addresses);
        assert_eq!(root2.common_name, "root");
        // Each keeps its own validity length unless told otherwise.
        let days = |i: &CertInfo| {
            i.not_after
                .duration_since(SystemTime::now())
                .unwrap()
                .as_secs()
                / 86_400
        };
        assert_eq!(days(&root2), 29);
        let mode = std::fs::metadata(out.join("root.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // A CA that signed nothing here: a clear error, nothing touched.
        let other = tmp.path().join("other");
        exec(&["create-ca", "--out", s(&other)]).unwrap();
        let err = exec(&["rotate", "--ca-dir", s(&other), "--dir", s(&out)]).unwrap_err();
        assert!(format!("{err:#}").contains("no certificate in"), "{err:#}");
        assert_eq!(before("root.crt").serial, root2.serial);
    }

    #[test]
    fn issue_errors_are_actionable() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("missing");
        let err = exec(&[
            "issue",
            "--ca-dir",
            s(&ca_dir),
            "--cluster",
            "c1",
            "--out",
            s(tmp.path()),
        ])
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("not found in") && msg.contains("certs create-ca --out"),
            "{msg}"
        );

        let err = exec(&[
            "issue",
            "--ca-dir",
            s(&ca_dir),
            "--cluster",
            "Bad_Name",
            "--out",
            "x",
        ])
        .unwrap_err();
        assert!(err.to_string().contains("Bad_Name"), "{err}");

        let err = exec(&["show", s(&tmp.path().join("nope.crt"))]).unwrap_err();
        assert!(format!("{err:#}").contains("nope.crt"), "{err:#}");
    }

    #[test]
    fn import_ca_round_trip_and_openssl_interop() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        Ca::generate("Cilium CA").unwrap().write(&src).unwrap();
        let dst = tmp.path().join("dst");
        exec(&[
            "import-ca",
            "--cert",
            s(&src.join("ca.crt")),
            "--key",
            s(&src.join("ca.key")),
            "--out",
            s(&dst),
        ])
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(src.join("ca.crt")).unwrap(),
            std::fs::read_to_string(dst.join("ca.crt")).unwrap()
        );
        let err = exec(&[
            "import-ca",
            "--cert",
            s(&src.join("ca.crt")),
            "--key",
            s(&src.join("ca.key")),
            "--out",
            s(&dst),
        ])
        .unwrap_err();
        assert!(format!("{err:#}").contains("--force"), "{err:#}");

        // A CA made by openssl (as `cilium-ca` often is) imports and signs certs openssl accepts.
        let openssl = Path::new("/usr/bin/openssl");
        if !openssl.exists() {
            return;
        }
        let ext = tmp.path().join("ext");
        std::fs::create_dir(&ext).unwrap();
        let status = std::process::Command::new(openssl)
            .args([
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
            ])
            .args(["-subj", "/CN=Ext CA", "-days", "30", "-keyout"])
            .arg(ext.join("ca.key"))
            .arg("-out")
            .arg(ext.join("ca.crt"))
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        let imported = tmp.path().join("imported");
        exec(&[
            "import-ca",
            "--cert",
            s(&ext.join("ca.crt")),
            "--key",
            s(&ext.join("ca.key")),
            "--out",
            s(&imported),
        ])
        .unwrap();
        let certs = tmp.path().join("certs");
        exec(&[
            "issue",
            "--ca-dir",
            s(&imported),
            "--cluster",
            "c2",
            "--out",
            s(&certs),
        ])
        .unwrap();
        let verify = std::process::Command::new(openssl)
            .args(["verify", "-purpose", "sslserver", "-CAfile"])
            .arg(ext.join("ca.crt"))
            .arg(certs.join("server.crt"))
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
        let verify = std::process::Command::new(openssl)
            .args(["verify", "-purpose", "sslclient", "-CAfile"])
            .arg(ext.join("ca.crt"))
            .arg(certs.join("remote-c2.crt"))
            .output()
            .unwrap();
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }

    #[test]
    fn days_remaining_rounds_toward_now() {
        let now = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(10 * 86_400);
        let day = std::time::Duration::from_secs(86_400);
        assert_eq!(days_remaining(now + day * 3 / 2, now), 1);
        assert_eq!(days_remaining(now - day / 2, now), -1);
        assert_eq!(days_remaining(now, now), 0);
    }
}
