//! Helpers shared by the test suites that build network namespaces (`agent_e2e`,
//! `datapath_netns`, `vxlan_device`).
#![allow(unsafe_code)] // setns has no safe std wrapper; SAFETY note below.
#![allow(dead_code)] // each suite uses the helpers it needs.

use std::process::Command;

use anyhow::{bail, ensure, Context as _, Result};

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("spawn {args:?}"))?;
    if !out.status.success() {
        bail!(
            "{args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `f` on a thread inside network namespace `ns` (a file under /run/netns).
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let path = format!("/run/netns/{ns}");
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            use std::os::fd::AsRawFd as _;
            // SAFETY: a valid namespace fd; CLONE_NEWNET only moves this thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            ensure!(rc == 0, "setns {ns}: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}
