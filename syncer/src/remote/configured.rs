//! Which remote clusters the config folder names: the one rule set used by everyone who
//! asks (the [`Manager`](super::Manager) that reads them, the agent's readiness, KVStoreMesh's
//! drain, `clustermesh status`), so that they never disagree about what is connected.
//!
//! The folder holds one etcd client config file per remote cluster, named after the cluster
//! (Cilium's layout). Beside them live other files that are not remotes, and they are
//! skipped without a word:
//! * hidden entries (`.x`): Kubernetes secret mounts keep their data in `..data` and
//!   `..2024_…` entries; editors' swap and lock files (`.x.swp`, `.#x`);
//! * editor backups and temporaries: `x~`, `#x#`, `x.swp`, `x.swx`, `x.tmp`;
//! * certificates and keys (`x.crt`, `x.key`, `x.pem`): `clustermesh connect` writes the CA
//!   bundle `<peer>.etcd-client-ca.crt` next to the peer's file;
//! * anything that is not a regular file (after following links), cannot be read, or does
//!   not contain `endpoints:` (Cilium's test for a config file);
//! * the local cluster's own file (a shared folder may hold every cluster's file).
//!
//! A file that passes all that but whose name is not a valid cluster name is
//! [`refused`](Configured::refused), so the caller can say why it is not read.
//!
//! It only reads the folder; it never connects anywhere.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use clustermesh_types::cluster::ClusterName;
use tracing::debug;

/// Cilium reads a file as a remote cluster config only if it contains this.
const MARKER: &[u8] = b"endpoints:";

/// Suffixes of files that live beside the configs and are never one.
const OTHER_SUFFIXES: [&str; 7] = ["~", ".swp", ".swx", ".tmp", ".crt", ".key", ".pem"];

/// One remote cluster's config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFile {
    /// Where it is.
    pub path: PathBuf,
    /// SHA-256 of its content: a different digest means the remote must be reconnected.
    pub digest: [u8; 32],
}

/// A file that looks like a remote cluster config but cannot be one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The file.
    pub path: PathBuf,
    /// Why, and what to do about it.
    pub reason: String,
}

/// What the config folder names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Configured {
    /// Remote cluster name (= file name) → its file.
    pub remotes: BTreeMap<String, RemoteFile>,
    /// Config files that are not read, with the reason.
    pub refused: Vec<Refused>,
}

impl Configured {
    /// The remote cluster names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.remotes.keys().map(String::as_str)
    }
}

/// Whether a folder entry's name is one of the files that live beside the configs.
fn is_other_file(name: &str) -> bool {
    name.starts_with('.')
        || (name.len() > 1 && name.starts_with('#') && name.ends_with('#'))
        || OTHER_SUFFIXES.iter().any(|s| name.ends_with(s))
}

/// The remote clusters configured in `dir` for the local cluster `local`; see the module
/// docs for the rules. A folder that does not exist (yet) or cannot be read names none.
pub fn configured_remotes(dir: &Path, local: &str) -> Configured {
    let mut out = Configured::default();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(error) => {
            debug!(dir = %dir.display(), %error, "cannot read remote cluster config directory");
            return out;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
            continue;
        };
        if is_other_file(&name) || !path.is_file() {
            continue;
        }
        let Ok(content) = std::fs::read(&path) else {
            continue;
        };
        if !content.windows(MARKER.len()).any(|w| w == MARKER) || name == local {
            continue;
        }
        if let Err(error) = ClusterName::new(name.as_str()) {
            out.refused.push(Refused {
                path,
                reason: format!("{error}: the file name must be the remote's cluster name"),
            });
            continue;
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &content);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        out.remotes.insert(name, RemoteFile { path, digest: hash });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: &str = "endpoints:\n- https://198.18.2.2:2379\n";

    fn names(c: &Configured) -> Vec<&str> {
        c.names().collect()
    }

    #[test]
    fn only_config_files_named_after_a_remote_cluster_count() {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |name: &str, text: &str| std::fs::write(dir.path().join(name), text);
        put("c2", CONFIG).expect("write");
        put("c3", CONFIG).expect("write");
        // The local cluster's own file in a shared folder.
        put("c1", CONFIG).expect("write");
        // What lives beside the configs.
        for other in [
            "c2.etcd-client-ca.crt",
            ".c2.swp",
            ".#c2",
            "c2~",
            "#c2#",
            "c4.swp",
            "c4.swx",
            "c4.tmp",
            "c4.key",
            "c4.pem",
            ".hidden",
        ] {
            put(other, CONFIG).expect("write");
        }
        // Not a config (no `endpoints:`), e.g. vim's write probe `4913`.
        put("4913", "").expect("write");
        put("c5", "trusted-ca-file: /x\n").expect("write");
        // Secret mounts: `..data` is a folder, the visible names are links into it.
        std::fs::create_dir(dir.path().join("..data")).expect("mkdir");
        std::fs::write(dir.path().join("..data/c6"), CONFIG).expect("write");
        std::os::unix::fs::symlink("..data/c6", dir.path().join("c6")).expect("link");
        std::fs::create_dir(dir.path().join("c7")).expect("mkdir");
        // A config whose name cannot be a cluster name.
        put("Cluster8.yaml", CONFIG).expect("write");

        let got = configured_remotes(dir.path(), "c1");
        assert_eq!(names(&got), ["c2", "c3", "c6"]);
        assert_eq!(got.refused.len(), 1, "{:?}", got.refused);
        assert!(got.refused[0].path.ends_with("Cluster8.yaml"));
        assert!(
            got.refused[0].reason.contains("cluster name"),
            "{}",
            got.refused[0].reason
        );
        assert_eq!(got.remotes["c2"].path, dir.path().join("c2"));
    }

    #[test]
    fn a_changed_file_has_another_digest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c2");
        std::fs::write(&path, CONFIG).expect("write");
        let before = configured_remotes(dir.path(), "c1").remotes["c2"].digest;
        assert_eq!(
            configured_remotes(dir.path(), "c1").remotes["c2"].digest,
            before
        );
        std::fs::write(&path, format!("{CONFIG}# changed\n")).expect("write");
        assert_ne!(
            configured_remotes(dir.path(), "c1").remotes["c2"].digest,
            before
        );
    }

    #[test]
    fn a_missing_folder_names_no_remote() {
        let got = configured_remotes(Path::new("/nonexistent/clustermesh"), "c1");
        assert_eq!(got, Configured::default());
    }
}
