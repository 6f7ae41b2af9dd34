//! `clustermesh lab load` (hidden): a load client run inside a pod namespace against another
//! pod's echo server — TCP throughput (`stream`, to the sink on :8082) or request/response
//! latency (`rr`, 1-byte ping-pong on :8081). Prints one JSON object; the throughput bench
//! runs it in both datapaths and compares.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::lab::plan;

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Bulk TCP throughput.
    Stream,
    /// 1-byte request/response latency.
    Rr,
}

/// Flags of `lab load`.
#[derive(Debug, clap::Args)]
pub struct LoadArgs {
    /// The target pod's IP (IPv4 or IPv6).
    #[arg(long)]
    pub target: IpAddr,
    /// What to measure.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Duration.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Parallel connections (stream mode).
    #[arg(long, default_value_t = 1)]
    pub streams: u32,
}

/// `lab load`.
pub fn run(a: LoadArgs) -> anyhow::Result<()> {
    let report = match a.mode {
        Mode::Stream => stream(a.target, a.duration, a.streams)?,
        Mode::Rr => rr(a.target, a.duration)?,
    };
    println!("{report}");
    Ok(())
}

/// How long a stream's write may block before the stream counts as stalled. Longer than any
/// outage a stream must survive: the fault suite cuts a cluster off for 30 s with a stream
/// running, and TCP resumes up to ~21 s after the link returns (retransmit backoff), so 60 s.
/// A path MTU black hole still fails the stream instead of hanging a benchmark forever.
const STALL: Duration = Duration::from_secs(60);

fn connect(target: IpAddr, port: u16) -> anyhow::Result<TcpStream> {
    let addr = SocketAddr::from((target, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("connecting to {addr} (is the lab up and routed?)"))
}

fn stream(target: IpAddr, duration: Duration, streams: u32) -> anyhow::Result<serde_json::Value> {
    let start = Instant::now();
    let handles: Vec<_> = (0..streams.max(1))
        .map(|_| {
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut c = connect(target, plan::SINK_PORT)?;
                // A path that drops big packets (an MTU black hole) stalls a stream at
                // cwnd 1 forever: fail with a reason instead of hanging the benchmark.
                c.set_write_timeout(Some(STALL))?;
                let buf = vec![0x5au8; 128 * 1024];
                let end = Instant::now() + duration;
                let mut sent = 0u64;
                while Instant::now() < end {
                    c.write_all(&buf).with_context(|| {
                        format!("the stream to {target} stalled ({STALL:?} without progress after {sent} bytes: a path MTU black hole?)")
                    })?;
                    sent += buf.len() as u64;
                }
                c.shutdown(std::net::Shutdown::Write)?;
                c.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut n = [0u8; 8];
                c.read_exact(&mut n)
                    .context("reading the sink's byte count")?;
                let got = u64::from_be_bytes(n);
                if got != sent {
                    bail!("sent {sent} bytes, the sink counted {got}");
                }
                Ok(got)
            })
        })
        .collect();
    let mut bytes = 0;
    for h in handles {
        bytes += h
            .join()
            .map_err(|_| anyhow::anyhow!("a stream thread panicked"))??;
    }
    let secs = start.elapsed().as_secs_f64();
    Ok(serde_json::json!({
        "mode": "stream", "target": target, "streams": streams, "bytes": bytes,
        "seconds": secs, "gbit_per_s": bytes as f64 * 8.0 / secs / 1e9,
    }))
}

fn rr(target: IpAddr, duration: Duration) -> anyhow::Result<serde_json::Value> {
    let mut c = connect(target, plan::STREAM_PORT)?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(3)))?;
    let mut samples = Vec::with_capacity(200_000);
    let end = Instant::now() + duration;
    let mut b = [0u8; 1];
    while Instant::now() < end {
        let t = Instant::now();
        c.write_all(b"x")?;
        c.read_exact(&mut b).context("waiting for the echo")?;
        samples.push(t.elapsed().as_nanos() as u64);
    }
    if samples.is_empty() {
        bail!("no request/response completed in {duration:?}");
    }
    samples.sort_unstable();
    let pct = |p: f64| samples[((samples.len() - 1) as f64 * p) as usize] as f64 / 1000.0;
    let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64 / 1000.0;
    Ok(serde_json::json!({
        "mode": "rr", "target": target, "requests": samples.len(),
        "p50_us": pct(0.50), "p99_us": pct(0.99), "mean_us": mean,
        // The longest wait for an answer: the gap a fault (an agent restart) left.
        "max_us": samples.last().copied().unwrap_or(0) as f64 / 1000.0,
        "per_s": samples.len() as f64 / duration.as_secs_f64(),
    }))
}
