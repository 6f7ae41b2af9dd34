//! Typed handles on the datapath maps. Each owns its map's file descriptor, so handles can
//! be moved to whatever task reconciles that map, independently of the programs.

use std::net::{Ipv4Addr, Ipv6Addr};

use std::os::fd::AsFd as _;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray};
use clustermesh_ebpf_abi::{
    map, tunnel_flags, Counter, EndpointInfo, EndpointKey, IpcacheKey, IpcacheLpmKey, IpcacheValue,
    TraceSlot, TunnelConfig, TunnelTrace,
};

use super::batch;
use super::{Error, Result};

/// One ipcache element as the kernel stores it.
pub type IpcacheEntry = (IpcacheLpmKey, IpcacheValue);

/// Elements per batch syscall: bounds the time the kernel holds the trie's lock-free
/// readers waiting on one call and the memory of one request.
const BATCH: usize = 16 * 1024;

fn batch_err(map: &'static str, op: &'static str, e: batch::Partial) -> Error {
    Error::Map {
        map,
        op,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_batch",
            io_error: e.error,
        }),
    }
}

fn map_err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { map, op, source }
}

/// `true` for the "no such key" errors a delete of an absent key returns.
fn is_not_found(error: &MapError) -> bool {
    matches!(error, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// The ipcache LPM trie (Cilium's `cilium_ipcache_v2` layout): prefix → identity, tunnel
/// endpoint, flags.
pub struct Ipcache {
    map: LpmTrie<MapData, IpcacheKey, IpcacheValue>,
    /// `false` once the kernel refused a batch call for this map: single-element calls.
    batch: bool,
}

impl Ipcache {
    pub(super) fn new(map: aya::maps::Map) -> Result<Self> {
        let map = LpmTrie::try_from(map).map_err(map_err(map::IPCACHE, "open"))?;
        Ok(Self { map, batch: true })
    }

    /// The map's file descriptor (for raw syscalls such as benchmarks' baselines).
    pub fn fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.map.map().fd().as_fd()
    }

    /// `true` while batched syscalls are used (the kernel supports them for LPM tries).
    pub fn batched(&self) -> bool {
        self.batch
    }

    /// Inserts or replaces every `(key, value)`, in batches of up to 16k elements per
    /// syscall (falling back to one syscall per element on kernels without batch support
    /// for LPM tries).
    pub fn update_batch(&mut self, keys: &[IpcacheLpmKey], values: &[IpcacheValue]) -> Result<()> {
        match self.update_some(keys, values) {
            (_, None) => Ok(()),
            (_, Some(e)) => Err(e),
        }
    }

    /// [`Self::update_batch`] that says how far it got: the kernel applies elements in
    /// order and stops at the first it refuses, so `(n, Some(error))` means `keys[..n]` are
    /// in the map, `keys[n]` was refused with `error` and the rest were not tried.
    pub fn update_some(
        &mut self,
        keys: &[IpcacheLpmKey],
        values: &[IpcacheValue],
    ) -> (usize, Option<Error>) {
        assert_eq!(keys.len(), values.len(), "one value per key");
        let mut done = 0;
        for (k, v) in keys.chunks(BATCH).zip(values.chunks(BATCH)) {
            if self.batch {
                let fd = self.map.map().fd().as_fd();
                match batch::update(fd, k, v) {
                    Ok(()) => {
                        done += k.len();
                        continue;
                    }
                    Err(e) if e.unsupported() => {
                        tracing::info!(error = %e.error, "kernel refuses batched LPM updates: one syscall per element");
                        self.batch = false;
                    }
                    Err(e) => {
                        let n = e.done;
                        return (done + n, Some(batch_err(map::IPCACHE, "update batch", e)));
                    }
                }
            }
            for (key, value) in k.iter().zip(v) {
                let key = Key::new(key.prefixlen, key.key);
                if let Err(e) = self.map.insert(&key, value, 0) {
                    return (done, Some(map_err(map::IPCACHE, "update")(e)));
                }
                done += 1;
            }
        }
        (done, None)
    }

    /// Deletes every key (batched like [`Self::update_batch`]); keys that are not in the
    /// map are skipped. Returns how many were deleted.
    pub fn delete_batch(&mut self, keys: &[IpcacheLpmKey]) -> Result<usize> {
        let mut deleted = 0;
        let mut rest = keys;
        while !rest.is_empty() {
            let chunk = &rest[..rest.len().min(BATCH)];
            if self.batch {
                let fd = self.map.map().fd().as_fd();
                match batch::delete(fd, chunk) {
                    Ok(()) => {
                        deleted += chunk.len();
                        rest = &rest[chunk.len()..];
                        continue;
                    }
                    Err(e) if e.error.raw_os_error() == Some(libc::ENOENT) => {
                        // Skip the missing key and go on after it.
                        deleted += e.done;
                        rest = &rest[e.done + 1..];
                        continue;
                    }
                    Err(e) if e.unsupported() => self.batch = false,
                    Err(e) => return Err(batch_err(map::IPCACHE, "delete batch", e)),
                }
            }
            for key in chunk {
                match self.map.remove(&Key::new(key.prefixlen, key.key)) {
                    Ok(()) => deleted += 1,
                    Err(e) if is_not_found(&e) => {}
                    Err(e) => return Err(map_err(map::IPCACHE, "delete")(e)),
                }
            }
            rest = &rest[chunk.len()..];
        }
        Ok(deleted)
    }

    /// Every element (walks the trie; for start-up adoption and status): batched lookups,
    /// a few syscalls per 16k elements instead of two per element, unless the kernel
    /// refuses them.
    pub fn entries(&self) -> Result<Vec<IpcacheEntry>> {
        if self.batch {
            let fd = self.map.map().fd().as_fd();
            let mut keys = vec![IpcacheLpmKey::default(); BATCH];
            let mut values = vec![IpcacheValue::default(); BATCH];
            let mut cursor = None;
            let mut out = Vec::new();
            loop {
                match batch::lookup(fd, &mut cursor, &mut keys, &mut values) {
                    Ok((n, end)) => {
                        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
                        if end {
                            return Ok(out);
                        }
                    }
                    Err(e) if e.unsupported() && out.is_empty() => break,
                    Err(e) => return Err(batch_err(map::IPCACHE, "lookup batch", e)),
                }
            }
        }
        let mut out = Vec::new();
        for key in self.map.keys() {
            let key = key.map_err(map_err(map::IPCACHE, "iterate"))?;
            match self.map.get(&key, 0) {
                Ok(v) => out.push((
                    IpcacheLpmKey {
                        prefixlen: key.prefix_len(),
                        key: key.data(),
                    },
                    v,
                )),
                // Deleted between the key walk and the lookup.
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err(map::IPCACHE, "lookup")(e)),
            }
        }
        Ok(out)
    }

    /// Inserts or replaces the entry for `addr/prefix_bits` (IPv4).
    pub fn upsert_v4(
        &mut self,
        addr: Ipv4Addr,
        prefix_bits: u8,
        value: IpcacheValue,
    ) -> Result<()> {
        let key = Key::new(
            IpcacheKey::prefixlen(u32::from(prefix_bits.min(32))),
            IpcacheKey::v4(addr.octets()),
        );
        self.map
            .insert(&key, value, 0)
            .map_err(map_err(map::IPCACHE, "update"))
    }

    /// Inserts or replaces the entry for `addr/prefix_bits` (IPv6; Cilium's key with
    /// family 2, prefixlen 32 + `prefix_bits`).
    pub fn upsert_v6(
        &mut self,
        addr: Ipv6Addr,
        prefix_bits: u8,
        value: IpcacheValue,
    ) -> Result<()> {
        let key = Key::new(
            IpcacheKey::prefixlen(u32::from(prefix_bits.min(128))),
            IpcacheKey::v6(addr.octets()),
        );
        self.map
            .insert(&key, value, 0)
            .map_err(map_err(map::IPCACHE, "update"))
    }

    /// Removes the entry for `addr/prefix_bits`; `Ok(false)` if there was none.
    pub fn remove_v4(&mut self, addr: Ipv4Addr, prefix_bits: u8) -> Result<bool> {
        let key = Key::new(
            IpcacheKey::prefixlen(u32::from(prefix_bits.min(32))),
            IpcacheKey::v4(addr.octets()),
        );
        match self.map.remove(&key) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(map::IPCACHE, "delete")(e)),
        }
    }

    /// The entry stored for exactly `addr/prefix_bits` (not a longest-prefix match).
    pub fn get_v4(&self, addr: Ipv4Addr, prefix_bits: u8) -> Result<Option<IpcacheValue>> {
        let key = Key::new(
            IpcacheKey::prefixlen(u32::from(prefix_bits.min(32))),
            IpcacheKey::v4(addr.octets()),
        );
        match self.map.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::IPCACHE, "lookup")(e)),
        }
    }

    /// The entry stored for exactly `addr/prefix_bits` (IPv6; not a longest-prefix match).
    pub fn get_v6(&self, addr: Ipv6Addr, prefix_bits: u8) -> Result<Option<IpcacheValue>> {
        let key = Key::new(
            IpcacheKey::prefixlen(u32::from(prefix_bits.min(128))),
            IpcacheKey::v6(addr.octets()),
        );
        match self.map.get(&key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::IPCACHE, "lookup")(e)),
        }
    }

    /// Number of entries (walks the trie; for status, not for hot paths).
    pub fn len(&self) -> usize {
        self.map.keys().filter(Result::is_ok).count()
    }

    /// `true` if the trie holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Pods on this node: pod IP → host-side veth, identity, MACs.
