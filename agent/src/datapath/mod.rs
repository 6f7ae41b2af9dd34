//! The eBPF datapath: loads the embedded object (built from `ebpf/programs` by
//! `build.rs`), pins its maps in a per-node bpffs directory so that an agent restart keeps
//! their contents (an existing pin is reused, after checking it has this build's layout),
//! attaches the programs to interfaces, and hands out typed map handles.
//!
//! Attaching happens in the calling thread's network namespace (interface names are
//! resolved there): an agent runs inside its node's namespace; tests that play several nodes
//! attach from a thread that entered the node's namespace.
//!
//! Not yet: attachments are owned by this process (TCX link fds, dropped with the
//! [`Datapath`]), so between an agent's exit and its successor's attach the pods' traffic
//! takes the kernel stack. Pinning the links and swapping programs in place
//! (`SchedClassifier::attach_to_link`) is the next step for hitless restarts.
//!
//! What it must not do: decide what goes into the maps (that is the reconciler's job) or
//! touch interfaces other than attaching programs to them.

mod maps;

use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{MapError, MapInfo, MapType};
use aya::programs::links::LinkOrder;
use aya::programs::tc::{self, SchedClassifierLinkId, TcAttachOptions, TcAttachType};
use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions};
use aya::{Ebpf, EbpfError, EbpfLoader};
use clustermesh_ebpf_abi::{
    defaults, map, program, Counter, EndpointInfo, EndpointKey, IpcacheLpmKey, IpcacheValue,
    TraceSlot, TunnelConfig, TunnelTrace,
};

pub use maps::{CounterValues, Counters, Ipcache, LocalEndpoints, TunnelSettings, TunnelTraces};

/// The compiled programs (ELF, BTF included).
pub static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/clustermesh-datapath.o"));

/// `statfs` magic of bpffs.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Errors of the datapath module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The pin directory is not on a bpffs mount.
    #[error(
        "pin directory {} is not on a bpffs mount (mount one: mount -t bpf bpf {})",
        path.display(), path.display()
    )]
    NotBpffs {
        /// The directory.
        path: PathBuf,
    },
    /// The pin directory could not be created or inspected.
    #[error("pin directory {}", path.display())]
    PinDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A pinned map does not have the layout this build expects.
    #[error(
        "pinned map {} was created with another layout ({what}); remove it (its entries are \
         rebuilt by the agent) or run the agent version that created it",
        path.display()
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// What differs.
        what: String,
    },
    /// A pinned map could not be inspected.
    #[error("inspect pinned map {}", path.display())]
    PinInfo {
        /// The pin.
        path: PathBuf,
        /// The cause.
        #[source]
        source: MapError,
    },
    /// The object could not be loaded (verifier, map creation, pinning).
    #[error("load the eBPF object")]
    Load(#[source] Box<EbpfError>),
    /// The object lacks a map this build needs (a build mismatch).
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// A program operation failed.
    #[error("program {program}: {op}")]
    Program {
        /// The program.
        program: &'static str,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching a program to an interface failed.
    #[error("attach {program} to {ifname} ({mode:?})")]
    Attach {
        /// The program.
        program: &'static str,
        /// The interface.
        ifname: String,
        /// TCX or clsact.
        mode: AttachMode,
        /// The cause.
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error("map {map}: {op}")]
    Map {
        /// The map.
        map: &'static str,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: MapError,
    },
}

/// Result of this module.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How programs are attached to interfaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX links (kernel ≥ 6.6): owned by a file descriptor, several programs coexist.
    Tcx,
    /// A `clsact` qdisc with a netlink filter (older kernels).
    Clsact,
}

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// Ingress of a pod's host-side veth.
    FromPod,
    /// Ingress of the node's VXLAN device.
    FromOverlay,
}

impl Program {
    /// The program's symbol name.
    pub const fn name(self) -> &'static str {
        match self {
            Program::FromPod => program::FROM_POD,
            Program::FromOverlay => program::FROM_OVERLAY,
        }
    }
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct Config {
    /// bpffs directory for the map pins (`/sys/fs/bpf/clustermesh/<node>` in production).
    /// `None` keeps the maps private to this process (tests of single programs).
    pub pin_dir: Option<PathBuf>,
    /// `max_entries` of the ipcache.
    pub ipcache_max_entries: u32,
    /// `max_entries` of the local endpoints map.
    pub local_endpoints_max_entries: u32,
    /// TCX (default) or clsact; see [`crate::kernel::Report::attach_mode`].
    pub attach: AttachMode,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pin_dir: None,
            ipcache_max_entries: defaults::IPCACHE_MAX_ENTRIES,
            local_endpoints_max_entries: defaults::LOCAL_ENDPOINTS_MAX_ENTRIES,
            attach: AttachMode::Tcx,
        }
    }
}

