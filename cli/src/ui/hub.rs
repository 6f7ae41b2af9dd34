//! The hub between the agents' observers and the browsers: every flow is serialised once
//! ([`flow::entry`]), counted into the service map ([`Graph`]), kept in a bounded ring (for
//! `/api/flows` and a new page's backlog), and sent to each live client in batches every
//! [`FLUSH`].
//!
//! Memory is bounded whatever the flow rate and however slow a browser is: the ring holds
//! [`RING`] flows, the map is bounded by [`graph`]'s limits, and each client has a queue of
//! [`QUEUE`] messages of at most [`BATCH`] flows. What a client cannot take is dropped and
//! counted per client (the page shows the count), never buffered.
//!
//! It must not do I/O: the observer tasks push into it, the HTTP handlers read from it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use clustermesh_observer_api as api;
use serde::Serialize;
use tokio::sync::mpsc;

use super::filter::Filter;
use super::flow::{self, Entry};
use super::graph::{Graph, Inventory};

/// Flows kept for `/api/flows` and new pages.
pub const RING: usize = 2000;
/// How often batches go out (a new flow reaches the page within about this).
pub const FLUSH: Duration = Duration::from_millis(100);
/// Messages queued per client before its updates are dropped (0.8 s of batches).
pub const QUEUE: usize = 8;
/// Flows per batch per client at most: 25k/s at [`FLUSH`], 2.5× the 10k flows/s a busy
/// mesh offers (bench-ui measured 14k/s offered against a 10k/s target, and a 10k/s cap
/// cut a reading client to 72 %). The rest is dropped and counted. A stalled client costs
/// at most `QUEUE × BATCH` flows of JSON (about 8 MiB).
pub const BATCH: usize = 2500;
/// Live clients at most.
pub const MAX_CLIENTS: usize = 32;
/// Flows waiting for the next flush at most (only reached if flushing stalls).
const MAX_PENDING: usize = 50_000;
/// Seconds the overall rate is averaged over.
const RATE_WINDOW_S: u64 = 10;

/// A message to one client.
#[derive(Debug, Clone)]
pub enum Msg {
    /// A JSON array of flows.
    Flows(Arc<str>),
    /// The service map (`/api/map`).
    Map(Arc<str>),
    /// Clusters, nodes and remotes (`/api/mesh`).
    Mesh(Arc<str>),
}

/// One live page (or `curl` on `/api/events`).
#[derive(Debug)]
pub struct Client {
    /// Client number.
    pub id: u64,
    /// Its flow filter.
    pub filter: Filter,
    /// Its address.
    pub peer: String,
    tx: mpsc::Sender<Msg>,
    /// Flows it was not sent because its queue was full.
    pub dropped: AtomicU64,
    /// Map and mesh updates it was not sent because its queue was full.
    pub skipped: AtomicU64,
    /// Flows sent.
    pub sent: AtomicU64,
}

/// The state of the stream from one agent's observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FeedState {
    /// Dialling.
    Connecting,
    /// Receiving flows.
    Following,
    /// Not answering (retrying).
    Failing,
}

/// One agent's observer as the UI follows it.
#[derive(Debug, Clone, Serialize)]
pub struct Feed {
    /// Cluster (empty for `--server` observers).
    pub cluster: String,
    /// Node name within its cluster (or the address).
    pub node: String,
    /// `host:port`.
    pub address: String,
    /// Stream state.
    pub state: FeedState,
    /// Why it failed (when failing).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub error: String,
    /// Flows received from it.
    pub flows: u64,
    /// Successful connections so far.
    pub connects: u64,
    /// Since when (RFC 3339).
    pub since: String,
}

struct Inner {
    ring: VecDeque<Arc<Entry>>,
    pending: Vec<Arc<Entry>>,
    /// Flows no client got because flushing stalled.
    overflow: u64,
    graph: Graph,
    clients: Vec<Arc<Client>>,
    feeds: Vec<Feed>,
    received: u64,
    rate: [(u64, u64); RATE_WINDOW_S as usize],
    mesh: Arc<str>,
}

