//! The agent's DNS server for MCS-API names: `<svc>.<ns>.svc.clusterset.local`.
//!
//! * A / AAAA: the service's VIP (the local service's frontend, else the oldest exporting
//!   cluster's); headless services: the addresses of their backends in every cluster.
//! * SRV `_<port>._<proto>.<svc>.<ns>.svc.clusterset.local`: one record per named port,
//!   target the service name (its A records in the additional section).
//! * A name in `clusterset.local` that is not a service: NXDOMAIN; a service with no record
//!   of the asked type: NODATA (NOERROR, empty).
//! * Anything else is forwarded to the configured upstream; without one (the lab) the
//!   answer is REFUSED, so this server never sends packets to an address nobody configured.
//!
//! The zone is a value ([`Zone`], built from a [`ServiceMerger`]) published on a `watch`
//! channel: the server always answers from the latest state without locking the
//! reconciler. The wire format is hickory-proto's; the server loop is a plain tokio UDP
//! loop (hickory-server's handler API was not needed for one authoritative zone and a
//! relay).
//!
//! It must not resolve names outside `clusterset.local` itself.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SRV};
use hickory_proto::rr::{Name as DnsName, RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::services::{Name, ServiceMerger};

/// The zone served.
pub const ZONE: &str = "clusterset.local";

/// Settings of the DNS server.
#[derive(Clone, Debug)]
pub struct Config {
    /// TTL of the answers, seconds.
    pub ttl: u32,
    /// Where names outside the zone go; `None` answers REFUSED.
    pub upstream: Option<SocketAddr>,
    /// How long to wait for the upstream.
    pub upstream_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            ttl: 5,
            upstream: None,
            upstream_timeout: Duration::from_secs(2),
        }
    }
}

/// A named port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    /// Port name.
    pub name: String,
    /// `tcp` or `udp` (lowercase, as in SRV names).
    pub protocol: String,
    /// Port number.
    pub port: u16,
}

/// The records of one service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// A/AAAA addresses (VIP, or backends when headless).
    pub addrs: Vec<IpAddr>,
    /// Named ports (SRV).
    pub ports: Vec<Port>,
}

/// Every service name of the zone → its records. Names are lowercase, without the
/// trailing dot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Zone {
    entries: HashMap<String, Entry>,
}

impl Zone {
    /// The name of `svc` in the zone.
    pub fn fqdn(svc: &Name) -> String {
        format!("{}.{}.svc.{ZONE}", svc.name, svc.namespace).to_ascii_lowercase()
    }

