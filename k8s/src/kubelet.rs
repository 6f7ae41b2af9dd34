//! The kubelet's part for one container of an install, off-cluster: the ConfigMaps and
//! Secrets of [`crate::objects`] written into a directory the way the container's volumes
//! mount them, and its command line with the environment resolved — so a process started from
//! it (the lab's) reads exactly what a cluster's pod would receive.
//!
//! What it does as a kubelet does:
//! - every `volumeMount` of a `configMap`, `secret` or `projected` volume (configMap and
//!   secret sources) becomes files under `root` + `mountPath`: one file per key, or per
//!   `items` entry at its `path`; a `subPath` mount is the one file;
//! - file modes follow `items[].mode`, else the volume's `defaultMode`, else 0644; files from
//!   a Secret are never wider than 0600;
//! - a missing source marked `optional` gives no files, a missing required one is an error;
//!   files of a mounted directory that the objects no longer hold are removed (a key gone
//!   from a Secret is a file gone), and every file is replaced atomically (write, rename);
//! - `env` is resolved from literal values, `configMapKeyRef` and `fieldRef` (the downward
//!   API fields are given by the caller: node name, host and pod IPs), and `$(VAR)` in
//!   `command`/`args` is expanded with it (`$$` stays a literal `$`; unknown names are kept).
//!
//! - an `emptyDir` mount is a directory under `root` + `mountPath`, created if missing
//!   (0700) and kept across runs, as an emptyDir lives as long as its pod (a `Memory`
//!   medium is a plain directory here: no tmpfs, no `sizeLimit`).
//!
//! The one translation it makes: a container sees its mounts at the root of its own mount
//! namespace, a process started here does not, so an absolute path under a configMap, secret,
//! projected or emptyDir mount — in the arguments and inside the written files — becomes the
//! same path under `root`. hostPath mounts are left to the caller.
//!
//! It must not start processes, talk to a cluster, or change what the objects say.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Container, KeyToPath, PodSpec, Secret, Volume};

use crate::objects::Object;

/// What went wrong materialising a container.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The workload or its container is not among the objects.
    #[error("{what} is not among the install objects: render them with objects::install")]
    NoWorkload {
        /// `Kind name` or `container c of Kind name`.
        what: String,
    },
    /// An object does not parse into its k8s-openapi type.
    #[error("{what} does not parse as its Kubernetes type: {source}")]
    Parse {
        /// The object.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// A required ConfigMap, Secret or key is missing.
    #[error("volume {volume} of {workload} needs {what}, which the install objects do not hold (mark it optional, or render it)")]
    Missing {
        /// The workload.
        workload: String,
        /// The volume (or `env NAME`).
        volume: String,
        /// `ConfigMap name`, `Secret name`, `key k of Secret name`, a downward API field.
        what: String,
    },
    /// A file or directory cannot be written.
    #[error("writing {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The container as it would run: command line after `$(VAR)` expansion, its environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Materialised {
    /// `command` (the image's entrypoint if empty).
    pub command: Vec<String>,
    /// `args`.
    pub args: Vec<String>,
    /// Resolved environment.
    pub env: BTreeMap<String, String>,
    /// The directory standing for the container's `/`.
    pub root: PathBuf,
}

impl Materialised {
    /// The value of `--name=value` in the arguments.
    pub fn flag(&self, name: &str) -> Option<&str> {
        let prefix = format!("--{name}=");
        self.args.iter().find_map(|a| a.strip_prefix(&prefix))
    }
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> Option<&'a Object> {
    objects.iter().find(|o| o.kind == kind && o.name == name)
}

fn parse<T: serde::de::DeserializeOwned>(o: &Object) -> Result<T, Error> {
    serde_json::from_value(o.value.clone()).map_err(|source| Error::Parse {
        what: o.describe(),
        source,
    })
}