/// The hub.
pub struct Hub {
    start: Instant,
    seq: AtomicU64,
    next_client: AtomicU64,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// Refused subscription.
#[derive(Debug)]
pub struct TooManyClients;

fn now_rfc3339() -> String {
    crate::observe::time(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or_default(),
        true,
    )
}

fn join(entries: &[&Arc<Entry>]) -> String {
    let mut s = String::with_capacity(2 + entries.iter().map(|e| e.json.len() + 1).sum::<usize>());
    s.push('[');
    for (i, e) in entries.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&e.json);
    }
    s.push(']');
    s
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            seq: AtomicU64::new(0),
            next_client: AtomicU64::new(1),
            inner: Mutex::new(Inner {
                ring: VecDeque::with_capacity(RING),
                pending: Vec::new(),
                overflow: 0,
                graph: Graph::default(),
                clients: Vec::new(),
                feeds: Vec::new(),
                received: 0,
                rate: [(0, 0); RATE_WINDOW_S as usize],
                mesh: Arc::from("{}"),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic elsewhere leaves plain counters and queues, still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Seconds since the hub started (the map's clock).
    pub fn now_s(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Registers an observer; returns its index for [`Hub::set_feed`] and [`Hub::ingest`].
    pub fn add_feed(&self, cluster: &str, node: &str, address: &str) -> usize {
        let mut g = self.lock();
        g.feeds.push(Feed {
            cluster: cluster.to_owned(),
            node: node.to_owned(),
            address: address.to_owned(),
            state: FeedState::Connecting,
            error: String::new(),
            flows: 0,
            connects: 0,
            since: now_rfc3339(),
        });
        g.feeds.len() - 1
    }

    /// Records the state of observer `idx`.
    pub fn set_feed(&self, idx: usize, state: FeedState, error: String) {
        let mut g = self.lock();
        if let Some(f) = g.feeds.get_mut(idx) {
            if f.state != state || f.error != error {
                f.since = now_rfc3339();
            }
            if state == FeedState::Following && f.state != FeedState::Following {
                f.connects += 1;
            }
            f.state = state;
            f.error = error;
        }
    }

    /// Every observer's state.
    pub fn feeds(&self) -> Vec<Feed> {
        self.lock().feeds.clone()
    }

    /// Takes one flow from observer `idx`, whose agent is `node` (`c1/n1`).
    pub fn ingest(&self, idx: usize, node: &str, f: &api::Flow) {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        // Serialised outside the lock: the expensive part runs in parallel.
        let entry = Arc::new(flow::entry(seq, node, f));
        let now = self.now_s();
        let mut g = self.lock();
        g.graph.observe(f, node, now);
        if g.ring.len() == RING {
            g.ring.pop_front();
        }
        g.ring.push_back(entry.clone());
        if g.pending.len() < MAX_PENDING {
            g.pending.push(entry);
        } else {
            g.overflow += 1;
        }
        g.received += 1;
        let b = &mut g.rate[(now % RATE_WINDOW_S) as usize];
        if b.0 != now {
            *b = (now, 0);
        }
        b.1 += 1;
        if let Some(feed) = g.feeds.get_mut(idx) {
            feed.flows += 1;
        }
    }

    /// Replaces the workloads and services read from etcd.
    pub fn set_inventory(&self, inv: Inventory) {
        self.lock().graph.set_inventory(inv);
    }

    /// Sets the mesh document (`/api/mesh`).
    pub fn set_mesh(&self, json: String) -> Arc<str> {
        let json: Arc<str> = Arc::from(json);
        self.lock().mesh = json.clone();
        json
    }

    /// The mesh document.
    pub fn mesh(&self) -> Arc<str> {
        self.lock().mesh.clone()
    }

    /// The service map (`/api/map`).
    pub fn map(&self) -> Arc<str> {
        let now = self.now_s();
        Arc::from(self.lock().graph.to_json(now))
    }

    /// A new client with `filter`: its queue starts with the mesh, the map and the last
    /// `backlog` matching flows, taken under the same lock as the registration so that no
    /// flow is missed or sent twice.
    pub fn subscribe(
        &self,
        filter: Filter,
        backlog: usize,
        peer: String,
    ) -> Result<(Arc<Client>, mpsc::Receiver<Msg>), TooManyClients> {
        let map = self.map();
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = Arc::new(Client {
            id: self.next_client.fetch_add(1, Ordering::Relaxed),
            filter,
            peer,
            tx,
            dropped: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        let mut g = self.lock();
        g.clients.retain(|c| !c.tx.is_closed());
        if g.clients.len() >= MAX_CLIENTS {
            return Err(TooManyClients);
        }
        let mut past: Vec<&Arc<Entry>> = g
            .ring
            .iter()
            .rev()
            .filter(|e| client.filter.matches(&e.keys))
            .take(backlog.min(BATCH))
            .collect();
        past.reverse();
        // A fresh queue of QUEUE ≥ 3 slots takes these three.
        let _ = client.tx.try_send(Msg::Mesh(g.mesh.clone()));
        let _ = client.tx.try_send(Msg::Map(map));
        let _ = client.tx.try_send(Msg::Flows(Arc::from(join(&past))));
        client.sent.fetch_add(past.len() as u64, Ordering::Relaxed);
        g.clients.push(client.clone());
        Ok((client, rx))
    }

    /// Sends what arrived since the last flush to every client (filtered per client).
    pub fn flush(&self) {
        let (pending, clients, overflow) = {
            let mut g = self.lock();
            (
                std::mem::take(&mut g.pending),
                g.clients.clone(),
                std::mem::take(&mut g.overflow),
            )
        };
        if pending.is_empty() && overflow == 0 {
            return;
        }
        // Unfiltered clients share one serialisation.
        let mut everything: Option<(Arc<str>, usize)> = None;
        let mut closed = Vec::new();
        for c in &clients {
            if overflow > 0 {
                c.dropped.fetch_add(overflow, Ordering::Relaxed);
            }
            let (batch, n, over) = if c.filter.is_empty() {
                let (b, n) = everything
                    .get_or_insert_with(|| {
                        let take: Vec<&Arc<Entry>> = pending.iter().take(BATCH).collect();
                        (Arc::from(join(&take)), take.len())
                    })
                    .clone();
                (b, n, pending.len() - n)
            } else {
                let matching: Vec<&Arc<Entry>> = pending
                    .iter()
                    .filter(|e| c.filter.matches(&e.keys))
                    .collect();
                let over = matching.len().saturating_sub(BATCH);
                let take = &matching[..matching.len() - over];
                if take.is_empty() && over == 0 {
                    continue;
                }
                (Arc::from(join(take)), take.len(), over)
            };
            c.dropped.fetch_add(over as u64, Ordering::Relaxed);
            match c.tx.try_send(Msg::Flows(batch)) {
                Ok(()) => {
                    c.sent.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    c.dropped.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => closed.push(c.id),
            }
        }
        if !closed.is_empty() {
            self.lock().clients.retain(|c| !closed.contains(&c.id));
        }
    }

    /// Sends a map or mesh update to every client that has room.
    pub fn broadcast(&self, msg: Msg) {
        let clients = self.lock().clients.clone();
        for c in clients {
            if let Err(mpsc::error::TrySendError::Full(_)) = c.tx.try_send(msg.clone()) {
                c.skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// `/api/flows`: the last `last` held flows matching `filter`, oldest first.
    pub fn flows_json(&self, filter: &Filter, last: usize) -> String {
        let g = self.lock();
        let mut matched: Vec<&Arc<Entry>> =
            g.ring.iter().filter(|e| filter.matches(&e.keys)).collect();
        let total = matched.len();
        if matched.len() > last {
            matched.drain(..matched.len() - last);
        }
        format!(
            "{{\"filter\":{},\"matched\":{total},\"held\":{},\"received\":{},\"flows\":{}}}",
            serde_json::to_string(filter).unwrap_or_else(|_| "{}".into()),
            g.ring.len(),
            g.received,
            join(&matched)
        )
    }

    /// `/api/stats`: counters, per-observer and per-client state.
    pub fn stats(&self) -> serde_json::Value {
        let now = self.now_s();
        let g = self.lock();
        let recent: u64 = g
            .rate
            .iter()
            .filter(|(s, _)| now.saturating_sub(*s) < RATE_WINDOW_S && *s < now)
            .map(|(_, c)| *c)
            .sum();
        let full_seconds = now.clamp(1, RATE_WINDOW_S - 1);
        serde_json::json!({
            "received": g.received,
            "rate": recent as f64 / full_seconds as f64,
            "held": g.ring.len(),
            "edges": g.graph.edge_count(),
            "observers": g.feeds,
            "clients": g.clients.iter().filter(|c| !c.tx.is_closed()).map(|c| serde_json::json!({
                "id": c.id, "peer": c.peer, "filter": c.filter,
                "queued": QUEUE - c.tx.capacity(), "queue": QUEUE,
                "sent": c.sent.load(Ordering::Relaxed),
                "dropped": c.dropped.load(Ordering::Relaxed),
                "skipped": c.skipped.load(Ordering::Relaxed),
            })).collect::<Vec<_>>(),
            "limits": {"ring": RING, "queue": QUEUE, "batch": BATCH, "clients": MAX_CLIENTS,
                "flush_ms": FLUSH.as_millis() as u64},
            "rss_bytes": rss_bytes(),
        })
    }
}

/// This process's resident memory (`/proc/self/statm`), 0 if unreadable.
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ui::flow::tests::flow;

    fn drain(rx: &mut mpsc::Receiver<Msg>) -> Vec<Msg> {
        let mut out = Vec::new();
        while let Ok(m) = rx.try_recv() {
            out.push(m);
        }
        out
    }

    fn flows_in(msgs: &[Msg]) -> usize {
        msgs.iter()
            .map(|m| match m {
                Msg::Flows(j) => serde_json::from_str::<Vec<serde_json::Value>>(j)
                    .unwrap()
                    .len(),
                _ => 0,
            })
            .sum()
    }

    #[test]
    fn a_new_client_gets_mesh_map_and_backlog_then_only_what_matches() {
        let hub = Hub::new();
        let feed = hub.add_feed("c1", "n1", "198.18.1.11:4245");
        let a = ("c1", "echo-1-1", 65537);
        let b = ("c2", "echo-1-1", 131073);
        hub.ingest(feed, "c1/n1", &flow(a, b, false));
        let (f, _) = Filter::parse("verdict=DROPPED").unwrap();
        let (client, mut rx) = hub.subscribe(f, 100, "test".into()).unwrap();
        let first = drain(&mut rx);
        assert!(matches!(first[0], Msg::Mesh(_)));
        assert!(matches!(first[1], Msg::Map(_)));
        assert_eq!(flows_in(&first), 0, "the forwarded flow does not match");
        hub.ingest(feed, "c2/n1", &flow(a, b, true));
        hub.ingest(feed, "c1/n1", &flow(a, b, false));
        hub.flush();
        let next = drain(&mut rx);
        assert_eq!(flows_in(&next), 1);
        let Msg::Flows(json) = &next[0] else {
            panic!("{next:?}")
        };
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v[0]["verdict"], "DROPPED");
        assert_eq!(v[0]["node"], "c2/n1");
        assert_eq!(client.sent.load(Ordering::Relaxed), 1);
        assert_eq!(hub.feeds()[0].flows, 3);
    }

    #[test]
    fn a_client_that_does_not_read_costs_a_bounded_queue_and_counts_what_it_missed() {
        let hub = Hub::new();
        let feed = hub.add_feed("c1", "n1", "x");
        let (client, mut rx) = hub.subscribe(Filter::default(), 0, "slow".into()).unwrap();
        let f = flow(("c1", "a", 65537), ("c2", "b", 131073), false);
        let rounds = QUEUE * 3;
        for _ in 0..rounds {
            for _ in 0..10 {
                hub.ingest(feed, "c1/n1", &f);
            }
            hub.flush();
        }
        let got = drain(&mut rx);
        assert!(got.len() <= QUEUE, "{} messages queued", got.len());
        let delivered = flows_in(&got) as u64;
        let dropped = client.dropped.load(Ordering::Relaxed);
        assert!(dropped > 0);
        assert_eq!(
            delivered + dropped,
            (rounds * 10) as u64,
            "every flow is either sent or counted"
        );
        let stats = hub.stats();
        assert_eq!(stats["clients"][0]["dropped"], dropped);
        // A batch never exceeds BATCH flows; the excess is counted too.
        for _ in 0..(BATCH + 5) {
            hub.ingest(feed, "c1/n1", &f);
        }
        hub.flush();
        let got = drain(&mut rx);
        assert_eq!(flows_in(&got), BATCH);
        assert_eq!(client.dropped.load(Ordering::Relaxed), dropped + 5);
    }

    #[test]
    fn closed_clients_are_forgotten_and_the_limit_holds() {
        let hub = Hub::new();
        let mut keep = Vec::new();
        for i in 0..MAX_CLIENTS {
            keep.push(hub.subscribe(Filter::default(), 0, format!("{i}")).unwrap());
        }
        assert!(hub
            .subscribe(Filter::default(), 0, "one too many".into())
            .is_err());
        keep.pop();
        assert!(hub
            .subscribe(Filter::default(), 0, "room again".into())
            .is_ok());
    }

    #[test]
    fn flows_endpoint_returns_the_last_matching_oldest_first() {
        let hub = Hub::new();
        let feed = hub.add_feed("c1", "n1", "x");
        for i in 0..5 {
            hub.ingest(
                feed,
                "c1/n1",
                &flow(
                    ("c1", &format!("p{i}"), 65537),
                    ("c2", "b", 131073),
                    i % 2 == 0,
                ),
            );
        }
        let (f, _) = Filter::parse("verdict=DROPPED").unwrap();
        let v: serde_json::Value = serde_json::from_str(&hub.flows_json(&f, 2)).unwrap();
        assert_eq!(v["matched"], 3);
        assert_eq!(v["received"], 5);
        let flows = v["flows"].as_array().unwrap();
        assert_eq!(flows.len(), 2);
        assert_eq!(flows[0]["source"]["pod_name"], "p2");
        assert_eq!(flows[1]["source"]["pod_name"], "p4");
        assert_eq!(v["filter"]["verdict"][0], "DROPPED");
    }
}