pub struct LocalEndpoints {
    map: HashMap<MapData, EndpointKey, EndpointInfo>,
}

impl LocalEndpoints {
    pub(super) fn new(map: aya::maps::Map) -> Result<Self> {
        let map = HashMap::try_from(map).map_err(map_err(map::LOCAL_ENDPOINTS, "open"))?;
        Ok(Self { map })
    }

    /// Inserts or replaces the endpoint for an IPv4 pod address.
    pub fn upsert_v4(&mut self, addr: Ipv4Addr, info: EndpointInfo) -> Result<()> {
        self.map
            .insert(EndpointKey::v4(addr.octets()), info, 0)
            .map_err(map_err(map::LOCAL_ENDPOINTS, "update"))
    }

    /// Inserts or replaces the endpoint for an IPv6 pod address.
    pub fn upsert_v6(&mut self, addr: Ipv6Addr, info: EndpointInfo) -> Result<()> {
        self.map
            .insert(EndpointKey::v6(addr.octets()), info, 0)
            .map_err(map_err(map::LOCAL_ENDPOINTS, "update"))
    }

    /// Removes the endpoint; `Ok(false)` if there was none.
    pub fn remove_v4(&mut self, addr: Ipv4Addr) -> Result<bool> {
        match self.map.remove(&EndpointKey::v4(addr.octets())) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(map::LOCAL_ENDPOINTS, "delete")(e)),
        }
    }

    /// Removes the endpoint of an IPv6 pod address; `Ok(false)` if there was none.
    pub fn remove_v6(&mut self, addr: Ipv6Addr) -> Result<bool> {
        match self.map.remove(&EndpointKey::v6(addr.octets())) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_err(map::LOCAL_ENDPOINTS, "delete")(e)),
        }
    }

    /// The endpoint stored for an IPv6 pod address.
    pub fn get_v6(&self, addr: Ipv6Addr) -> Result<Option<EndpointInfo>> {
        match self.map.get(&EndpointKey::v6(addr.octets()), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LOCAL_ENDPOINTS, "lookup")(e)),
        }
    }

    /// The endpoint stored for an IPv4 pod address.
    pub fn get_v4(&self, addr: Ipv4Addr) -> Result<Option<EndpointInfo>> {
        match self.map.get(&EndpointKey::v4(addr.octets()), 0) {
            Ok(v) => Ok(Some(v)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_err(map::LOCAL_ENDPOINTS, "lookup")(e)),
        }
    }

    /// Every stored endpoint.
    pub fn entries(&self) -> Result<Vec<(EndpointKey, EndpointInfo)>> {
        self.map
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err(map::LOCAL_ENDPOINTS, "iterate"))
    }
}