/// A source's data as bytes by key (ConfigMap `data` and `binaryData`, Secret `data` and
/// `stringData`), and whether it is a Secret; `None` if the objects do not hold it.
fn source_data(
    objects: &[Object],
    kind: &str,
    name: &str,
) -> Result<Option<BTreeMap<String, Vec<u8>>>, Error> {
    let Some(o) = find(objects, kind, name) else {
        return Ok(None);
    };
    let mut out = BTreeMap::new();
    if kind == "Secret" {
        let s: Secret = parse(o)?;
        for (k, v) in s.data.unwrap_or_default() {
            out.insert(k, v.0);
        }
        for (k, v) in s.string_data.unwrap_or_default() {
            out.insert(k, v.into_bytes());
        }
    } else {
        let c: ConfigMap = parse(o)?;
        for (k, v) in c.binary_data.unwrap_or_default() {
            out.insert(k, v.0);
        }
        for (k, v) in c.data.unwrap_or_default() {
            out.insert(k, v.into_bytes());
        }
    }
    Ok(Some(out))
}

/// One file of a volume: relative path, contents, mode.
type File = (String, Vec<u8>, u32);

struct Volumes<'a> {
    objects: &'a [Object],
    workload: String,
}

impl Volumes<'_> {
    /// The files of one source (`kind` `name`) as projected with `items` and modes.
    #[allow(clippy::too_many_arguments)]
    fn source(
        &self,
        volume: &str,
        kind: &str,
        name: &str,
        items: Option<&Vec<KeyToPath>>,
        optional: bool,
        default_mode: u32,
        out: &mut Vec<File>,
    ) -> Result<(), Error> {
        let missing = |what: String| Error::Missing {
            workload: self.workload.clone(),
            volume: volume.to_string(),
            what,
        };
        let Some(data) = source_data(self.objects, kind, name)? else {
            return if optional {
                Ok(())
            } else {
                Err(missing(format!("{kind} {name}")))
            };
        };
        // A Secret's files are never readable by others, whatever the mode says.
        let clamp = |m: u32| if kind == "Secret" { m & 0o600 } else { m };
        match items {
            None => {
                for (k, v) in data {
                    out.push((k, v, clamp(default_mode)));
                }
            }
            Some(items) => {
                for it in items {
                    match data.get(&it.key) {
                        Some(v) => out.push((
                            it.path.clone(),
                            v.clone(),
                            clamp(it.mode.map(|m| m as u32).unwrap_or(default_mode)),
                        )),
                        None if optional => {}
                        None => return Err(missing(format!("key {} of {kind} {name}", it.key))),
                    }
                }
            }
        }
        Ok(())
    }

    /// The files of a configMap, secret or projected volume; `None` for other volume types.
    fn files(&self, v: &Volume) -> Result<Option<Vec<File>>, Error> {
        let mode = |m: Option<i32>| m.map(|m| m as u32).unwrap_or(0o644);
        let mut out = Vec::new();
        if let Some(c) = &v.config_map {
            let optional = c.optional.unwrap_or(false);
            let dm = mode(c.default_mode);
            self.source(
                &v.name,
                "ConfigMap",
                &c.name,
                c.items.as_ref(),
                optional,
                dm,
                &mut out,
            )?;
        } else if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let optional = s.optional.unwrap_or(false);
            let dm = mode(s.default_mode);
            self.source(
                &v.name,
                "Secret",
                &name,
                s.items.as_ref(),
                optional,
                dm,
                &mut out,
            )?;
        } else if let Some(p) = &v.projected {
            let dm = mode(p.default_mode);
            for src in p.sources.iter().flatten() {
                if let Some(c) = &src.config_map {
                    let optional = c.optional.unwrap_or(false);
                    self.source(
                        &v.name,
                        "ConfigMap",
                        &c.name,
                        c.items.as_ref(),
                        optional,
                        dm,
                        &mut out,
                    )?;
                }
                if let Some(s) = &src.secret {
                    let optional = s.optional.unwrap_or(false);
                    self.source(
                        &v.name,
                        "Secret",
                        &s.name,
                        s.items.as_ref(),
                        optional,
                        dm,
                        &mut out,
                    )?;
                }
                // Service account tokens and downward API files: nothing of ours reads them
                // off-cluster (the agent's token goes only to its init step).
            }
        } else {
            return Ok(None);
        }
        Ok(Some(out))
    }
}

