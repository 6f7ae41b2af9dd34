//! Start-up check: can this kernel run the datapath? Probes the `bpf()` syscall, kernel BTF,
//! the kernel version (minimum, and TCX vs clsact), VXLAN, and bpffs (mounting it when it is
//! missing, as Cilium's install walkthrough had to by hand). Every problem found is reported
//! at once, each naming what is missing and how to fix it.
//!
//! It must not change anything but the bpffs mount.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::datapath::AttachMode;

/// Oldest kernel the datapath runs on (`bpf_redirect_peer` arrived in 5.10).
pub const MIN_KERNEL: Version = Version {
    major: 5,
    minor: 10,
    patch: 0,
};
/// First kernel with TCX links; older ones attach through a clsact qdisc.
pub const TCX_KERNEL: Version = Version {
    major: 6,
    minor: 6,
    patch: 0,
};

const BTF_VMLINUX: &str = "/sys/kernel/btf/vmlinux";
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// A kernel version (`major.minor.patch` from `uname -r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Patch (0 if absent).
    pub patch: u32,
}

impl Version {
    /// Parses the leading `a.b[.c]` of a release string such as `6.18.0-1-amd64`.
    pub fn parse(release: &str) -> Option<Self> {
        let mut parts = release.split(|c: char| !c.is_ascii_digit());
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        Some(Self {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One thing the kernel or the system lacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// `uname -r` is not a version.
    UnknownVersion {
        /// The release string.
        release: String,
    },
    /// Kernel older than [`MIN_KERNEL`].
    TooOld {
        /// The running version.
        version: Version,
    },
    /// `bpf()` failed.
    BpfSyscall {
        /// The errno.
        errno: i32,
    },
    /// No `/sys/kernel/btf/vmlinux`.
    NoBtf,
    /// No VXLAN driver loaded, built in, or installed as a module.
    NoVxlan,
    /// bpffs missing and could not be mounted.
    Bpffs {
        /// Where it should be.
        path: PathBuf,
        /// Why mounting failed.
        error: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::UnknownVersion { release } => {
                write!(
                    f,
                    "cannot parse the kernel version from uname release {release:?}"
                )
            }
            Problem::TooOld { version } => write!(
                f,
                "kernel {version} is too old: the datapath needs ≥ {MIN_KERNEL} \
                 (bpf_redirect_peer), and ≥ {TCX_KERNEL} for TCX attachment; upgrade the \
                 kernel (Cilium's install walkthrough needed an upgrade too)"
            ),
            Problem::BpfSyscall { errno } => {
                let hint = match *errno {
                    libc::EPERM | libc::EACCES => {
                        "run the agent as root (or with CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN)"
                    }
                    libc::ENOSYS => "the kernel is built without CONFIG_BPF_SYSCALL",
                    _ => {
                        "check that the kernel has CONFIG_BPF_SYSCALL and that no LSM blocks bpf()"
                    }
                };
                write!(
                    f,
                    "the bpf() syscall is not usable ({}): {hint}",
                    std::io::Error::from_raw_os_error(*errno)
                )
            }
            Problem::NoBtf => write!(
                f,
                "kernel BTF is missing ({BTF_VMLINUX}): use a kernel built with \
                 CONFIG_DEBUG_INFO_BTF=y"
            ),
            Problem::NoVxlan => write!(
                f,
                "VXLAN is not available (no vxlan module loaded, built in or installed): \
                 `modprobe vxlan`, or install the kernel's modules package / a kernel with \
                 CONFIG_VXLAN"
            ),
            Problem::Bpffs { path, error } => write!(
                f,
                "bpffs is not mounted at {} and mounting it failed ({error}): \
                 mount -t bpf bpf {}",
                path.display(),
                path.display()
            ),
        }
    }
}

/// The check failed.
#[derive(Debug, thiserror::Error)]
#[error("this kernel cannot run the clustermesh datapath:{}", list(.problems))]
pub struct Error {
    /// Everything that is missing.
    pub problems: Vec<Problem>,
}

fn list(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("\n  - {p}")).collect()
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What the check found on a kernel that passes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `uname -r`.
    pub release: String,
    /// Parsed version.
    pub version: Version,
    /// How programs will be attached.
    pub attach_mode: AttachMode,
    /// The bpffs directory.
    pub bpffs: PathBuf,
    /// `true` if this check mounted it.
    pub mounted_bpffs: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "kernel {} ok: bpf() usable, BTF present, VXLAN available, attach via {:?}, \
             bpffs at {}{}",
            self.release,
            self.attach_mode,
            self.bpffs.display(),
            if self.mounted_bpffs {
                " (mounted now)"
            } else {
                ""
            }
        )
    }
}