/// The node-wide tunnel settings (one entry).
pub struct TunnelSettings {
    map: Array<MapData, TunnelConfig>,
}

impl TunnelSettings {
    pub(super) fn new(map: aya::maps::Map) -> Result<Self> {
        let map = Array::try_from(map).map_err(map_err(map::TUNNEL, "open"))?;
        Ok(Self { map })
    }

    /// Enables tunnelling through the VXLAN device `vxlan_ifindex` from underlay address
    /// `local`; `vxlan_port` is the device's UDP port, which `from_underlay` decapsulates
    /// (0: it decapsulates nothing and every tunnelled packet goes through the device).
    pub fn set(&mut self, vxlan_ifindex: u32, local: Ipv4Addr, vxlan_port: u16) -> Result<()> {
        self.set_dual(vxlan_ifindex, Some(local), None, vxlan_port)
    }

    /// [`TunnelSettings::set`] for a node with an underlay address of either family or
    /// both: ipcache entries whose tunnel endpoint is one of them are this node's, and
    /// `from_underlay` decapsulates datagrams to either.
    pub fn set_dual(
        &mut self,
        vxlan_ifindex: u32,
        local_v4: Option<Ipv4Addr>,
        local_v6: Option<Ipv6Addr>,
        vxlan_port: u16,
    ) -> Result<()> {
        let cfg = TunnelConfig {
            vxlan_ifindex,
            local_ipv4: local_v4.map_or([0; 4], |a| a.octets()),
            flags: tunnel_flags::ENABLED,
            vxlan_port: vxlan_port.to_be_bytes(),
            pad: 0,
            local_ipv6: local_v6.map_or([0; 16], |a| a.octets()),
            underlay_ifindex: 0,
            tx_port: [0; 2],
            pad2: 0,
        };
        self.map
            .set(0, cfg, 0)
            .map_err(map_err(map::TUNNEL, "update"))
    }