/// The pod spec of a Deployment or DaemonSet among the objects.
fn pod_spec(objects: &[Object], kind: &str, name: &str) -> Result<PodSpec, Error> {
    let o = find(objects, kind, name).ok_or_else(|| Error::NoWorkload {
        what: format!("{kind} {name}"),
    })?;
    let spec = match kind {
        "Deployment" => parse::<Deployment>(o)?.spec.and_then(|s| s.template.spec),
        "DaemonSet" => parse::<DaemonSet>(o)?.spec.and_then(|s| s.template.spec),
        _ => None,
    };
    spec.ok_or_else(|| Error::NoWorkload {
        what: format!("a pod template in {kind} {name}"),
    })
}

/// `root` + an absolute in-pod path.
fn under(root: &Path, p: &str) -> PathBuf {
    root.join(p.trim_start_matches('/'))
}

/// Replaces every in-pod path that starts with one of `mounts` (at a path boundary) by the
/// same path under `root`, in one pass (so a replaced path is never replaced again).
fn rewrite(text: &str, mounts: &[String], root: &Path) -> String {
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    let bytes = text.as_bytes();
    'scan: while i < text.len() {
        let boundary = i == 0
            || !matches!(bytes[i - 1], b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'.' | b'-' | b'_');
        if boundary && bytes[i] == b'/' {
            for m in mounts {
                let rest = &text[i..];
                let ends = rest.as_bytes().get(m.len()).is_none_or(
                    |c| !matches!(c, b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'.' | b'-' | b'_'),
                );
                if rest.starts_with(m.as_str()) && ends {
                    out.push_str(&under(root, m).display().to_string());
                    i += m.len();
                    continue 'scan;
                }
            }
        }
        // Advance by one character (paths are ASCII; other text is copied as is).
        let ch = text[i..].chars().next().unwrap_or('\u{0}');
        out.push(ch);
        i += ch.len_utf8().max(1);
    }
    out
}

