//! The host's one route into the lab underlay ([`plan::UNDERLAY`] via a lab's root veth)
//! is checked and added by `lab up` and removed with its veth by `lab down`. This module
//! makes each of those one step across processes: an exclusive `flock` on [`PATH`], so two
//! `lab up` at once cannot both see the route free and both try to add it (the second's
//! `ip route add` failed with "File exists" and its whole `lab up` with it).
//!
//! It must not be held longer than those steps: a lab that is up holds nothing, and a
//! second lab finds the route taken and works from its router namespace. It also names the
//! lab behind a route ([`route_owner`]) for the messages of `up`.

use std::fs::File;
use std::io::{Read as _, Seek as _, Write as _};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use super::{netns, plan};

/// The lock file (tmpfs: gone at reboot, as every lab is).
pub const PATH: &str = "/run/clustermesh/lab-underlay-route.lock";

/// How long `up`/`down` wait for another lab's check-and-add or removal (each takes
/// milliseconds; longer means that process hangs).
const WAIT: Duration = Duration::from_secs(30);

/// The lock, held until dropped (the kernel drops it with the process, too).
#[derive(Debug)]
pub struct RouteLock {
    _file: File,
}

/// Takes the lock for lab `lab`, waiting up to 30 s for another lab's step to end.
pub fn take(lab: &str) -> anyhow::Result<RouteLock> {
    take_at(Path::new(PATH), lab, WAIT)
}

/// [`take`] on the lock file `path`, waiting up to `wait`; the error names the lab that
/// holds it (recorded in the file by [`take_at`]).
pub(crate) fn take_at(path: &Path, lab: &str, wait: Duration) -> anyhow::Result<RouteLock> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating {} (`lab` runs as root)", dir.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening the underlay route lock {}", path.display()))?;
    let t = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => break,
            Err(std::fs::TryLockError::WouldBlock) if t.elapsed() < wait => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                bail!(
                    "lab {lab}: {} is held for more than {wait:?} by {}: its `lab up` or `lab down` hangs while it checks, adds or removes the host's route to {}; wait for it or stop that process, then retry",
                    path.display(),
                    if holder.trim().is_empty() { "another process".to_owned() } else { holder.trim().to_owned() },
                    plan::UNDERLAY
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
    }
    // For whoever waits next: who holds it.
    file.set_len(0)?;
    file.rewind()?;
    write!(file, "lab {lab} (pid {})", std::process::id())?;
    Ok(RouteLock { _file: file })
}

/// The device and, when it is a lab's root veth (`cm-<id>`), the lab behind the root
/// namespace's route into [`plan::UNDERLAY`] (`ip -j route show root …`'s output);
/// `None` when there is no such route.
pub fn route_owner(routes_json: &str) -> Option<String> {
    let routes: serde_json::Value = serde_json::from_str(routes_json.trim()).ok()?;
    let route = routes.as_array()?.first()?;
    let dev = route["dev"].as_str().unwrap_or("?");
    Some(match dev.strip_prefix("cm-") {
        Some(id) if !id.contains('-') => format!("{dev} (lab {id})"),
        _ => dev.to_owned(),
    })
}

/// The root namespace's route into the underlay: its owner per [`route_owner`], `None` if
/// free. `root`: routes inside the prefix (`match` would also return the default route).
pub fn underlay_route() -> anyhow::Result<Option<String>> {
    let out = netns::ip(&["-j", "route", "show", "root", plan::UNDERLAY])?;
    let trimmed = out.trim();
    if trimmed.is_empty() || trimmed == "[]" {
        return Ok(None);
    }
    Ok(Some(
        route_owner(trimmed).unwrap_or_else(|| trimmed.to_owned()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While one lab holds the lock, another waits and then fails naming the holder; once
    /// the first lets go, the other gets it.
    #[test]
    fn a_second_lab_waits_then_names_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sub").join("route.lock");
        let first = take_at(&path, "aaaa", Duration::from_millis(100)).expect("first");
        let t = Instant::now();
        let err = take_at(&path, "bbbb", Duration::from_millis(300)).expect_err("second");
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        let msg = format!("{err:#}");
        assert!(
            msg.contains("lab bbbb:")
                && msg.contains(&format!("lab aaaa (pid {})", std::process::id())),
            "{msg}"
        );
        drop(first);
        let _second = take_at(&path, "bbbb", Duration::from_millis(100)).expect("after release");
    }

    #[test]
    fn the_route_owner_is_the_lab_of_the_root_veth() {
        let json = r#"[{"dst":"198.18.0.0/15","gateway":"198.18.0.1","dev":"cm-k3x9","flags":["onlink"]}]"#;
        assert_eq!(route_owner(json).as_deref(), Some("cm-k3x9 (lab k3x9)"));
        let other = r#"[{"dst":"198.18.0.0/15","dev":"eth7","flags":[]}]"#;
        assert_eq!(route_owner(other).as_deref(), Some("eth7"));
        assert_eq!(route_owner("[]"), None);
    }
}
