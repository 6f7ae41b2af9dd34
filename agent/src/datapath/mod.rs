//! The eBPF datapath: loads the embedded object (built from `ebpf/programs` by
//! `build.rs`), pins its maps in a per-node bpffs directory so that an agent restart keeps
//! their contents (an existing pin is reused, after checking it has this build's layout),
//! attaches the programs to interfaces, and hands out typed map handles.
//!
//! Attaching happens in the calling thread's network namespace (interface names are
//! resolved there): an agent runs inside its node's namespace; tests that play several nodes
//! attach from a thread that entered the node's namespace.
//!
//! **Hitless restarts.** With a pin directory and TCX, every attachment is a TCX link pinned
//! at `<pin_dir>/links/<program>@<ifname>`. The link outlives the agent (dropping a
//! [`Datapath`] closes only its fds), so packets keep flowing through the old program while
//! no agent runs; the next agent opens the pin and swaps its freshly loaded program into the
//! link with `BPF_LINK_UPDATE` (`SchedClassifier::attach_to_link`), an atomic replacement
//! with no window in which the hook is empty. A pin whose device went away (`ENOLINK`) is
//! replaced by a new link. [`Datapath::detach`] and [`cleanup`] remove pins; nothing else
//! does. The clsact path (kernels < 6.6) keeps filters owned by the process: restarts there
//! are not hitless.
//!
//! The agent's start-up sequence over it (load, attach `from_overlay` and `from_underlay`,
//! the tunnel settings) is [`bring_up`].
//!
//! What it must not do: decide what goes into the maps beyond the tunnel settings (that is
//! the reconciler's job) or touch interfaces other than attaching programs to them — with
//! one exception, [`vxlan_dev`], which creates the VXLAN device when the node has none.

pub mod batch;
mod bringup;
mod maps;
pub mod vxlan_dev;

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aya::maps::{MapData, MapError, MapInfo, MapType, ProgramArray};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{
    self, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcAttachType,
};
use aya::programs::{ProgramError, SchedClassifier, TestRun as _, TestRunOptions};
use aya::{Ebpf, EbpfError, EbpfLoader};
use clustermesh_ebpf_abi::{
    defaults, map, policy_map, program, Counter, EndpointInfo, EndpointKey, IpcacheLpmKey,
    IpcacheValue, PolicyCt6Key, PolicyCtKey, PolicyCtValue, TraceSlot, TunnelConfig, TunnelTrace,
};

pub use bringup::{bring_up, BringUp, Transmit, UnderlayDev, Up};
pub use maps::{
    CounterValues, Counters, Ipcache, IpcacheEntry, LocalEndpoints, TunnelSettings, TunnelTraces,
};

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
    /// The interface does not exist (in the calling thread's network namespace).
    #[error("no interface {ifname}")]
    NoInterface {
        /// The interface.
        ifname: String,
    },
    /// A link pin could not be created or removed.
    #[error("link pin {}: {op}", path.display())]
    LinkPin {
        /// The pin.
        path: PathBuf,
        /// What was attempted.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
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

impl Error {
    /// `true` when a map refused an element for lack of room (`E2BIG`, `ENOSPC`: the map is
    /// at `max_entries`; `ENOMEM`: the kernel could not allocate the element). Such a write
    /// can succeed later, once entries were deleted or memory freed: callers keep it and
    /// retry instead of dropping it.
    pub fn is_capacity(&self) -> bool {
        match self {
            Error::Map {
                source: MapError::SyscallError(e),
                ..
            } => matches!(
                e.io_error.raw_os_error(),
                Some(libc::E2BIG | libc::ENOSPC | libc::ENOMEM)
            ),
            _ => false,
        }
    }
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Program {
    /// Ingress of a pod's host-side veth.
    FromPod,
    /// Ingress of the node's VXLAN device.
    FromOverlay,
    /// Ingress of the node's underlay device (VXLAN decapsulation for local pods).
    FromUnderlay,
}

impl Program {
    /// Every program in the object.
    pub const ALL: [Program; 3] = [
        Program::FromPod,
        Program::FromOverlay,
        Program::FromUnderlay,
    ];

    /// The program's symbol name.
    pub const fn name(self) -> &'static str {
        match self {
            Program::FromPod => program::FROM_POD,
            Program::FromOverlay => program::FROM_OVERLAY,
            Program::FromUnderlay => program::FROM_UNDERLAY,
        }
    }

    /// The program with symbol name `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }
}

/// What [`Datapath::attach`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new attachment (nothing was there, or the pin was stale).
    Created,
    /// The program in an existing pinned link (a previous agent's) was swapped atomically.
    Replaced,
    /// This value had already attached the same program to the same interface.
    Unchanged,
}