/// Typed handles on every map.
pub struct Maps {
    /// Destination prefix → identity, tunnel endpoint.
    pub ipcache: Ipcache,
    /// Pods on this node.
    pub local_endpoints: LocalEndpoints,
    /// VXLAN device and local underlay address.
    pub tunnel: TunnelSettings,
    /// Counters of `from_pod`.
    pub from_pod_counters: Counters,
    /// Counters of `from_overlay`.
    pub from_overlay_counters: Counters,
    /// Last tunnel key per direction and CPU.
    pub traces: TunnelTraces,
}

impl Maps {
    /// The counters of `program`.
    pub fn counters(&self, program: Program) -> &Counters {
        match program {
            Program::FromPod => &self.from_pod_counters,
            Program::FromOverlay => &self.from_overlay_counters,
        }
    }
}

/// Result of one `BPF_PROG_TEST_RUN`.
#[derive(Clone, Copy, Debug)]
pub struct TestRunResult {
    /// The program's return value (`TC_ACT_*`).
    pub verdict: u32,
    /// Mean time per run as measured by the kernel.
    pub duration: Duration,
    /// Bytes written to the output buffer.
    pub data_out_len: usize,
}

/// The loaded datapath: programs (attachments live as long as this value) and maps.
pub struct Datapath {
    ebpf: Ebpf,
    attach: AttachMode,
    links: Vec<(Program, SchedClassifierLinkId)>,
    /// Typed map handles.
    pub maps: Maps,
}

/// Expected shape of every map, for checking pins made by an earlier run.
fn expected(name: &str, config: &Config) -> Option<(MapType, u32, u32, u32)> {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    Some(match name {
        map::IPCACHE => (
            MapType::LpmTrie,
            s(size_of::<IpcacheLpmKey>()),
            s(size_of::<IpcacheValue>()),
            config.ipcache_max_entries,
        ),
        map::LOCAL_ENDPOINTS => (
            MapType::Hash,
            s(size_of::<EndpointKey>()),
            s(size_of::<EndpointInfo>()),
            config.local_endpoints_max_entries,
        ),
        map::TUNNEL => (MapType::Array, 4, s(size_of::<TunnelConfig>()), 1),
        map::FROM_POD_COUNTERS | map::FROM_OVERLAY_COUNTERS => {
            (MapType::PerCpuArray, 4, 8, Counter::COUNT)
        }
        map::TUNNEL_TRACE => (
            MapType::PerCpuArray,
            4,
            s(size_of::<TunnelTrace>()),
            TraceSlot::COUNT,
        ),
        _ => return None,
    })
}

