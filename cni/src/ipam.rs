//! Address allocations of one network on one node: a JSON file under the agent's state
//! directory (`<stateDir>/cni/<network>.json`), read and rewritten under an exclusive
//! `flock` on `<network>.lock`, so concurrent plugin runs (a runtime starts many pods at
//! once) never hand out one address twice. Writes go to a temporary file that is renamed
//! over the old one: a crash leaves the old or the new state, never half of one.
//!
//! An allocation is recorded *before* its interfaces are created and removed only after
//! they are gone, so whatever a crash leaves behind is named in the file and a later DEL
//! or GC removes it.
//!
//! It must not touch interfaces.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::spec::Cidr;

/// What went wrong with the allocation file.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be created, locked, read or written.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file holds something that is not an allocation list.
    #[error("{} is not a clustermesh-cni allocation file ({detail}); move it away to start afresh (every pod of this node will need DEL and ADD again)", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The decoder's message.
        detail: String,
    },
    /// Every address of the range is in use.
    #[error("no free address in {cidr} from {start} on: {used} in use; delete unused pods or give the node a larger pod CIDR")]
    Exhausted {
        /// The pod CIDR.
        cidr: Cidr,
        /// Where allocation starts.
        start: Ipv4Addr,
        /// Addresses in use.
        used: usize,
    },
}

/// `Result` of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One pod interface's address and host-side veth.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    /// `CNI_CONTAINERID`.
    #[serde(rename = "containerID")]
    pub container_id: String,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// The pod's address.
    pub ip: Ipv4Addr,
    /// The host-side veth.
    pub host_if: String,
    /// `CNI_NETNS` at ADD.
    pub netns: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct File_ {
    allocations: Vec<Allocation>,
}

/// The allocations of one network, locked for as long as this value lives.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    allocations: Vec<Allocation>,
    _lock: Flock<File>,
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

impl Store {
    /// Locks and reads the allocations of `network` under `state_dir` (created if missing).
    pub fn open(state_dir: &Path, network: &str) -> Result<Self> {
        let dir = state_dir.join("cni");
        std::fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let lock_path = dir.join(format!("{network}.lock"));
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io("opening", &lock_path))?;
        let lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, e)| io("locking", &lock_path)(e.into()))?;
        let path = dir.join(format!("{network}.json"));
        let allocations = match std::fs::read(&path) {
            Ok(b) => {
                serde_json::from_slice::<File_>(&b)
                    .map_err(|e| Error::Corrupt {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?
                    .allocations
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("reading", &path)(e)),
        };
        Ok(Self {
            path,
            allocations,
            _lock: lock,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every allocation.
    pub fn allocations(&self) -> &[Allocation] {
        &self.allocations
    }

    /// The allocation of `container_id`/`ifname`.
    pub fn get(&self, container_id: &str, ifname: &str) -> Option<&Allocation> {
        self.allocations
            .iter()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
    }

    /// The first free address of `cidr` from `start` on (wrapping to the range's start).
    pub fn free_address(&self, cidr: Cidr, start: Ipv4Addr) -> Result<Ipv4Addr> {
        let used: BTreeSet<u32> = self.allocations.iter().map(|a| u32::from(a.ip)).collect();
        let (first, last) = cidr.hosts();
        let start = u32::from(start).clamp(first, last);
        (start..=last)
            .chain(first..start)
            .find(|ip| !used.contains(ip))
            .map(Ipv4Addr::from)
            .ok_or(Error::Exhausted {
                cidr,
                start: Ipv4Addr::from(start),
                used: used.len(),
            })
    }

    /// Records `a` (replacing an allocation of the same container and interface).
    pub fn insert(&mut self, a: Allocation) {
        self.remove(&a.container_id.clone(), &a.ifname.clone());
        self.allocations.push(a);
    }

    /// Forgets the allocation of `container_id`/`ifname`; returns it.
    pub fn remove(&mut self, container_id: &str, ifname: &str) -> Option<Allocation> {
        let i = self
            .allocations
            .iter()
            .position(|a| a.container_id == container_id && a.ifname == ifname)?;
        Some(self.allocations.remove(i))
    }

    /// Writes the allocations (temporary file, fsync, rename).
    pub fn save(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let mut tmp =
            tempfile::NamedTempFile::new_in(dir).map_err(io("creating a file in", dir))?;
        let body = serde_json::to_vec_pretty(&File_ {
            allocations: self.allocations.clone(),
        })
        .map_err(|e| io("encoding", &self.path)(e.into()))?;
        tmp.write_all(&body).map_err(io("writing", &self.path))?;
        tmp.as_file()
            .sync_all()
            .map_err(io("syncing", &self.path))?;
        tmp.persist(&self.path)
            .map_err(|e| io("replacing", &self.path)(e.error))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, ip: Ipv4Addr) -> Allocation {
        Allocation {
            container_id: id.into(),
            ifname: "eth0".into(),
            ip,
            host_if: format!("lxc{id}"),
            netns: "/x".into(),
        }
    }

    #[test]
    fn addresses_are_handed_out_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cidr = Cidr::parse("10.9.0.0/30").expect("cidr");
        {
            let mut s = Store::open(dir.path(), "n").expect("open");
            let a = s
                .free_address(cidr, Ipv4Addr::new(10, 9, 0, 1))
                .expect("free");
            assert_eq!(a, Ipv4Addr::new(10, 9, 0, 1));
            s.insert(alloc("a", a));
            let b = s
                .free_address(cidr, Ipv4Addr::new(10, 9, 0, 1))
                .expect("free");
            assert_eq!(b, Ipv4Addr::new(10, 9, 0, 2));
            s.insert(alloc("b", b));
            s.save().expect("save");
        }
        let mut s = Store::open(dir.path(), "n").expect("reopen");
        assert_eq!(s.allocations().len(), 2);
        let e = s
            .free_address(cidr, Ipv4Addr::new(10, 9, 0, 1))
            .unwrap_err();
        assert!(
            e.to_string().contains("no free address in 10.9.0.0/30"),
            "{e}"
        );
        assert!(s.remove("a", "eth0").is_some());
        assert_eq!(
            s.free_address(cidr, Ipv4Addr::new(10, 9, 0, 2))
                .expect("free"),
            Ipv4Addr::new(10, 9, 0, 1),
            "wraps around to the freed address"
        );
    }

    #[test]
    fn a_corrupt_file_is_refused_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("cni")).expect("mkdir");
        let f = dir.path().join("cni/n.json");
        std::fs::write(&f, b"{not json").expect("write");
        let e = Store::open(dir.path(), "n").unwrap_err();
        assert!(
            e.to_string()
                .contains("is not a clustermesh-cni allocation file"),
            "{e}"
        );
        assert_eq!(std::fs::read(&f).expect("read"), b"{not json");
    }
}