/// What was observed, separated from the verdict so the verdict can be tested with any
/// kernel's facts.
#[derive(Debug, Clone)]
pub struct Facts {
    /// `uname -r`.
    pub release: String,
    /// `Err(errno)` if creating a tiny BPF map failed.
    pub bpf: std::result::Result<(), i32>,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
    /// vxlan loaded, built in, or installable.
    pub vxlan: bool,
    /// bpffs directory and: `Ok(true)` mounted by the probe, `Ok(false)` already mounted,
    /// `Err` why mounting failed.
    pub bpffs: (PathBuf, std::result::Result<bool, String>),
}

/// Probes this machine (mounting bpffs at `bpffs` if it is not mounted) and judges it.
pub fn check(bpffs: &Path) -> Result<Report> {
    evaluate(Facts::probe(bpffs))
}

/// The verdict on `facts`.
pub fn evaluate(facts: Facts) -> Result<Report> {
    let mut problems = Vec::new();
    let version = Version::parse(&facts.release);
    match version {
        None => problems.push(Problem::UnknownVersion {
            release: facts.release.clone(),
        }),
        Some(v) if v < MIN_KERNEL => problems.push(Problem::TooOld { version: v }),
        Some(_) => {}
    }
    if let Err(errno) = facts.bpf {
        problems.push(Problem::BpfSyscall { errno });
    }
    if !facts.btf {
        problems.push(Problem::NoBtf);
    }
    if !facts.vxlan {
        problems.push(Problem::NoVxlan);
    }
    let (path, mounted) = facts.bpffs;
    let mounted_bpffs = match mounted {
        Ok(m) => m,
        Err(error) => {
            problems.push(Problem::Bpffs {
                path: path.clone(),
                error,
            });
            false
        }
    };
    match version {
        Some(version) if problems.is_empty() => Ok(Report {
            release: facts.release,
            version,
            attach_mode: if version >= TCX_KERNEL {
                AttachMode::Tcx
            } else {
                AttachMode::Clsact
            },
            bpffs: path,
            mounted_bpffs,
        }),
        _ => Err(Error { problems }),
    }
}

impl Facts {
    /// Observes this machine.
    pub fn probe(bpffs: &Path) -> Self {
        let release = uname_release();
        Self {
            bpf: probe_bpf(),
            btf: Path::new(BTF_VMLINUX).exists(),
            vxlan: probe_vxlan(&release),
            bpffs: (bpffs.to_path_buf(), ensure_bpffs(bpffs)),
            release,
        }
    }
}

fn uname_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Creates (and closes) a one-entry array map.
fn probe_bpf() -> std::result::Result<(), i32> {
    // union bpf_attr for BPF_MAP_CREATE starts with map_type, key_size, value_size,
    // max_entries (u32 each); the rest stays zero.
    let mut attr = [0u32; 16];
    attr[0] = 2; // BPF_MAP_TYPE_ARRAY
    attr[1] = 4;
    attr[2] = 4;
    attr[3] = 1;
    // SAFETY: `attr` is a readable buffer of the size passed; BPF_MAP_CREATE (0) only reads
    // it and returns a new file descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL));
    }
    // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
    unsafe { libc::close(fd as i32) };
    Ok(())
}

fn probe_vxlan(release: &str) -> bool {
    if Path::new("/sys/module/vxlan").exists() {
        return true;
    }
    let dir = Path::new("/lib/modules").join(release);
    ["modules.dep", "modules.builtin"].iter().any(|f| {
        std::fs::read_to_string(dir.join(f))
            .map(|s| s.lines().any(|l| l.contains("/vxlan.ko")))
            .unwrap_or(false)
    })
}

