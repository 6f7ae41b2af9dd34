//! Raw batched map lookups, updates and deletes (`BPF_MAP_LOOKUP_BATCH`,
//! `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`, kernel ≥ 5.6): one syscall for many
//! elements. aya 0.14 has no batch API, so this is the
//! one place the agent builds a `bpf_attr` itself.
//!
//! The kernel applies elements in order and stops at the first failure, reporting how many
//! it applied in `count`; callers get that number back with the error so they can skip or
//! retry the failing element.

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd};

use aya::Pod;

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}
const _: () = assert!(std::mem::size_of::<BatchAttr>() == 56);

/// A failed batch: how many elements were applied before `error`.
#[derive(Debug)]
pub struct Partial {
    /// Elements applied (the element at this index failed).
    pub done: usize,
    /// The kernel's error.
    pub error: io::Error,
}

impl Partial {
    /// The kernel cannot batch this map type (or at all): use single-element calls.
    pub fn unsupported(&self) -> bool {
        matches!(
            self.error.raw_os_error(),
            Some(libc::EINVAL | libc::ENOTSUP | 524 /* ENOTSUPP */)
        ) && self.done == 0
    }
}

fn call(cmd: libc::c_long, attr: &mut BatchAttr) -> Result<(), Partial> {
    let requested = attr.count;
    // SAFETY: `attr` is a properly laid out `bpf_attr.batch` whose `keys`/`values` point to
    // `count` elements of the map's key/value size that the caller keeps alive and
    // unaliased for the duration of the call, and whose `in_batch`/`out_batch` (lookups
    // only) point to one key each; the kernel reads the inputs and writes only
    // `attr.count` and, for lookups, the `keys`/`values` arrays and `*out_batch`.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    if rc < 0 {
        let error = io::Error::last_os_error();
        // The generic batch ops stop before the last element when one fails, and report how
        // far they got; `count` still equal to the request means the kernel refused the call
        // before starting (no batch support, bad flags): nothing was done.
        let done = if attr.count == requested {
            0
        } else {
            attr.count as usize
        };
        return Err(Partial { done, error });
    }
    Ok(())
}

/// Inserts or replaces `keys[i] → values[i]` for every `i` (flags `BPF_ANY`).
///
/// `K` and `V` must be exactly the map's key and value types.
pub fn update<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), Partial> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    call(BPF_MAP_UPDATE_BATCH, &mut attr)
}

/// Deletes every key in `keys`. A missing key fails with `ENOENT` at its index.
pub fn delete<K: Pod>(map: BorrowedFd<'_>, keys: &[K]) -> Result<(), Partial> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    call(BPF_MAP_DELETE_BATCH, &mut attr)
}

/// Reads up to `keys.len()` elements into `keys`/`values`, continuing after `cursor`
/// (`None`: from the first element) and advancing it. Returns how many were read and
/// whether the walk reached the end (the kernel's `ENOENT`). The kernel walks the map with
/// its `get_next_key`, so the order and the effect of concurrent changes are those of a
/// key-by-key walk.
///
/// `K` and `V` must be exactly the map's key and value types.
pub fn lookup<K: Pod, V: Pod>(
    map: BorrowedFd<'_>,
    cursor: &mut Option<K>,
    keys: &mut [K],
    values: &mut [V],
) -> Result<(usize, bool), Partial> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok((0, false));
    }
    let mut next = cursor.or_else(|| keys.first().copied());
    let mut attr = BatchAttr {
        in_batch: cursor.as_ref().map_or(0, |k| k as *const K as u64),
        out_batch: next.as_mut().map_or(0, |k| k as *mut K as u64),
        keys: keys.as_mut_ptr() as u64,
        values: values.as_mut_ptr() as u64,
        count: u32::try_from(keys.len()).unwrap_or(u32::MAX),
        map_fd: map.as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    let end = match call(BPF_MAP_LOOKUP_BATCH, &mut attr) {
        Ok(()) => false,
        Err(e) if e.error.raw_os_error() == Some(libc::ENOENT) => true,
        Err(e) => return Err(e),
    };
    let n = (attr.count as usize).min(keys.len());
    if n > 0 {
        *cursor = next;
    }
    // A successful call fills the buffer; an empty one could only repeat itself.
    Ok((n, end || n == 0))
}