/// How one attachment is held.
enum Held {
    /// A pinned TCX link: it outlives this process; the fd is kept for [`Datapath::detach`].
    Pinned { _link: FdLink, pin: PathBuf },
    /// Owned by the program (no pin directory, or clsact): detached on drop.
    Owned(SchedClassifierLinkId),
}

struct Attachment {
    program: Program,
    ifindex: u32,
    held: Held,
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
    /// Counters of `from_underlay`.
    pub from_underlay_counters: Counters,
    /// Last tunnel key per direction and CPU.
    pub traces: TunnelTraces,
}

impl Maps {
    /// The counters of `program`.
    pub fn counters(&self, program: Program) -> &Counters {
        match program {
            Program::FromPod => &self.from_pod_counters,
            Program::FromOverlay => &self.from_overlay_counters,
            Program::FromUnderlay => &self.from_underlay_counters,
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
    link_dir: Option<PathBuf>,
    links: BTreeMap<String, Attachment>,
    /// Held only so that the kernel keeps the prog array's entries (see `load_v6_halves`).
    _v6_progs: ProgramArray<MapData>,
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
        map::FROM_POD_COUNTERS | map::FROM_OVERLAY_COUNTERS | map::FROM_UNDERLAY_COUNTERS => {
            (MapType::PerCpuArray, 4, 8, Counter::COUNT)
        }
        map::TUNNEL_TRACE => (
            MapType::PerCpuArray,
            4,
            s(size_of::<TunnelTrace>()),
            TraceSlot::COUNT,
        ),
        map::POLICY_CT => (
            MapType::LruHash,
            s(size_of::<PolicyCtKey>()),
            s(size_of::<PolicyCtValue>()),
            policy_map::CT_MAX_ENTRIES,
        ),
        map::POLICY_CT6 => (
            MapType::LruHash,
            s(size_of::<PolicyCt6Key>()),
            s(size_of::<PolicyCtValue>()),
            policy_map::CT6_MAX_ENTRIES,
        ),
        map::V6_PROGS => (MapType::ProgramArray, 4, 4, program::V6_SLOTS),
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
        let link_dir = config.pin_dir.as_ref().map(|d| d.join(LINKS_DIR));
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
        if let Some(dir) = &link_dir {
            std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let mut ebpf = loader.load(OBJECT).map_err(|e| Error::Load(Box::new(e)))?;
        for program in Program::ALL {
            classifier(&mut ebpf, program)?
                .load()
                .map_err(|e| program_err(program, "load (verifier)", e))?;
        }
        let v6_progs = load_v6_halves(&mut ebpf)?;
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
            from_underlay_counters: Counters::new(
                map::FROM_UNDERLAY_COUNTERS,
                take(map::FROM_UNDERLAY_COUNTERS)?,
            )?,
            traces: TunnelTraces::new(take(map::TUNNEL_TRACE)?)?,
        };
        Ok(Self {
            ebpf,
            attach: config.attach,
            link_dir,
            links: BTreeMap::new(),
            _v6_progs: v6_progs,
            maps,
        })
    }

    /// Takes a map this module keeps no typed handle for (the policy and flow maps, whose
    /// handles live in `crate::policy::maps` and `crate::flows`); `None` if the object lacks
    /// it or it was taken already.
    pub fn take_map(&mut self, name: &str) -> Option<aya::maps::Map> {
        self.ebpf.take_map(name)
    }

    /// How programs are attached.
    pub fn attach_mode(&self) -> AttachMode {
        self.attach
    }

    /// Link pins left in the pin directory (by this or an earlier agent):
    /// `(program, interface name)`.
    pub fn pinned_links(&self) -> Vec<(Program, String)> {
        let Some(dir) = &self.link_dir else {
            return Vec::new();
        };
        let Ok(rd) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        rd.filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            let (prog, ifname) = name.split_once('@')?;
            Some((Program::from_name(prog)?, ifname.to_owned()))
        })
        .collect()
    }

    /// Interfaces this value attached a program to: `(interface, program, ifindex)`.
    pub fn attachments(&self) -> Vec<(String, Program, u32)> {
        self.links
            .iter()
            .map(|(n, a)| (n.clone(), a.program, a.ifindex))
            .collect()
    }

    /// Attaches `program` to the ingress of `ifname` (resolved in the calling thread's
    /// network namespace). With a pin directory and TCX the attachment is a pinned link
    /// that outlives this value (see the module docs) and a link pinned by an earlier agent
    /// is taken over atomically; otherwise it lasts until [`Datapath::detach_all`] or drop.
    /// Attaching again after the interface was recreated (new ifindex) replaces the old
    /// attachment.
    pub fn attach(&mut self, program: Program, ifname: &str) -> Result<Attached> {
        let ifindex = ifindex_of(ifname).ok_or_else(|| Error::NoInterface {
            ifname: ifname.to_owned(),
        })?;
        if let Some(a) = self.links.get(ifname) {
            if a.program == program && a.ifindex == ifindex {
                return Ok(Attached::Unchanged);
            }
            self.detach(ifname)?;
        }
        let mode = self.attach;
        let attach_err = |source| Error::Attach {
            program: program.name(),
            ifname: ifname.to_owned(),
            mode,
            source: Box::new(source),
        };
        let prog = classifier(&mut self.ebpf, program)?;
        let (held, how) = match (mode, &self.link_dir) {
            (AttachMode::Tcx, Some(dir)) => {
                let pin = dir.join(format!("{}@{ifname}", program.name()));
                let reused = if pin.exists() {
                    match take_over(prog, &pin) {
                        Ok(id) => Some(id),
                        Err(error) => {
                            // The device behind the old link is gone (ENOLINK) or the pin is
                            // not a TCX link: start over with a new link.
                            tracing::debug!(pin = %pin.display(), %error, "stale link pin replaced");
                            remove_pin(&pin)?;
                            None
                        }
                    }
                } else {
                    None
                };
                let (id, how) = match reused {
                    Some(id) => (id, Attached::Replaced),
                    None => (
                        prog.attach_with_options(
                            ifname,
                            TcAttachType::Ingress,
                            TcAttachOptions::TcxOrder(LinkOrder::default()),
                        )
                        .map_err(attach_err)?,
                        Attached::Created,
                    ),
                };
                let link: FdLink = prog.take_link(id).map_err(attach_err)?.try_into().map_err(
                    |e: aya::programs::links::LinkError| Error::LinkPin {
                        path: pin.clone(),
                        op: "take the TCX link",
                        source: std::io::Error::other(e),
                    },
                )?;
                let link = if how == Attached::Created {
                    let pinned = link.pin(&pin).map_err(|e| Error::LinkPin {
                        path: pin.clone(),
                        op: "pin",
                        source: std::io::Error::other(e),
                    })?;
                    FdLink::from(pinned)
                } else {
                    link
                };
                (Held::Pinned { _link: link, pin }, how)
            }
            _ => {
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
                (Held::Owned(id), Attached::Created)
            }
        };
        self.links.insert(
            ifname.to_owned(),
            Attachment {
                program,
                ifindex,
                held,
            },
        );
        Ok(how)
    }

    /// Detaches whatever this value attached to `ifname` and removes its pin; `Ok(false)` if
    /// nothing was attached.
    pub fn detach(&mut self, ifname: &str) -> Result<bool> {
        let Some(a) = self.links.remove(ifname) else {
            return Ok(false);
        };
        match a.held {
            // Removing the pin and closing the last fd releases the link, which detaches it.
            Held::Pinned { pin, .. } => remove_pin(&pin)?,
            Held::Owned(id) => classifier(&mut self.ebpf, a.program)?
                .detach(id)
                .map_err(|e| program_err(a.program, "detach", e))?,
        }
        Ok(true)
    }

    /// Removes the pin of a link an earlier agent left for `program` on `ifname` (the
    /// interface is gone or no longer a pod's); the link is detached with it unless this
    /// value holds it.
    pub fn forget_pin(&mut self, program: Program, ifname: &str) -> Result<()> {
        if self.links.contains_key(ifname) {
            return self.detach(ifname).map(|_| ());
        }
        if let Some(dir) = &self.link_dir {
            remove_pin(&dir.join(format!("{}@{ifname}", program.name())))?;
        }
        Ok(())
    }

    /// Detaches every program attached by this value (removing their pins).
    pub fn detach_all(&mut self) -> Result<()> {
        let names: Vec<String> = self.links.keys().cloned().collect();
        for name in names {
            self.detach(&name)?;
        }
        Ok(())
    }

    /// Runs `program` on `packet` with `BPF_PROG_TEST_RUN` (`repeat` times; the duration is
    /// the kernel's mean per run). The packet as the program left it is written to
    /// `data_out` if given. The kernel repeats on one skb: a program that changes the
    /// packet's length (`from_underlay` decapsulating) sees its own output from the second
    /// run on, so measure such a program with [`Datapath::test_run_fresh`].
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

    /// `runs` single runs of `program`, each on a fresh copy of `packet`. The duration is
    /// the mean of the kernel's per-run times (each includes the kernel's clock reads, a
    /// few tens of ns more than `test_run`'s mean over repeats); the verdict is the runs'
    /// common one (an error if they differ).
    pub fn test_run_fresh(
        &mut self,
        program: Program,
        packet: &[u8],
        runs: u32,
    ) -> Result<TestRunResult> {
        let mut total = Duration::ZERO;
        let mut first: Option<TestRunResult> = None;
        for _ in 0..runs.max(1) {
            let r = self.test_run(program, packet, None, 1)?;
            total += r.duration;
            match first {
                None => first = Some(r),
                Some(f) if f.verdict != r.verdict => {
                    return Err(program_err(
                        program,
                        "test run",
                        ProgramError::IOError(std::io::Error::other(format!(
                            "verdict changed between runs on the same packet: {} then {}",
                            f.verdict, r.verdict
                        ))),
                    ))
                }
                Some(_) => {}
            }
        }
        let first = first.expect("at least one run");
        Ok(TestRunResult {
            duration: total / runs.max(1),
            ..first
        })
    }
}