/// Checks that `dir` exists (creating it) and is on bpffs.
fn prepare_pin_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
        path: dir.into(),
        source,
    })?;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| Error::PinDir {
        path: dir.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable statfs buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(Error::PinDir {
            path: dir.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    if st.f_type as i64 != BPF_FS_MAGIC {
        return Err(Error::NotBpffs { path: dir.into() });
    }
    Ok(())
}

/// Refuses to reuse a pin whose type, key/value size or capacity differ from this build's.
fn check_pin(path: &Path, want: (MapType, u32, u32, u32)) -> Result<()> {
    let info = MapInfo::from_pin(path).map_err(|source| Error::PinInfo {
        path: path.into(),
        source,
    })?;
    let ty = info.map_type().map_err(|source| Error::PinInfo {
        path: path.into(),
        source,
    })?;
    let got = (ty, info.key_size(), info.value_size(), info.max_entries());
    if got != want {
        return Err(Error::IncompatiblePin {
            path: path.into(),
            what: format!(
                "type/key/value/max_entries {:?}/{}/{}/{}, expected {:?}/{}/{}/{}",
                got.0, got.1, got.2, got.3, want.0, want.1, want.2, want.3
            ),
        });
    }
    Ok(())
}

impl Datapath {
    /// Loads the programs (verifier) and creates, or reuses from `config.pin_dir`, the maps.
    pub fn load(config: &Config) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map::IPCACHE, config.ipcache_max_entries)
            .map_max_entries(map::LOCAL_ENDPOINTS, config.local_endpoints_max_entries);
        if let Some(dir) = &config.pin_dir {
            prepare_pin_dir(dir)?;
            for name in map::ALL {
                let path = dir.join(name);
                if path.exists() {
                    if let Some(want) = expected(name, config) {
                        check_pin(&path, want)?;
                    }
                }
                loader.map_pin_path(name, path);
            }
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for program in [Program::FromPod, Program::FromOverlay] {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|e| program_err(program, "load (verifier)", e))?;
        }
        let mut take = |name: &'static str| ebpf.take_map(name).ok_or(Error::MissingMap(name));
        let maps = Maps {
            ipcache: Ipcache::new(take(map::IPCACHE)?)?,
            local_endpoints: LocalEndpoints::new(take(map::LOCAL_ENDPOINTS)?)?,
            tunnel: TunnelSettings::new(take(map::TUNNEL)?)?,
            from_pod_counters: Counters::new(
                map::FROM_POD_COUNTERS,
                take(map::FROM_POD_COUNTERS)?,
            )?,
            from_overlay_counters: Counters::new(
                map::FROM_OVERLAY_COUNTERS,
                take(map::FROM_OVERLAY_COUNTERS)?,
            )?,
            traces: TunnelTraces::new(take(map::TUNNEL_TRACE)?)?,
        };
        Ok(Self {
            ebpf,
            attach: config.attach,
            links: Vec::new(),
            maps,
        })
    }

    /// Attaches `program` to the ingress of `ifname` (resolved in the calling thread's
    /// network namespace). The attachment lasts until [`Datapath::detach_all`] or drop.
    pub fn attach(&mut self, program: Program, ifname: &str) -> Result<()> {
        let mode = self.attach;
        let attach_err = |source| Error::Attach {
            program: program.name(),
            ifname: ifname.to_owned(),
            mode,
            source: Box::new(source),
        };
        let prog = classifier(&mut self.ebpf, program)?;
        let options = match mode {
            AttachMode::Tcx => TcAttachOptions::TcxOrder(LinkOrder::default()),
            AttachMode::Clsact => {
                // EEXIST (already there) is fine; anything else shows up in the attach.
                let _ = tc::qdisc_add_clsact(ifname);
                TcAttachOptions::Netlink(tc::NlOptions::default())
            }
        };
        let id = prog
            .attach_with_options(ifname, TcAttachType::Ingress, options)
            .map_err(attach_err)?;
        self.links.push((program, id));
        Ok(())
    }

    /// Detaches every program attached by this value.
    pub fn detach_all(&mut self) -> Result<()> {
        for (program, id) in std::mem::take(&mut self.links) {
            classifier(&mut self.ebpf, program)?
                .detach(id)
                .map_err(|e| program_err(program, "detach", e))?;
        }
        Ok(())
    }

    /// Runs `program` on `packet` with `BPF_PROG_TEST_RUN` (`repeat` times; the duration is
    /// the kernel's mean per run). The packet as the program left it is written to
    /// `data_out` if given.
    pub fn test_run(
        &mut self,
        program: Program,
        packet: &[u8],
        data_out: Option<&mut [u8]>,
        repeat: u32,
    ) -> Result<TestRunResult> {
        let prog = classifier(&mut self.ebpf, program)?;
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(packet);
        opts.data_out = data_out;
        opts.repeat = repeat.max(1);
        let r = prog
            .test_run(opts)
            .map_err(|e| program_err(program, "test run", e))?;
        Ok(TestRunResult {
            verdict: r.return_value,
            duration: r.duration,
            data_out_len: r.data_size_out as usize,
        })
    }
}

fn program_err(program: Program, op: &'static str, source: ProgramError) -> Error {
    Error::Program {
        program: program.name(),
        op,
        source: Box::new(source),
    }
}

fn classifier(ebpf: &mut Ebpf, program: Program) -> Result<&mut SchedClassifier> {
    let prog = ebpf.program_mut(program.name()).ok_or_else(|| {
        program_err(
            program,
            "find",
            ProgramError::UnexpectedProgramType, // not in the object: a build mismatch
        )
    })?;
    prog.try_into().map_err(|e| program_err(program, "find", e))
}