    /// Adds or replaces a service.
    pub fn insert(&mut self, svc: &Name, entry: Entry) {
        self.entries.insert(Self::fqdn(svc), entry);
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The zone from the services: every MCS import, and every global local service.
    pub fn build(services: &ServiceMerger) -> Self {
        let mut zone = Zone::default();
        for name in services.names() {
            let import = services.import(&name);
            let merged = services.merged(&name);
            if import.is_none() && !merged.as_ref().is_some_and(|m| m.global) {
                continue;
            }
            let headless = import.as_ref().is_some_and(|i| i.type_ == "Headless")
                || merged.as_ref().is_some_and(|m| m.headless);
            let mut addrs: Vec<IpAddr> = Vec::new();
            if headless {
                match &merged {
                    Some(m) => addrs.extend(m.backends.iter().map(|b| b.ip)),
                    None => {
                        for (_, rs) in services.merger().remotes(&name) {
                            addrs.extend(
                                rs.backends.keys().filter_map(|k| k.parse::<IpAddr>().ok()),
                            );
                        }
                    }
                }
            } else if let Some(m) = merged.as_ref().filter(|m| !m.frontends.is_empty()) {
                addrs.extend(m.frontends.iter().map(|f| f.ip));
            } else {
                // Remote-only: the oldest exporter's VIP.
                let order = import
                    .as_ref()
                    .map(|i| i.clusters.clone())
                    .unwrap_or_default();
                let remotes: Vec<_> = services.merger().remotes(&name).collect();
                let first = order
                    .iter()
                    .find_map(|c| remotes.iter().find(|(rc, _)| *rc == c))
                    .or_else(|| remotes.first());
                if let Some((_, rs)) = first {
                    addrs.extend(rs.frontends.keys().filter_map(|k| k.parse::<IpAddr>().ok()));
                }
            }
            addrs.sort();
            addrs.dedup();
            let mut ports: Vec<Port> = match (&import, &merged) {
                (Some(i), _) => i
                    .ports
                    .iter()
                    .map(|p| Port {
                        name: p.name.clone(),
                        protocol: p.protocol.to_ascii_lowercase(),
                        port: p.port,
                    })
                    .collect(),
                (None, Some(m)) => m
                    .frontends
                    .iter()
                    .map(|f| Port {
                        name: f.port_name.clone(),
                        protocol: f.protocol.to_ascii_lowercase(),
                        port: f.port,
                    })
                    .collect(),
                (None, None) => Vec::new(),
            };
            ports.retain(|p| !p.name.is_empty());
            ports.dedup();
            zone.insert(&name, Entry { addrs, ports });
        }
        zone
    }

    /// The answer to `query` (wire format) for the zone; `None` for names outside it or
    /// messages that are not a standard query with one question.
    pub fn answer(&self, query: &Message, ttl: u32) -> Option<Message> {
        let q = query.queries.first()?;
        let qname = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
        if qname != ZONE && !qname.ends_with(&format!(".{ZONE}")) {
            return None;
        }
        let mut resp = reply(query, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        let owner = q.name.clone();
        match q.query_type {
            RecordType::A | RecordType::AAAA => {
                let Some(entry) = self.entries.get(&qname) else {
                    resp.metadata.response_code = if self.has_descendant(&qname) {
                        ResponseCode::NoError
                    } else {
                        ResponseCode::NXDomain
                    };
                    return Some(resp);
                };
                resp.answers = addr_records(&owner, &entry.addrs, q.query_type, ttl);
            }
            RecordType::SRV => {
                // `_<port>._<proto>.<service fqdn>`
                let mut labels = qname.splitn(3, '.');
                let (Some(port), Some(proto), Some(svc)) =
                    (labels.next(), labels.next(), labels.next())
                else {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    return Some(resp);
                };
                let (Some(port), Some(proto)) = (port.strip_prefix('_'), proto.strip_prefix('_'))
                else {
                    resp.metadata.response_code = if self.entries.contains_key(&qname) {
                        ResponseCode::NoError
                    } else {
                        ResponseCode::NXDomain
                    };
                    return Some(resp);
                };
                let found = self.entries.get(svc).and_then(|e| {
                    e.ports
                        .iter()
                        .find(|p| p.name.eq_ignore_ascii_case(port) && p.protocol == proto)
                        .map(|p| (e, p.port))
                });
                let Some((entry, port)) = found else {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    return Some(resp);
                };
                let target = DnsName::from_ascii(format!("{svc}.")).ok()?;
                resp.answers.push(Record::from_rdata(
                    owner,
                    ttl,
                    RData::SRV(SRV::new(0, 100, port, target.clone())),
                ));
                resp.additionals = addr_records(&target, &entry.addrs, RecordType::A, ttl);
                resp.additionals
                    .extend(addr_records(&target, &entry.addrs, RecordType::AAAA, ttl));
            }
            _ => {
                if !self.entries.contains_key(&qname) && !self.has_descendant(&qname) {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                }
            }
        }
        Some(resp)
    }

    /// `true` if `name` is an empty non-terminal (e.g. `svc.clusterset.local`, or
    /// `<ns>.svc.clusterset.local` of an existing service): NODATA, not NXDOMAIN.
    fn has_descendant(&self, name: &str) -> bool {
        let suffix = format!(".{name}");
        self.entries.keys().any(|k| k.ends_with(&suffix))
    }
}

fn addr_records(owner: &DnsName, addrs: &[IpAddr], ty: RecordType, ttl: u32) -> Vec<Record> {
    addrs
        .iter()
        .filter_map(|a| match (a, ty) {
            (IpAddr::V4(v4), RecordType::A) => Some(RData::A(A(*v4))),
            (IpAddr::V6(v6), RecordType::AAAA) => Some(RData::AAAA(AAAA(*v6))),
            _ => None,
        })
        .map(|rdata| Record::from_rdata(owner.clone(), ttl, rdata))
        .collect()
}

/// An empty response to `query` with `code` (question copied, RD copied).
fn reply(query: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new(
        query.metadata.id,
        MessageType::Response,
        query.metadata.op_code,
    );
    m.metadata = Metadata::response_from_request(&query.metadata);
    m.metadata.response_code = code;
    m.queries = query.queries.clone();
    m
}

/// Answers one datagram: the zone's answer, the upstream's relayed answer, or an error
/// response. `None` when the datagram is not even a DNS header (dropped).
pub async fn handle(zone: &Zone, config: &Config, packet: &[u8]) -> Option<Vec<u8>> {
    let query = match Message::from_vec(packet) {
        Ok(m) => m,
        Err(_) => {
            // Echo the ID with FORMERR when at least the header is there.
            if packet.len() < 12 {
                return None;
            }
            let id = u16::from_be_bytes([packet[0], packet[1]]);
            let m = Message::error_msg(id, OpCode::Query, ResponseCode::FormErr);
            return m.to_vec().ok();
        }
    };
    if query.metadata.message_type != MessageType::Query
        || query.metadata.op_code != OpCode::Query
        || query.queries.len() != 1
    {
        return reply(&query, ResponseCode::NotImp).to_vec().ok();
    }
    if let Some(resp) = zone.answer(&query, config.ttl) {
        return resp.to_vec().ok();
    }
    let Some(upstream) = config.upstream else {
        return reply(&query, ResponseCode::Refused).to_vec().ok();
    };
    match forward(packet, upstream, config.upstream_timeout).await {
        Ok(bytes) => Some(bytes),
        Err(error) => {
            debug!(%error, %upstream, "upstream failed");
            reply(&query, ResponseCode::ServFail).to_vec().ok()
        }
    }
}

async fn forward(
    packet: &[u8],
    upstream: SocketAddr,
    timeout: Duration,
) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = if upstream.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let sock = UdpSocket::bind(bind).await?;
    sock.connect(upstream).await?;
    sock.send(packet).await?;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(timeout, sock.recv(&mut buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))??;
    buf.truncate(n);
    Ok(buf)
}

/// Serves DNS over UDP on `socket` from the latest zone until `token` is cancelled. Each
/// query is answered in its own task of the server's `JoinSet` (a slow upstream never
/// holds up zone answers); the tasks are aborted on shutdown.
pub async fn serve(
    socket: UdpSocket,
    zone: watch::Receiver<Arc<Zone>>,
    config: Config,
    token: CancellationToken,
) -> std::io::Result<()> {
    let socket = Arc::new(socket);
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, peer) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(error) => {
                    warn!(%error, "dns receive failed");
                    continue;
                }
            },
            _ = token.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let packet = buf[..n].to_vec();
        let current = zone.borrow().clone();
        let (socket, config) = (socket.clone(), config.clone());
        tasks.spawn(async move {
            if let Some(resp) = handle(&current, &config, &packet).await {
                if let Err(error) = socket.send_to(&resp, peer).await {
                    debug!(%error, %peer, "dns send failed");
                }
            }
        });
    }
    tasks.shutdown().await;
    Ok(())
}