    /// Transmit in BPF (`Some((underlay ifindex, VXLAN port))`: `from_pod` encapsulates
    /// VXLAN over IPv4 itself, to that UDP port, and redirects to that interface) or through
    /// the VXLAN device (`None`). Keeps the other settings; call after
    /// [`TunnelSettings::set_dual`].
    pub fn set_bpf_tx(&mut self, tx: Option<(u32, u16)>) -> Result<()> {
        let mut cfg = self.get()?;
        match tx {
            Some((ifindex, port)) => {
                cfg.flags |= tunnel_flags::BPF_TX;
                cfg.underlay_ifindex = ifindex;
                cfg.tx_port = port.to_be_bytes();
            }
            None => {
                cfg.flags &= !tunnel_flags::BPF_TX;
                cfg.underlay_ifindex = 0;
                cfg.tx_port = [0; 2];
            }
        }
        self.map
            .set(0, cfg, 0)
            .map_err(map_err(map::TUNNEL, "update"))
    }

    /// Disables tunnelling: traffic for other nodes goes to the kernel stack.
    pub fn clear(&mut self) -> Result<()> {
        self.map
            .set(0, TunnelConfig::default(), 0)
            .map_err(map_err(map::TUNNEL, "update"))
    }

    /// The current settings.
    pub fn get(&self) -> Result<TunnelConfig> {
        self.map.get(&0, 0).map_err(map_err(map::TUNNEL, "lookup"))
    }
}

/// One program's counters, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterValues(pub [u64; Counter::COUNT as usize]);

impl CounterValues {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// `self - earlier`, per counter (saturating).
    pub fn since(&self, earlier: &CounterValues) -> CounterValues {
        let mut out = [0; Counter::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            *v = self.0[i].saturating_sub(earlier.0[i]);
        }
        CounterValues(out)
    }

    /// `(name, value)` for every non-zero counter.
    pub fn non_zero(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (c.name(), self.get(*c)))
            .filter(|(_, v)| *v != 0)
            .collect()
    }
}

/// A per-program per-CPU counters map.
pub struct Counters {
    name: &'static str,
    map: PerCpuArray<MapData, u64>,
}

impl Counters {
    pub(super) fn new(name: &'static str, map: aya::maps::Map) -> Result<Self> {
        let map = PerCpuArray::try_from(map).map_err(map_err(name, "open"))?;
        Ok(Self { name, map })
    }

    /// Reads every counter, summed over CPUs.
    pub fn read(&self) -> Result<CounterValues> {
        let mut out = [0u64; Counter::COUNT as usize];
        for (i, v) in out.iter_mut().enumerate() {
            let per_cpu = self
                .map
                .get(&(i as u32), 0)
                .map_err(map_err(self.name, "lookup"))?;
            *v = per_cpu.iter().sum();
        }
        Ok(CounterValues(out))
    }
}

/// The last tunnel key per direction and CPU.
pub struct TunnelTraces {
    map: PerCpuArray<MapData, TunnelTrace>,
}

impl TunnelTraces {
    pub(super) fn new(map: aya::maps::Map) -> Result<Self> {
        let map = PerCpuArray::try_from(map).map_err(map_err(map::TUNNEL_TRACE, "open"))?;
        Ok(Self { map })
    }

    /// The traces of every CPU that recorded at least one packet in `slot`.
    pub fn read(&self, slot: TraceSlot) -> Result<Vec<TunnelTrace>> {
        let per_cpu = self
            .map
            .get(&(slot as u32), 0)
            .map_err(map_err(map::TUNNEL_TRACE, "lookup"))?;
        Ok(per_cpu.iter().copied().filter(|t| t.packets != 0).collect())
    }
}
