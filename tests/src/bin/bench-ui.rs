//! `bench-ui`: does `clustermesh ui` keep up with 10k flows/s, in bounded memory, and what
//! does it cost next to the agents' own flow export, measured in the same run?
//!
//! Brings up a real lab (`lab up --clusters 2 --nodes 2 --pods 1`: 4 agents, eBPF
//! datapath) and `clustermesh ui` on it, then offers flows the way users make them: `ping`
//! floods between pods of the two clusters (every echo request and reply is a flow event at
//! the node it leaves and at the node it enters: 4 per ping), paced to about `--rate` flow
//! events per second in all. The offered rate is what the agents' observers report
//! (`ServerStatus.seen_flows`, read over gRPC from the lab's router namespace).
//!
//! Three clients follow `/api/events` meanwhile: one reads everything (it must get every
//! flow), one reads 64 KiB every 100 ms (it must be told how much it missed, in the
//! events it reads), one never reads (it must cost a bounded queue, its losses counted).
//!
//! Printed: offered and received rates, the UI's CPU beside the agents' (the agents read
//! the ring buffer, enrich, store and serve the same flows over gRPC: their flow-export
//! cost), the UI's resident memory over the run, and the clients' counters. PASS needs:
//! the UI received ≥ 99 % of the offered flows and the fast client ≥ 95 %; memory in the
//! second half of the run not above the first half's peak + 5 % + 2 MiB; the stalled
//! client's queue within its bound with its losses counted; the slow client shown a
//! non-zero `dropped`; and the UI's CPU at most `--max-ratio` (default 2.0) times the
//! agents' total. Needs root; the lab is removed at the end, also on failure.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! target/release/bench-ui [--rate 10000] [--duration 20s] [--max-ratio 2.0]
//! ```

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _, Result};
use clustermesh_observer_api as api;
use clustermesh_tests::lab::Lab;
use clustermesh_tests::process::{free_port, http_get, proc_cpu};
use serde_json::Value;

struct Args {
    rate: u64,
    duration: Duration,
    warmup: Duration,
    max_ratio: f64,
}

fn args() -> Result<Args> {
    let mut a = Args {
        rate: 10_000,
        duration: Duration::from_secs(20),
        warmup: Duration::from_secs(5),
        max_ratio: 2.0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().with_context(|| format!("{k} needs a value"));
        match k.as_str() {
            "--rate" => a.rate = v()?.parse()?,
            "--duration" => a.duration = humantime::parse_duration(&v()?)?,
            "--warmup" => a.warmup = humantime::parse_duration(&v()?)?,
            "--max-ratio" => a.max_ratio = v()?.parse()?,
            _ => bail!(
                "unknown flag {k}: use --rate N, --duration 20s, --warmup 5s, --max-ratio 2.0"
            ),
        }
    }
    Ok(a)
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of `pid`, in seconds.
fn cpu_s(pid: u32) -> Result<f64> {
    proc_cpu(pid)
        .map(|d| d.as_secs_f64())
        .with_context(|| format!("process {pid} is gone"))
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |p| p * 4096)
}