/// Subdirectory of the pin directory holding link pins.
pub const LINKS_DIR: &str = "links";

/// Swaps `prog` into the TCX link pinned at `pin`.
fn take_over(
    prog: &mut SchedClassifier,
    pin: &Path,
) -> std::result::Result<SchedClassifierLinkId, String> {
    let pinned = PinnedLink::from_pin(pin).map_err(|e| e.to_string())?;
    // `From<PinnedLink>` keeps the pin file; only the fd changes hands.
    let link = SchedClassifierLink::try_from(FdLink::from(pinned)).map_err(|e| e.to_string())?;
    prog.attach_to_link(link).map_err(|e| format!("{e:?}"))
}

fn remove_pin(pin: &Path) -> Result<()> {
    match std::fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::LinkPin {
            path: pin.into(),
            op: "remove",
            source,
        }),
    }
}

/// The index of `ifname` in the calling thread's network namespace.
pub fn ifindex_of(ifname: &str) -> Option<u32> {
    let c = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: `c` is NUL-terminated and outlives the call.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

/// Removes every pin in `pin_dir` (links first, which detaches the programs unless a
/// running agent still holds them, then the maps) and the directory itself. For `lab down`
/// and uninstall; an agent never calls it on shutdown. Returns the number of pins removed.
pub fn cleanup(pin_dir: &Path) -> Result<usize> {
    let mut removed = 0;
    let io = |path: &Path, source| Error::PinDir {
        path: path.into(),
        source,
    };
    let links = pin_dir.join(LINKS_DIR);
    for dir in [&links, pin_dir] {
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(dir, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| io(dir, e))?;
            let path = entry.path();
            if path.is_dir() {
                continue;
            }
            remove_pin(&path)?;
            removed += 1;
        }
    }
    for dir in [&links, pin_dir] {
        match std::fs::remove_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(dir, e)),
        }
    }
    Ok(removed)
}