/// `true` if `path` is on a bpffs mount.
pub fn is_bpffs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt as _;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: zeroed statfs is a valid out-buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated, `st` writable.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let magic = st.f_type as i64;
    rc == 0 && magic == BPF_FS_MAGIC
}

/// Mounts bpffs at `path` unless it is there already; `Ok(true)` if it mounted it.
pub fn ensure_bpffs(path: &Path) -> std::result::Result<bool, String> {
    use std::os::unix::ffi::OsStrExt as _;
    // Create first: a directory inside an existing bpffs mount is bpffs already and must not
    // get a private mount of its own (under `ip netns exec` that mount would live only in
    // the agent's mount namespace, and the pins would die with the agent).
    std::fs::create_dir_all(path).map_err(|e| format!("create {}: {e}", path.display()))?;
    if is_bpffs(path) {
        return Ok(false);
    }
    let target = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: all strings are NUL-terminated and outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Facts {
        Facts {
            release: "6.18.0-1-amd64".into(),
            bpf: Ok(()),
            btf: true,
            vxlan: true,
            bpffs: ("/sys/fs/bpf".into(), Ok(false)),
        }
    }

    #[test]
    fn parses_versions() {
        assert_eq!(
            Version::parse("6.18.0-1-amd64"),
            Some(Version {
                major: 6,
                minor: 18,
                patch: 0
            })
        );
        assert_eq!(
            Version::parse("5.4.0-42-generic"),
            Some(Version {
                major: 5,
                minor: 4,
                patch: 0
            })
        );
        assert_eq!(
            Version::parse("6.6"),
            Some(Version {
                major: 6,
                minor: 6,
                patch: 0
            })
        );
        assert_eq!(
            Version::parse("6.1.55+"),
            Some(Version {
                major: 6,
                minor: 1,
                patch: 55
            })
        );
        assert_eq!(Version::parse("garbage"), None);
    }

    #[test]
    fn current_kernel_uses_tcx() {
        let r = evaluate(good()).expect("passes");
        assert_eq!(r.attach_mode, AttachMode::Tcx);
    }

    #[test]
    fn kernel_between_5_10_and_6_6_uses_clsact() {
        let r = evaluate(Facts {
            release: "6.1.0-13-amd64".into(),
            ..good()
        })
        .expect("passes");
        assert_eq!(r.attach_mode, AttachMode::Clsact);
    }

    #[test]
    fn old_kernel_is_refused_with_upgrade_hint() {
        let e = evaluate(Facts {
            release: "5.4.0-42-generic".into(),
            ..good()
        })
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("kernel 5.4.0 is too old"), "{msg}");
        assert!(msg.contains("≥ 6.6.0 for TCX"), "{msg}");
    }

    #[test]
    fn every_problem_is_listed_with_its_fix() {
        let e = evaluate(Facts {
            release: "6.18.0".into(),
            bpf: Err(libc::EPERM),
            btf: false,
            vxlan: false,
            bpffs: ("/sys/fs/bpf".into(), Err("Operation not permitted".into())),
        })
        .unwrap_err();
        assert_eq!(e.problems.len(), 4);
        let msg = e.to_string();
        assert!(msg.contains("run the agent as root"), "{msg}");
        assert!(msg.contains("CONFIG_DEBUG_INFO_BTF=y"), "{msg}");
        assert!(msg.contains("modprobe vxlan"), "{msg}");
        assert!(msg.contains("mount -t bpf bpf /sys/fs/bpf"), "{msg}");
    }

    #[test]
    fn this_machine_passes() {
        // Needs root and the kernel features the datapath needs (the CI machine has them).
        let dir = tempfile::tempdir().expect("tempdir");
        let bpffs = dir.path().join("bpf");
        let report = check(&bpffs);
        if is_bpffs(&bpffs) {
            // SAFETY: unmounting a path this test mounted.
            let c = std::ffi::CString::new(bpffs.to_str().expect("utf-8")).expect("no NUL");
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let report = report.expect("this machine runs the datapath");
        assert!(
            report.mounted_bpffs,
            "a fresh directory is not bpffs until mounted"
        );
    }
}
