//! A real headless Chromium for the UI's acceptance test, driven over W3C WebDriver by
//! Debian's `chromedriver` (packages `chromium` and `chromium-driver`; nothing is downloaded
//! at run time).
//!
//! WebDriver is plain JSON over HTTP/1.1 on loopback, so the client is the few lines below
//! on a `TcpStream` rather than a browser-automation crate. Chromium runs with a fresh
//! profile and the flags that keep it off the network (no background networking, component
//! updates, sync or QUIC). Dropping the [`Browser`] ends the session and stops chromedriver
//! (and with it Chromium), whatever the test's outcome.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use base64::Engine as _;
use serde_json::{json, Value};

use crate::process::free_port;

/// The W3C key of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Chromium's flags (as root, headless, off the network; see the machine notes).
const CHROMIUM_ARGS: &[&str] = &[
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
];

fn which(name: &str, fallback: &str) -> Result<PathBuf> {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .or_else(|| Some(PathBuf::from(fallback)).filter(|p| p.is_file()));
    found.with_context(|| {
        format!("{name} not found: `apt-get install -y chromium chromium-driver` (scripts/install-deps.sh does)")
    })
}

/// A chromedriver with one Chromium session.
pub struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
    /// chromedriver's log.
    pub log: PathBuf,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width`×`height`.
    pub fn start(width: u32, height: u32) -> Result<Self> {
        let chromium = which("chromium", "/usr/bin/chromium")?;
        let driver_bin = which("chromedriver", "/usr/bin/chromedriver")?;
        let profile = tempfile::Builder::new().prefix("cm-chromium").tempdir()?;
        let log = profile.path().join("chromedriver.log");
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Its own process group, so that Drop can stop it and the browser it started.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", driver_bin.display()))?;
        let mut b = Self {
            driver,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            session: String::new(),
            _profile: profile,
            log,
        };
        let t = Instant::now();
        loop {
            if let Ok(v) = b.request("GET", "/status", None) {
                if v["ready"] == true {
                    break;
                }
            }
            ensure!(
                t.elapsed() < Duration::from_secs(15),
                "chromedriver did not answer on {} within 15 s (log {})",
                b.addr,
                b.log.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut args: Vec<String> = CHROMIUM_ARGS.iter().map(|s| s.to_string()).collect();
        args.push(format!("--window-size={width},{height}"));
        args.push(format!(
            "--user-data-dir={}",
            b._profile.path().join("profile").display()
        ));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": chromium, "args": args},
        }}});
        let v = b.request("POST", "/session", Some(&caps))?;
        b.session = v["sessionId"]
            .as_str()
            .with_context(|| format!("no session in {v}"))?
            .to_owned();
        Ok(b)
    }

    /// One WebDriver call: the answer's `value`, or an error naming the call.
    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut s = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )?;
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status)?;
        let code: u16 = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let mut len = None;
        loop {
            let mut line = String::new();
            if r.read_line(&mut line)? == 0 || line == "\r\n" {
                break;
            }
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse::<usize>().ok();
                }
            }
        }
        let mut buf = Vec::new();
        match len {
            Some(n) => {
                buf.resize(n, 0);
                r.read_exact(&mut buf)?;
            }
            None => {
                r.read_to_end(&mut buf)?;
            }
        }
        let v: Value = serde_json::from_slice(&buf).with_context(|| {
            format!(
                "{method} {path}: not JSON: {}",
                String::from_utf8_lossy(&buf)
            )
        })?;
        let value = v["value"].clone();
        if code != 200 {
            bail!(
                "WebDriver {method} {path} failed (HTTP {code}): {} {}",
                value["error"],
                value["message"]
            );
        }
        Ok(value)
    }

    fn session_path(&self, rest: &str) -> String {
        format!("/session/{}{rest}", self.session)
    }

    /// Opens `url`.
    pub fn goto(&self, url: &str) -> Result<()> {
        self.request(
            "POST",
            &self.session_path("/url"),
            Some(&json!({ "url": url })),
        )
        .map(drop)
    }

    /// Runs `script` (a function body; `arguments[i]` are `args`) and returns its result.
    pub fn eval(&self, script: &str, args: Value) -> Result<Value> {
        self.request(
            "POST",
            &self.session_path("/execute/sync"),
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Polls `script` (with `args`) every 50 ms until it returns an object with `ok: true`;
    /// that object, or an error after `timeout` naming `what` and showing the last answer.
    pub fn wait_for(
        &self,
        what: &str,
        script: &str,
        args: Value,
        timeout: Duration,
    ) -> Result<Value> {
        let t = Instant::now();
        loop {
            let v = self.eval(script, args.clone())?;
            if v["ok"] == true {
                return Ok(v);
            }
            ensure!(
                t.elapsed() < timeout,
                "{what}: not seen within {timeout:?}; the page shows: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn element(&self, css: &str) -> Result<String> {
        let v = self.request(
            "POST",
            &self.session_path("/element"),
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no element {css:?}: {v}"))
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) -> Result<()> {
        let id = self.element(css)?;
        self.request(
            "POST",
            &self.session_path(&format!("/element/{id}/click")),
            Some(&json!({})),
        )
        .map(drop)
    }

    /// Clears the input `css` selects and types `text` into it, as a user would.
    pub fn type_into(&self, css: &str, text: &str) -> Result<()> {
        let id = self.element(css)?;
        self.request(
            "POST",
            &self.session_path(&format!("/element/{id}/clear")),
            Some(&json!({})),
        )?;
        self.request(
            "POST",
            &self.session_path(&format!("/element/{id}/value")),
            Some(&json!({ "text": text })),
        )
        .map(drop)
    }

    /// Saves a PNG of the page to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let v = self.request("GET", &self.session_path("/screenshot"), None)?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().context("screenshot: no data")?)
            .context("screenshot: not base64")?;
        ensure!(png.starts_with(b"\x89PNG"), "screenshot is not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Quits Chromium.
            let _ = self.request("DELETE", &self.session_path(""), None);
        }
        // chromedriver and anything left in its process group.
        let pgid = nix::unistd::Pid::from_raw(self.driver.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.driver.wait();
    }
}
