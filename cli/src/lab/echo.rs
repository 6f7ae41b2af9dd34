//! `clustermesh lab echo` (hidden): the server in every lab pod.
//!
//! * `:8080` answers with who it is — `{"pod":…,"node":…,"cluster":…,"ip":…,"client":…}` —
//!   as an HTTP/1.0 response when the client sends a request (curl), or as a bare line when
//!   the client sends nothing for 300 ms (`nc`);
//! * `:8081` echoes every byte back (request/response latency);
//! * `:8082` discards what it reads and, at the client's end of stream, answers with the
//!   byte count as 8 bytes big-endian (throughput measured on the receiving side).
//!
//! Plain threads: a lab pod serves a handful of connections at a time.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context as _;

use crate::lab::plan;

/// Flags of `lab echo`.
#[derive(Debug, clap::Args)]
pub struct EchoArgs {
    /// Pod name in the answer.
    #[arg(long)]
    pub pod: String,
    /// Node name in the answer.
    #[arg(long)]
    pub node: String,
    /// Cluster name in the answer.
    #[arg(long)]
    pub cluster: String,
    /// Address to listen on (`::` takes IPv4 and IPv6 connections: dual-stack pods).
    #[arg(long, default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    pub listen: IpAddr,
}

/// What `:8080` answers (the connectivity test parses it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Answer {
    /// Pod name.
    pub pod: String,
    /// Node name.
    pub node: String,
    /// Cluster name.
    pub cluster: String,
    /// The address the client connected to.
    pub ip: String,
    /// The client's address as seen by the pod.
    pub client: String,
}

/// Runs the three listeners until killed.
pub fn run(a: EchoArgs) -> anyhow::Result<()> {
    let bind = |port| {
        TcpListener::bind(SocketAddr::from((a.listen, port)))
            .with_context(|| format!("listening on {}:{port}", a.listen))
    };
    let who = bind(plan::ECHO_PORT)?;
    let stream = bind(plan::STREAM_PORT)?;
    let sink = bind(plan::SINK_PORT)?;
    eprintln!(
        "echo: {}/{}/{} listening on :{} (who), :{} (echo), :{} (sink)",
        a.cluster,
        a.node,
        a.pod,
        plan::ECHO_PORT,
        plan::STREAM_PORT,
        plan::SINK_PORT
    );
    std::thread::spawn(move || serve(stream, echo_bytes));
    std::thread::spawn(move || serve(sink, discard));
    let id = (a.pod, a.node, a.cluster);
    for conn in who.incoming() {
        let Ok(conn) = conn else { continue };
        let id = id.clone();
        std::thread::spawn(move || {
            if let Err(e) = answer(conn, &id.0, &id.1, &id.2) {
                eprintln!("echo: {e:#}");
            }
        });
    }
    Ok(())
}

fn serve(listener: TcpListener, handler: fn(TcpStream) -> std::io::Result<()>) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            let _ = handler(conn);
        });
    }
}

fn answer(mut conn: TcpStream, pod: &str, node: &str, cluster: &str) -> anyhow::Result<()> {
    let body = serde_json::to_string(&Answer {
        pod: pod.into(),
        node: node.into(),
        cluster: cluster.into(),
        // A dual-stack socket sees IPv4 peers as ::ffff:a.b.c.d: shown as IPv4.
        ip: conn.local_addr()?.ip().to_canonical().to_string(),
        client: {
            let peer = conn.peer_addr()?;
            SocketAddr::new(peer.ip().to_canonical(), peer.port()).to_string()
        },
    })? + "\n";
    conn.set_read_timeout(Some(Duration::from_millis(300)))?;
    // Read the request head, if any (an HTTP client sends one; `nc` does not).
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 16 * 1024 {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => req.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    if req.starts_with(b"GET ") || req.starts_with(b"HEAD ") {
        write!(
            conn,
            "HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
    } else {
        conn.write_all(body.as_bytes())?;
    }
    conn.flush()?;
    Ok(())
}

fn echo_bytes(mut conn: TcpStream) -> std::io::Result<()> {
    conn.set_nodelay(true)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n])?;
    }
}

fn discard(mut conn: TcpStream) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    conn.write_all(&total.to_be_bytes())
}
