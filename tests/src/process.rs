//! Our binaries as child processes in tests: locating them, free loopback ports, a tiny
//! HTTP GET for their health endpoints, a process's CPU time, and a `TestApiserver` wrapper.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// Finds one of the workspace's binaries: `$CLUSTERMESH_BIN_DIR/<name>`, else next to the
/// running test executable (`target/<profile>/deps/..`).
pub fn find_binary(name: &str) -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CLUSTERMESH_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    let exe = std::env::current_exe().context("locating the test executable")?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(3)
        .map(|d| d.join(name))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().with_context(|| {
        format!("{name} not found (looked at {candidates:?}); run `cargo build --workspace --bins` first")
    })
}

/// CPU time (user + system) of process `pid` and all its threads, from `/proc/<pid>/stat`;
/// `None` once the process is gone.
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks_to_duration(ticks))
}

/// `ticks` clock ticks (`_SC_CLK_TCK`, the unit of `/proc`'s CPU times) as a duration.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    // SAFETY: sysconf has no preconditions.
    #[allow(unsafe_code)]
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_secs_f64(ticks as f64 / hz as f64)
}

/// A free loopback TCP port (bind to 0, then release).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// GET over plain HTTP/1.1 on loopback; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
                break;
            };
            if n == 0 || tail.len() < n {
                break;
            }
            out.push_str(&tail[..n]);
            rest = tail[n..].trim_start_matches("\r\n");
        }
        out
    } else {
        body.to_string()
    };
    Ok((code, body))
}

/// A running `clustermesh-apiserver`.
pub struct TestApiserver {
    child: Option<Child>,
    args: Vec<String>,
    /// /readyz, /status, /metrics.
    pub health: SocketAddr,
    /// Its log file.
    pub log: PathBuf,
}

impl TestApiserver {
    /// Starts the apiserver with `args` plus a free `--health-addr`, logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> anyhow::Result<Self> {
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()));
        Self::start_at(args, health, log)
    }

    /// Like [`Self::start`] with a given `--health-addr` (e.g. the one in the config file
    /// that `clustermesh status` reads).
    pub fn start_at(args: &[&str], health: SocketAddr, log: &Path) -> anyhow::Result<Self> {
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push("--health-addr".into());
        args.push(health.to_string());
        let mut me = Self {
            child: None,
            args,
            health,
            log: log.to_path_buf(),
        };
        me.spawn()?;
        Ok(me)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = find_binary("clustermesh-apiserver")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(bin)
            .args(&self.args)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Whether `/readyz` answers 200.
    pub fn ready(&self) -> bool {
        matches!(http_get(self.health, "/readyz"), Ok((200, _)))
    }

    /// Waits until ready, or fails with the log tail.
    pub fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<Duration> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if self.ready() {
                return Ok(t.elapsed());
            }
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    bail!("apiserver exited with {status}:\n{}", self.log_tail(30));
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!(
            "apiserver not ready after {timeout:?}:\n{}",
            self.log_tail(30)
        )
    }

    /// `/status` as JSON.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let (code, body) = http_get(self.health, "/status")?;
        if code != 200 {
            bail!("/status answered {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// `/metrics` text.
    pub fn metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(self.health, "/metrics")?.1)
    }

    /// PID.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait (kill after 10 s).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(10) {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill()?;
        c.wait()?;
        bail!("apiserver ignored SIGTERM for 10 s:\n{}", self.log_tail(30))
    }

    /// SIGKILL, as an OOM kill does, and reap it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// Starts it again with the same arguments.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop()?;
        self.spawn()
    }

    /// The last lines of its log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

impl Drop for TestApiserver {
    fn drop(&mut self) {
        // SIGTERM first: a SIGKILLed apiserver leaves its embedded etcd running.
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(5) {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
