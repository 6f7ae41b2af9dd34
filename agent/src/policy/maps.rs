//! Typed handles on the policy maps (`CM_POLICY`, `CM_POLICY_MODE`, `CM_POLICY_CNT`) and
//! the writer that applies an [`Engine`](super::Engine)'s [`Changes`].

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use clustermesh_ebpf_abi::{policy_map, PolicyCounter, PolicyKey, PolicyMatch, PolicyValue};

use super::{Changes, Direction, Entry};
use crate::datapath::{self, Datapath};

/// The policy maps of one loaded datapath.
pub struct PolicyMaps {
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    mode: HashMap<MapData, u32, u32>,
    counters: PerCpuArray<MapData, u64>,
}

fn err(map: &'static str, op: &'static str) -> impl FnOnce(MapError) -> datapath::Error {
    move |source| datapath::Error::Map { map, op, source }
}

fn not_found(e: &MapError) -> bool {
    matches!(e, MapError::KeyNotFound | MapError::ElementNotFound)
        || matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::ENOENT))
}

/// The map key of an engine entry.
pub fn key(e: &Entry) -> PolicyKey {
    PolicyKey {
        subject: e.subject,
        peer: e.peer,
        dport: e.port.to_be(),
        proto: e.proto,
        direction: e.direction as u8,
    }
}

/// Verdict counters summed over CPUs: `[direction][PolicyMatch]`, replies of tracked
/// connections, flow events emitted and lost.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdicts {
    /// `[Direction as usize][PolicyMatch as usize]` packets.
    pub by_match: [[u64; PolicyMatch::COUNT as usize]; 2],
    /// Flow events written to the ring buffer.
    pub flows_emitted: u64,
    /// Flow events lost (ring buffer full).
    pub flows_lost: u64,
    /// Packets policy would have denied that passed as replies of a tracked connection
    /// (`CM_POLICY_CT`); not in `by_match`.
    pub ct_replies: u64,
}

impl Verdicts {
    /// Packets denied in `d`.
    pub fn denied(&self, d: Direction) -> u64 {
        self.by_match[d as usize][PolicyMatch::Denied as usize]
    }
}

impl PolicyMaps {
    /// Takes the policy maps out of `dp`.
    pub fn take(dp: &mut Datapath) -> datapath::Result<Self> {
        let mut take =
            |name: &'static str| dp.take_map(name).ok_or(datapath::Error::MissingMap(name));
        Ok(Self {
            policy: HashMap::try_from(take(policy_map::POLICY)?)
                .map_err(err(policy_map::POLICY, "open"))?,
            mode: HashMap::try_from(take(policy_map::POLICY_MODE)?)
                .map_err(err(policy_map::POLICY_MODE, "open"))?,
            counters: PerCpuArray::try_from(take(policy_map::POLICY_COUNTERS)?)
                .map_err(err(policy_map::POLICY_COUNTERS, "open"))?,
        })
    }

    /// Applies a diff: allow entries first, then enforcement switches on (so an identity
    /// never becomes default-deny before its allow entries exist), deletes last.
    pub fn apply(&mut self, c: &Changes) -> datapath::Result<()> {
        for e in &c.upsert {
            self.policy
                .insert(key(e), PolicyValue::default(), 0)
                .map_err(err(policy_map::POLICY, "update"))?;
        }
        for (subject, flags) in &c.enforce {
            if *flags == 0 {
                match self.mode.remove(subject) {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(err(policy_map::POLICY_MODE, "delete")(e)),
                }
            } else {
                self.mode
                    .insert(subject, flags, 0)
                    .map_err(err(policy_map::POLICY_MODE, "update"))?;
            }
        }
        for e in &c.delete {
            match self.policy.remove(&key(e)) {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(err(policy_map::POLICY, "delete")(e)),
            }
        }
        Ok(())
    }

    /// Entries in the policy map (walks it; for status and tests).
    pub fn len(&self) -> usize {
        self.policy.keys().filter(Result::is_ok).count()
    }

    /// `true` if the policy map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the verdict and flow counters.
    pub fn verdicts(&self) -> datapath::Result<Verdicts> {
        let read = |i: u32| -> datapath::Result<u64> {
            Ok(self
                .counters
                .get(&i, 0)
                .map_err(err(policy_map::POLICY_COUNTERS, "lookup"))?
                .iter()
                .sum())
        };
        let mut v = Verdicts::default();
        for d in 0..2u32 {
            for m in 0..PolicyMatch::COUNT {
                v.by_match[d as usize][m as usize] = read(d * PolicyMatch::COUNT + m)?;
            }
        }
        v.flows_emitted = read(PolicyCounter::FlowsEmitted as u32)?;
        v.flows_lost = read(PolicyCounter::FlowsLost as u32)?;
        v.ct_replies = read(PolicyCounter::CtReply as u32)?;
        Ok(v)
    }
}