/// `$(VAR)` expanded from `env` as the kubelet does: `$$` is a literal `$`, an unknown name
/// stays as written.
fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(body) = after.strip_prefix('(') {
            match body.find(')') {
                Some(end) => {
                    let name = &body[..end];
                    match env.get(name) {
                        Some(v) => out.push_str(v),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &body[end + 1..];
                }
                None => {
                    out.push_str(&rest[pos..]);
                    rest = "";
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `data` to `path` with `mode`, atomically (a reader sees the old or the new file).
fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), Error> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.kubelet-tmp"));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    // The umask may have narrowed the mode; the spec's mode is what the file gets.
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Materialises container `container` of workload `kind` `name` (`Deployment` or
/// `DaemonSet`) from `objects` into `root`: its ConfigMap/Secret volumes written as files,
/// its environment resolved (`fields`: downward API field path → value, e.g.
/// `spec.nodeName`), its command line expanded. Safe to run again: the files then follow
/// the objects (the kubelet's resync).
pub fn materialise(
    objects: &[Object],
    kind: &str,
    name: &str,
    container: &str,
    fields: &BTreeMap<String, String>,
    root: &Path,
) -> Result<Materialised, Error> {
    let workload = format!("{kind} {name}");
    let spec = pod_spec(objects, kind, name)?;
    let c: &Container = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .find(|c| c.name == container)
        .ok_or_else(|| Error::NoWorkload {
            what: format!("container {container} of {workload}"),
        })?;
    let vols = Volumes {
        objects,
        workload: workload.clone(),
    };
    let volumes: BTreeMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    // The mounts this module writes, longest first (the rewrite prefers the deepest).
    let mut planned = Vec::new();
    let mut empty_dirs = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let Some(v) = volumes.get(m.name.as_str()) else {
            return Err(Error::Missing {
                workload,
                volume: m.name.clone(),
                what: "a volume of that name in the pod spec".into(),
            });
        };
        if let Some(files) = vols.files(v)? {
            planned.push((m.clone(), files));
        } else if v.empty_dir.is_some() {
            empty_dirs.push(m.mount_path.clone());
        }
    }
    for d in &empty_dirs {
        let target = under(root, d);
        if !target.is_dir() {
            std::fs::create_dir_all(&target).map_err(io(&target))?;
            std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                .map_err(io(&target))?;
        }
    }
    let mut mounts: Vec<String> = planned
        .iter()
        .map(|(m, _)| m.mount_path.clone())
        .chain(empty_dirs.iter().cloned())
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
    let fix = |data: &[u8]| match std::str::from_utf8(data) {
        Ok(t) => rewrite(t, &mounts, root).into_bytes(),
        Err(_) => data.to_vec(),
    };
    for (m, files) in &planned {
        let target = under(root, &m.mount_path);
        match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => {
                let (_, data, mode) =
                    files
                        .iter()
                        .find(|(p, _, _)| p == sub)
                        .ok_or_else(|| Error::Missing {
                            workload: workload.clone(),
                            volume: m.name.clone(),
                            what: format!("subPath {sub}"),
                        })?;
                write_file(&target, &fix(data), *mode)?;
            }
            None => {
                std::fs::create_dir_all(&target).map_err(io(&target))?;
                std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o700))
                    .map_err(io(&target))?;
                // Files the objects no longer hold go, as a kubelet swaps the whole volume.
                let keep: std::collections::BTreeSet<PathBuf> =
                    files.iter().map(|(p, _, _)| target.join(p)).collect();
                for e in std::fs::read_dir(&target).map_err(io(&target))?.flatten() {
                    if e.path().is_file() && !keep.contains(&e.path()) {
                        std::fs::remove_file(e.path()).map_err(io(&e.path()))?;
                    }
                }
                for (p, data, mode) in files {
                    write_file(&target.join(p), &fix(data), *mode)?;
                }
            }
        }
    }
    let mut env = BTreeMap::new();
    for e in c.env.iter().flatten() {
        let missing = |what: String| Error::Missing {
            workload: workload.clone(),
            volume: format!("env {}", e.name),
            what,
        };
        let value = if let Some(v) = &e.value {
            expand(v, &env)
        } else if let Some(from) = &e.value_from {
            if let Some(r) = &from.config_map_key_ref {
                let data = source_data(objects, "ConfigMap", &r.name)?;
                match data.and_then(|d| d.get(&r.key).cloned()) {
                    Some(v) => String::from_utf8_lossy(&v).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => return Err(missing(format!("key {} of ConfigMap {}", r.key, r.name))),
                }
            } else if let Some(f) = &from.field_ref {
                fields
                    .get(&f.field_path)
                    .cloned()
                    .ok_or_else(|| missing(format!("downward API field {}", f.field_path)))?
            } else {
                return Err(missing("a value source this module knows".into()));
            }
        } else {
            String::new()
        };
        env.insert(e.name.clone(), value);
    }
    let line = |v: &Option<Vec<String>>| -> Vec<String> {
        v.iter()
            .flatten()
            .map(|a| rewrite(&expand(a, &env), &mounts, root))
            .collect()
    };
    Ok(Materialised {
        command: line(&c.command),
        args: line(&c.args),
        env,
        root: root.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{self, CertPems, Values};

    fn pems() -> CertPems {
        let pair = |n: &str| (format!("CERT {n}\n"), format!("KEY {n}\n"));
        CertPems {
            ca_cert: "CA CERT\n".into(),
            ca_key: "CA KEY\n".into(),
            server: pair("server"),
            admin: pair("admin"),
            local: pair("local"),
            remote: pair("remote"),
        }
    }

    fn fields() -> BTreeMap<String, String> {
        BTreeMap::from([
            ("spec.nodeName".to_string(), "n1".to_string()),
            ("status.hostIP".to_string(), "198.18.1.11".to_string()),
            ("status.podIP".to_string(), "198.18.1.11".to_string()),
        ])
    }

    fn mode(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_agent_gets_its_configmap_and_secret_files_and_its_command_line() {
        let v = Values {
            cluster_name: "c1".into(),
            cluster_id: 1,
            ..Values::default()
        };
        let objs = objects::cluster_install(&v, &pems());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let m = materialise(&objs, "DaemonSet", objects::AGENT, "agent", &fields(), root).unwrap();
        let etc = root.join("etc/clustermesh");
        // The ConfigMap's key, through its subPath mount, with in-pod paths under root.
        let cfg = std::fs::read_to_string(etc.join("local-etcd-config.yaml")).unwrap();
        assert!(
            cfg.contains(&format!(
                "trusted-ca-file: {}/etcd-secrets/ca.crt",
                etc.display()
            )),
            "{cfg}"
        );
        assert!(
            cfg.contains("https://clustermesh-apiserver.kube-system.svc:2379"),
            "{cfg}"
        );
        // The Secret's keys; keys never wider than 0600.
        assert_eq!(
            std::fs::read_to_string(etc.join("etcd-secrets/tls.key")).unwrap(),
            "KEY local\n"
        );
        for f in ["etcd-secrets/tls.key", "clustermesh/local-etcd-client.key"] {
            assert_eq!(mode(&etc.join(f)) & 0o177, 0, "{f}");
        }
        // The projected volume: items renamed, the optional cilium-clustermesh absent.
        assert_eq!(
            std::fs::read_to_string(etc.join("clustermesh/local-etcd-client.crt")).unwrap(),
            "CERT local\n"
        );
        // The command line, as the kubelet expands it.
        assert_eq!(m.flag("cluster-name"), Some("c1"));
        assert_eq!(m.flag("cluster-id"), Some("1"));
        assert_eq!(m.flag("node-name"), Some("n1"));
        assert_eq!(m.flag("node-ip"), Some("198.18.1.11"));
        let etcd_config = etc.join("local-etcd-config.yaml").display().to_string();
        assert_eq!(m.flag("etcd-config"), Some(etcd_config.as_str()));
        // hostPath mounts are the caller's.
        assert_eq!(m.flag("bpffs-dir"), Some("/sys/fs/bpf/clustermesh"));
    }

    #[test]
    fn a_second_run_follows_the_objects_and_missing_sources_are_named() {
        let v = Values {
            cluster_name: "c1".into(),
            cluster_id: 1,
            ..Values::default()
        };
        let mut objs = objects::cluster_install(&v, &pems());
        let peers = [objects::PeerAddress {
            name: "c2".into(),
            ips: vec!["198.18.2.2".into()],
            port: 2379,
            cluster_cidrs: Vec::new(),
        }];
        objs.extend(objects::remote_secrets(&v, &peers, &BTreeMap::new()));
        let dir = tempfile::tempdir().unwrap();
        let remotes = dir.path().join("etc/clustermesh/clustermesh");
        materialise(
            &objs,
            "DaemonSet",
            objects::AGENT,
            "agent",
            &fields(),
            dir.path(),
        )
        .unwrap();
        assert!(remotes.join("c2").is_file());
        // The peer's entry leaves the Secret: its file leaves the volume.
        objs.retain(|o| o.name != objects::AGENT_REMOTES_SECRET);
        materialise(
            &objs,
            "DaemonSet",
            objects::AGENT,
            "agent",
            &fields(),
            dir.path(),
        )
        .unwrap();
        assert!(!remotes.join("c2").exists());
        assert!(remotes.join("local-etcd-client.crt").is_file());
        // A required Secret missing: named, with the volume.
        objs.retain(|o| o.name != objects::LOCAL_CERT);
        let err = materialise(
            &objs,
            "DaemonSet",
            objects::AGENT,
            "agent",
            &fields(),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("Secret clustermesh-apiserver-local-cert"),
            "{err}"
        );
        // A downward API field not given: named.
        let err = materialise(
            &objects::cluster_install(&v, &pems()),
            "DaemonSet",
            objects::AGENT,
            "agent",
            &BTreeMap::new(),
            dir.path(),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("downward API field"), "{err}");
    }

    #[test]
    fn the_control_plane_gets_its_secrets_its_empty_dirs_and_its_command_line() {
        let v = Values {
            cluster_name: "c1".into(),
            cluster_id: 1,
            ..Values::default()
        };
        let objs = objects::cluster_install(&v, &pems());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let etcd = materialise(
            &objs,
            "Deployment",
            objects::APISERVER,
            "etcd",
            &fields(),
            root,
        )
        .unwrap();
        // The emptyDir is a directory under root, and the argument names it there.
        let data = root.join("var/run/etcd");
        assert!(data.is_dir());
        assert_eq!(mode(&data), 0o700);
        assert_eq!(
            etcd.flag("data-dir"),
            Some(data.display().to_string().as_str())
        );
        // The server Secret's files, at most 0600 (defaultMode 0400 here).
        let key = root.join("var/lib/etcd-secrets/tls.key");
        assert_eq!(std::fs::read_to_string(&key).unwrap(), "KEY server\n");
        assert_eq!(mode(&key), 0o400);
        assert_eq!(
            etcd.flag("listen-client-urls"),
            Some("https://127.0.0.1:2379,https://198.18.1.11:2379")
        );
        let api = materialise(
            &objs,
            "Deployment",
            objects::APISERVER,
            "apiserver",
            &fields(),
            root,
        )
        .unwrap();
        assert_eq!(api.flag("cluster-name"), Some("c1"));
        let state = root.join("var/run/clustermesh");
        assert!(state.is_dir());
        assert_eq!(
            api.flag("state-dir"),
            Some(state.display().to_string().as_str())
        );
        let cfg = std::fs::read_to_string(root.join("etc/clustermesh/etcd-config.yaml")).unwrap();
        assert!(
            cfg.contains(&format!(
                "{}/etc/clustermesh/etcd-secrets/tls.crt",
                root.display()
            )),
            "{cfg}"
        );
        // A second run keeps what the emptyDir holds.
        std::fs::write(data.join("member"), "kept").unwrap();
        materialise(
            &objs,
            "Deployment",
            objects::APISERVER,
            "etcd",
            &fields(),
            root,
        )
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(data.join("member")).unwrap(),
            "kept"
        );
    }

    #[test]
    fn expansion_and_rewriting_follow_the_kubelet() {
        let env = BTreeMap::from([("A".to_string(), "x".to_string())]);
        assert_eq!(expand("--a=$(A) $$(A) $(B) $", &env), "--a=x $(A) $(B) $");
        let mounts = vec!["/etc/cm/secrets".to_string(), "/etc/cm".to_string()];
        let root = Path::new("/r");
        assert_eq!(
            rewrite(
                "ca: /etc/cm/secrets/ca.crt\nx: /etc/cmx /usr/etc/cm",
                &mounts,
                root
            ),
            "ca: /r/etc/cm/secrets/ca.crt\nx: /etc/cmx /usr/etc/cm"
        );
        assert_eq!(
            rewrite("--c=/etc/cm/a.yaml", &mounts, root),
            "--c=/r/etc/cm/a.yaml"
        );
    }
}