fn program_err(program: Program, op: &'static str, source: ProgramError) -> Error {
    Error::Program {
        program: program.name(),
        op,
        source: Box::new(source),
    }
}

/// Loads the IPv6 halves (`program::V6`) and puts them into `CM_V6_PROGS`, from where the
/// attached programs tail-call them. The kernel empties a prog array as soon as no file
/// descriptor and no pin refers to it (the programs' own reference does not count): the
/// returned handle is kept in [`Datapath`] for that reason, and with a pin directory the
/// array is pinned with the other maps, so the pinned links keep their IPv6 halves after
/// the agent exits. Without a pin directory IPv6 goes to the stack once the agent is gone
/// (`ipv6_unavailable`).
fn load_v6_halves(ebpf: &mut Ebpf) -> Result<ProgramArray<MapData>> {
    for (_, name) in program::V6 {
        let prog: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or(ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(|e| v6_err(name, "find", e))?;
        prog.load()
            .map_err(|e| v6_err(name, "load (verifier)", e))?;
    }
    let mut array = ProgramArray::try_from(
        ebpf.take_map(map::V6_PROGS)
            .ok_or(Error::MissingMap(map::V6_PROGS))?,
    )
    .map_err(|source| Error::Map {
        map: map::V6_PROGS,
        op: "open",
        source,
    })?;
    for (slot, name) in program::V6 {
        let prog: &SchedClassifier = ebpf
            .program(name)
            .ok_or(ProgramError::UnexpectedProgramType)
            .and_then(|p| p.try_into())
            .map_err(|e| v6_err(name, "find", e))?;
        let fd = prog.fd().map_err(|e| v6_err(name, "fd", e))?;
        array.set(slot, fd, 0).map_err(|source| Error::Map {
            map: map::V6_PROGS,
            op: "update",
            source,
        })?;
    }
    Ok(array)
}

fn v6_err(name: &'static str, op: &'static str, source: ProgramError) -> Error {
    Error::Program {
        program: name,
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