/// Every agent's `seen_flows`, asked over gRPC from a thread inside the router namespace
/// (the lab's underlay is reached from there whatever else routes 198.18.0.0/15).
fn agents_seen(router_ns: &str, observers: &[String]) -> Result<u64> {
    let (ns, observers) = (router_ns.to_owned(), observers.to_vec());
    std::thread::spawn(move || -> Result<u64> {
        let f = std::fs::File::open(Path::new("/run/netns").join(&ns))?;
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {ns}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async {
            let mut total = 0;
            for o in &observers {
                let mut c = api::observer_client::ObserverClient::connect(format!("http://{o}"))
                    .await
                    .with_context(|| format!("observer {o}"))?;
                total += c
                    .server_status(api::ServerStatusRequest {})
                    .await?
                    .into_inner()
                    .seen_flows;
            }
            Ok(total)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the observer thread panicked"))?
}

/// What one `/api/events` reader saw.
#[derive(Default)]
struct Seen {
    flows: AtomicU64,
    /// The last `dropped` value in a `flows` event.
    dropped: AtomicU64,
    bytes: AtomicU64,
}

/// Counts `"seq":` (one per flow) and reads `{"dropped":N,` out of the raw SSE bytes, keeping
/// a tail across reads so that no pattern is missed at a read boundary.
fn scan(buf: &mut Vec<u8>, seen: &Seen) {
    const SEQ: &[u8] = b"\"seq\":";
    const DROPPED: &[u8] = b"{\"dropped\":";
    let mut i = 0;
    let mut last_end = 0;
    while i + SEQ.len() <= buf.len() {
        if buf[i..].starts_with(SEQ) {
            seen.flows.fetch_add(1, Ordering::Relaxed);
            i += SEQ.len();
            last_end = i;
            continue;
        }
        if buf[i..].starts_with(DROPPED) {
            let start = i + DROPPED.len();
            let end = buf[start..].iter().position(|b| !b.is_ascii_digit());
            match end {
                Some(e) => {
                    if let Ok(n) = std::str::from_utf8(&buf[start..start + e])
                        .unwrap_or_default()
                        .parse()
                    {
                        seen.dropped.store(n, Ordering::Relaxed);
                    }
                    i = start + e;
                    last_end = i;
                    continue;
                }
                None => break,
            }
        }
        i += 1;
    }
    // Keep what could still be the start of a pattern.
    let keep_from = last_end.max(buf.len().saturating_sub(DROPPED.len() + 20));
    buf.drain(..keep_from);
}

/// Follows `/api/events` with `HTTP/1.0` (no chunked framing in the way): reads `chunk`
/// bytes every `pause` (no pause: as fast as it can) until `stop`.
fn follow(
    addr: SocketAddr,
    chunk: usize,
    pause: Option<Duration>,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr)?;
    write!(s, "GET /api/events?last=0 HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut reader = s.try_clone()?;
    reader.set_read_timeout(Some(Duration::from_millis(500)))?;
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; chunk];
        while !stop.load(Ordering::Relaxed) {
            match reader.read(&mut tmp) {
                Ok(0) => break,
                Ok(n) => {
                    seen.bytes.fetch_add(n as u64, Ordering::Relaxed);
                    buf.extend_from_slice(&tmp[..n]);
                    scan(&mut buf, &seen);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break,
            }
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
    });
    Ok(s)
}

fn stats(ui: SocketAddr) -> Result<Value> {
    let (code, body) = http_get(ui, "/api/stats")?;
    ensure!(code == 200, "/api/stats: HTTP {code}: {body}");
    Ok(serde_json::from_str(&body)?)
}

fn main() -> Result<()> {
    let a = args()?;
    ensure!(
        nix::unistd::geteuid().is_root(),
        "bench-ui builds a lab in network namespaces: run it as root"
    );
    // The shared lab helper: it waits for the machine's lab turn (no lab test runs beside
    // the measurement) and takes the lab down on drop, also on failure.
    let mut lab = Lab::new("cm-bench-ui")?;
    let (_, state) = lab.up_mesh(1, &[])?;
    let (bin, dir) = (lab.bin.clone(), lab.dir.clone());
    let st = &state;
    let router = st["router_ns"].as_str().context("router_ns")?.to_owned();
    let mut agents = Vec::new();
    let mut observers = Vec::new();
    let mut pods = Vec::new();
    for c in st["clusters"].as_array().context("clusters")? {
        for n in c["nodes"].as_array().context("nodes")? {
            agents.push(n["agent"]["pid"].as_u64().context("no agent in the lab")? as u32);
            observers.push(format!("{}:4245", n["ip"].as_str().context("node ip")?));
            let p = &n["pods"][0];
            pods.push((
                p["ns"].as_str().context("pod ns")?.to_owned(),
                p["ip"].as_str().context("pod ip")?.to_owned(),
            ));
        }
    }
    ensure!(agents.len() == 4, "expected 4 agents, got {}", agents.len());

    let ui_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ui_log = dir.with_file_name("ui.log");
    let ui = Proc(
        Command::new(&bin)
            .args(["ui", "--listen", &ui_addr.to_string(), "--dir"])
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&ui_log)?)
            .stderr(std::fs::File::create(dir.with_file_name("ui.err"))?)
            .spawn()?,
    );
    let ui_pid = ui.0.id();
    let t = Instant::now();
    while !matches!(http_get(ui_addr, "/api/stats"), Ok((200, _))) {
        ensure!(
            t.elapsed() < Duration::from_secs(15),
            "clustermesh ui did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // Readers of the live stream.
    let stop = Arc::new(AtomicBool::new(false));
    let fast = Arc::new(Seen::default());
    let slow = Arc::new(Seen::default());
    let _fast_conn = follow(ui_addr, 256 * 1024, None, fast.clone(), stop.clone())?;
    // About 640 KiB/s, a fraction of the stream at 10k flows/s, but enough to get past the
    // batches queued before it fell behind and read the ones that carry its losses.
    let _slow_conn = follow(
        ui_addr,
        64 * 1024,
        Some(Duration::from_millis(100)),
        slow.clone(),
        stop.clone(),
    )?;
    let mut stalled = TcpStream::connect(ui_addr)?;
    write!(
        stalled,
        "GET /api/events?last=0 HTTP/1.0\r\nHost: {ui_addr}\r\n\r\n"
    )?;

    // The load: 4 pingers, each pod to a pod of the other cluster; 4 flow events per ping.
    let per_pinger = a.rate as f64 / 4.0 / 4.0;
    let interval = format!("{:.6}", 1.0 / per_pinger);
    let total = a.warmup + a.duration + Duration::from_secs(2);
    let pairs = [(0, 2), (1, 3), (2, 1), (3, 0)];
    let mut pingers = Vec::new();
    for (from, to) in pairs {
        pingers.push(Proc(
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &pods[from].0,
                    "ping",
                    "-q",
                    "-i",
                    &interval,
                ])
                .args(["-w", &total.as_secs().to_string(), &pods[to].1])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("ping (apt-get install iputils-ping)")?,
        ));
    }
    println!(
        "# bench-ui: lab 2 clusters × 2 nodes × 1 pod, 4 pingers at {:.0}/s each (~{} flow events/s), warm-up {:?}, measured {:?}",
        per_pinger, a.rate, a.warmup, a.duration
    );
    std::thread::sleep(a.warmup);

    let seen0 = agents_seen(&router, &observers)?;
    let recv0 = stats(ui_addr)?["received"].as_u64().unwrap_or(0);
    let fast0 = fast.flows.load(Ordering::Relaxed);
    let ui_cpu0 = cpu_s(ui_pid)?;
    let ag_cpu0: f64 = agents.iter().map(|p| cpu_s(*p)).sum::<Result<f64>>()?;
    let t0 = Instant::now();
    let mut rss = Vec::new();
    while t0.elapsed() < a.duration {
        rss.push(rss_bytes(ui_pid));
        std::thread::sleep(Duration::from_millis(500));
    }
    let secs = t0.elapsed().as_secs_f64();
    let ui_cpu = cpu_s(ui_pid)? - ui_cpu0;
    let ag_cpu = agents.iter().map(|p| cpu_s(*p)).sum::<Result<f64>>()? - ag_cpu0;
    let seen1 = agents_seen(&router, &observers)?;
    let s = stats(ui_addr)?;
    let recv1 = s["received"].as_u64().unwrap_or(0);
    let fast1 = fast.flows.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    drop(pingers);

    let offered = (seen1 - seen0) as f64 / secs;
    let received = (recv1 - recv0) as f64 / secs;
    let fast_rate = (fast1 - fast0) as f64 / secs;
    let half = rss.len() / 2;
    let first_peak = rss[..half].iter().copied().max().unwrap_or(0);
    let second_peak = rss[half..].iter().copied().max().unwrap_or(0);
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let clients = s["clients"].as_array().cloned().unwrap_or_default();
    let stalled_peer = stalled.local_addr()?.to_string();
    let stalled_c = clients
        .iter()
        .find(|c| c["peer"].as_str() == Some(stalled_peer.as_str()))
        .cloned()
        .unwrap_or(Value::Null);
    let queue_bound = s["limits"]["queue"].as_u64().unwrap_or(0);

    println!("{:<44} {:>14} {:>14}", "", "measured", "baseline");
    println!(
        "{:<44} {:>14.0} {:>14}",
        "flow events offered by the agents /s", offered, ""
    );
    println!(
        "{:<44} {:>14.0} {:>14.0}",
        "received by the UI /s (vs offered)", received, offered
    );
    println!(
        "{:<44} {:>14.0} {:>14.0}",
        "sent to the fast client /s (vs received)", fast_rate, received
    );
    println!(
        "{:<44} {:>13.1}% {:>13.1}%",
        "CPU: clustermesh ui (vs 4 agents' export)",
        ui_cpu / secs * 100.0,
        ag_cpu / secs * 100.0
    );
    println!(
        "{:<44} {:>14.2} {:>14.2}",
        "CPU µs per flow: UI (vs agents)",
        ui_cpu / (received * secs) * 1e6,
        ag_cpu / (offered * secs) * 1e6
    );
    println!(
        "{:<44} {:>11.1} MiB {:>10.1} MiB",
        "UI RSS peak, 2nd half of the run (vs 1st)",
        mib(second_peak),
        mib(first_peak)
    );
    println!(
        "stalled client: queued {}/{} messages, sent {}, dropped {} flows; slow client read {} flows and was told dropped={}",
        stalled_c["queued"], queue_bound, stalled_c["sent"], stalled_c["dropped"],
        slow.flows.load(Ordering::Relaxed), slow.dropped.load(Ordering::Relaxed)
    );
    let ratio = if ag_cpu > 0.0 {
        ui_cpu / ag_cpu
    } else {
        f64::INFINITY
    };
    let checks = [
        (
            offered >= a.rate as f64 * 0.8,
            format!("offered {offered:.0}/s is near the target {}/s", a.rate),
        ),
        (
            received >= offered * 0.99,
            format!(
                "the UI received {:.1}% of the offered flows (≥ 99%)",
                received / offered * 100.0
            ),
        ),
        (
            fast_rate >= received * 0.95,
            format!(
                "the fast client got {:.1}% of them (≥ 95%)",
                fast_rate / received * 100.0
            ),
        ),
        (
            second_peak as f64 <= first_peak as f64 * 1.05 + 2.0 * 1024.0 * 1024.0,
            format!(
                "memory flat: {:.1} MiB after {:.1} MiB",
                mib(second_peak),
                mib(first_peak)
            ),
        ),
        (
            stalled_c["queued"]
                .as_u64()
                .is_some_and(|q| q <= queue_bound)
                && stalled_c["dropped"].as_u64().unwrap_or(0) > 0,
            "the stalled client costs at most its queue and its losses are counted".to_owned(),
        ),
        (
            slow.dropped.load(Ordering::Relaxed) > 0,
            "the slow client is told how many flows it missed".to_owned(),
        ),
        (
            ratio <= a.max_ratio,
            format!(
                "UI CPU / agents' export CPU = {ratio:.2} (≤ {:.2})",
                a.max_ratio
            ),
        ),
    ];
    let mut ok = true;
    for (pass, what) in &checks {
        println!("{} {what}", if *pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    drop(ui);
    drop(stalled);
    drop(lab);
    if !ok {
        bail!("bench-ui: some checks failed (see above)");
    }
    Ok(())
}
