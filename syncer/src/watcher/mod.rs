//! The one list → watch machine of the crate (kube-rs's `watcher` and `reflector` are the
//! model): [`Watcher`] turns one etcd prefix into a stream of [`Event`]s, and a
//! [`Reflector`] applies them to a [`Store`], deciding what changed. The remote-cluster
//! sessions ([`crate::remote`]) and the agent's reader of its own cluster both run on it,
//! so both read etcd by the same rules:
//!
//! * **List, then watch from `revision + 1`.** A consistent list (paged, every page pinned
//!   to the first page's revision, [`crate::list`]) gives the state at revision `R`; a watch
//!   started at `R + 1` delivers every change after it exactly once, so nothing is missed
//!   between the two. The machine yields [`Event::Init`], one [`Event::InitApply`] per
//!   listed key, [`Event::InitDone`], then [`Event::Apply`] / [`Event::Delete`] per change.
//! * **Relist instead of failing** when the watch cannot go on from where it is: its start
//!   revision was compacted (etcd cancels it with `compact_revision` set), or its consumer
//!   fell behind the watch stream it shares ([`mux`]). The machine starts over with
//!   [`Event::Init`]; everything else (a broken connection, another etcd behind it) is an
//!   [`Error`], and the caller reconnects with jittered backoff ([`crate::remote::Backoff`])
//!   and builds a new [`Watcher`], which relists.
//! * **The store swaps in on `InitDone`.** A list is collected aside and replaces the store
//!   in one step when it is complete, so a reader never sees half a list; the keys the store
//!   held that the list lacks come out as deletes (the stale sweep: deletions missed while
//!   disconnected are repaired), and only keys whose bytes changed as upserts, so a relist
//!   of unchanged data produces no changes at all.
//! * **One rule for a bad value: keep the last good one, and count it.** A value the
//!   caller's decoder refuses never replaces a good one (in a list or a watch); a key that
//!   never had a good value is absent. [`Reflector::refused`] counts them.
//! * **etcd cluster ID lock.** Every response header carries the etcd cluster ID; the first
//!   one a [`Conn`] sees is locked in, and a different one later (a load balancer switching
//!   to another etcd, a wiped etcd behind the same address) is an error, because revisions
//!   no longer compare. A response without a header is treated the same way.
//! * **Large values.** Lists and watches accept big messages (a hostile value must not turn
//!   into an endless reconnect loop); the caller's decoder rejects each oversized value on
//!   its own.
//!
//! It never writes to etcd and knows nothing of what the values mean.

pub(crate) mod mux;
mod store;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clustermesh_types::model::SmolStr;
use etcd_client::{EventType, ResponseHeader, WatchOptions};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

pub use store::{digest, Change, Digest, Reflector, Step, Store, Stored};

use crate::Client;
use mux::{Ended, Mux, Watch};

/// Timeout of a single get or list page.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of the machine: the connection cannot go on, reconnect.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An etcd request failed or timed out.
    #[error(transparent)]
    Syncer(#[from] crate::Error),
    /// The etcd cluster behind the connection changed.
    #[error("etcd cluster ID changed from {locked:x} to {seen:x}: reconnecting for a full resync")]
    ClusterIdChanged {
        /// The ID locked in at the connection's first response.
        locked: u64,
        /// The ID seen now.
        seen: u64,
    },
    /// An etcd response carried no header.
    #[error("invalid etcd response to {what}: no header")]
    InvalidResponse {
        /// The request.
        what: String,
    },
    /// A watch's consumer fell behind the watch stream it shares (a [`Watcher`] relists
    /// instead; a single key's watch cannot).
    #[error("watch of {prefix} fell behind the shared watch stream")]
    WatchLagged {
        /// The prefix or key.
        prefix: String,
    },
    /// A watch ended for another reason than compaction or lag.
    #[error("watch of {prefix} ended: {reason}")]
    WatchEnded {
        /// The prefix or key.
        prefix: String,
        /// Why.
        reason: String,
    },
}

/// Result of the machine.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Locks the etcd cluster ID of a connection's first response and checks every later one.
#[derive(Debug, Default)]
pub(crate) struct Guard(AtomicU64);

impl Guard {
    pub(crate) fn check(&self, header: Option<&ResponseHeader>, what: &str) -> Result<()> {
        let id = header
            .map(ResponseHeader::cluster_id)
            .filter(|id| *id != 0)
            .ok_or_else(|| Error::InvalidResponse {
                what: what.to_owned(),
            })?;
        match self
            .0
            .compare_exchange(0, id, Ordering::SeqCst, Ordering::SeqCst)
        {
            Ok(_) => Ok(()),
            Err(locked) if locked == id => Ok(()),
            Err(locked) => Err(Error::ClusterIdChanged { locked, seen: id }),
        }
    }

    /// The locked ID (0 before the first response).
    pub(crate) fn id(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// What the machine reads through: a connection, the watch stream its watches share, and
/// the etcd cluster ID lock of one session. Shared behind an `Arc` by every watcher of the
/// session (an etcd client is several KiB; a task future holding one by value would be that
/// much bigger).
pub struct Conn {
    pub(crate) client: Client,
    pub(crate) mux: Arc<Mux>,
    pub(crate) guard: Guard,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("etcd_cluster_id", &self.guard.id())
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// A session over `client` with a watch stream of its own.
    pub fn new(client: Client) -> Arc<Self> {
        let mux = Mux::new(client.0.clone());
        Self::shared(client, mux)
    }

    /// A session over `client` whose watches go through `mux` (shared by sessions that use
    /// the same connection).
    pub(crate) fn shared(client: Client, mux: Arc<Mux>) -> Arc<Self> {
        Arc::new(Self {
            client,
            mux,
            guard: Guard::default(),
        })
    }

    /// Reads one key: its value and the response's revision.
    pub(crate) async fn get(&self, key: &str) -> Result<(Option<Bytes>, i64)> {
        let mut kv = self.client.0.kv_client();
        let mut resp = tokio::time::timeout(REQUEST_TIMEOUT, kv.get(key, None))
            .await
            .map_err(|_| crate::Error::RequestTimeout {
                op: "get",
                key: key.to_owned(),
                after: REQUEST_TIMEOUT,
            })?
            .map_err(|source| crate::Error::Etcd {
                op: "get",
                key: key.to_owned(),
                source,
            })?;
        self.guard.check(resp.header(), key)?;
        let rev = resp.header().map(ResponseHeader::revision).unwrap_or(0);
        let value = resp
            .take_kvs()
            .into_iter()
            .next()
            .map(|kv| Bytes::from(kv.into_key_value().1));
        Ok((value, rev))
    }

    /// A watch of `key` (a prefix with `with_prefix` options) on the shared stream.
    pub(crate) async fn watch(&self, key: &str, options: WatchOptions) -> Result<Watch> {
        self.mux
            .watch(key, options)
            .await
            .map_err(|e| ended(key, e))
    }

    /// Whether `key` exists.
    pub async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.get(key).await?.0.is_some())
    }

    /// Waits until `key` exists (a synced canary): a get, then, if it is absent, a watch of
    /// the key from the get's revision + 1, so a put between the two is not missed. With
    /// `permits` the get holds one permit (many readers of one etcd, KVStoreMesh mode).
    pub async fn wait_for_key(&self, key: &str, permits: Option<&Arc<Semaphore>>) -> Result<()> {
        let permit = match permits {
            Some(p) => p.clone().acquire_owned().await.ok(),
            None => None,
        };
        let (value, rev) = self.get(key).await?;
        drop(permit);
        if value.is_some() {
            return Ok(());
        }
        let opts = WatchOptions::new().with_start_revision(rev + 1);
        let mut watch = self.watch(key, opts).await?;
        loop {
            let resp = self.message(&mut watch, key).await?;
            if resp.canceled() {
                return Err(Error::WatchEnded {
                    prefix: key.to_owned(),
                    reason: format!("canceled: {}", resp.cancel_reason()),
                });
            }
            if resp
                .events()
                .iter()
                .any(|e| e.event_type() == EventType::Put)
            {
                return Ok(());
            }
        }
    }

    /// The next response of `watch`, its cluster ID checked.
    pub(crate) async fn message(
        &self,
        watch: &mut Watch,
        key: &str,
    ) -> Result<Box<etcd_client::WatchResponse>> {
        let resp = watch.message().await.map_err(|e| ended(key, e))?;
        self.guard.check(resp.header(), key)?;
        Ok(resp)
    }
}

/// The error for a watch of `key` that ended.
fn ended(key: &str, e: Ended) -> Error {
    match e {
        Ended::Lagged => Error::WatchLagged {
            prefix: key.to_owned(),
        },
        Ended::Failed(reason) => Error::WatchEnded {
            prefix: key.to_owned(),
            reason,
        },
    }
}

/// One key and its value, the key relative to the watched prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// The key after the prefix (never empty).
    pub key: SmolStr,
    /// The raw value.
    pub value: Bytes,
}

/// What the machine yields (kube-rs's `watcher::Event`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A (re)list begins: what follows up to [`Event::InitDone`] is the whole prefix.
    Init,
    /// One listed key.
    InitApply(Kv),
    /// The list is complete.
    InitDone,
    /// A key was created or changed after the list.
    Apply(Kv),
    /// A key was deleted after the list.
    Delete(SmolStr),
}

enum State {
    /// Nothing listed (yet, or again): the next step lists.
    Empty,
    /// Listed at `revision`; yielding the listed keys. The read permit (KVStoreMesh mode)
    /// is held until they are all handed out.
    Listing {
        kvs: std::vec::IntoIter<Kv>,
        revision: i64,
        _permit: Option<OwnedSemaphorePermit>,
    },
    /// Every listed key handed out: the next step starts the watch.
    Listed { revision: i64 },
    /// Watching; `pending` holds the rest of the last response.
    Watching {
        watch: Watch,
        pending: VecDeque<Event>,
    },
}

/// The list → watch machine for one prefix; see the [module docs](self).
pub struct Watcher {
    conn: Arc<Conn>,
    prefix: String,
    permits: Option<Arc<Semaphore>>,
    state: State,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watcher")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Watcher {
    /// A machine for `prefix` (`/`-terminated) over `conn`. With `permits`, each list holds
    /// one permit from its first request until its last key is handed out: many readers of
    /// one etcd (KVStoreMesh mode) then hold only that many listed prefixes at a time.
    pub fn new(
        conn: Arc<Conn>,
        prefix: impl Into<String>,
        permits: Option<Arc<Semaphore>>,
    ) -> Self {
        Self {
            conn,
            prefix: prefix.into(),
            permits,
            state: State::Empty,
        }
    }

    /// The watched prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The next event. After an error the machine starts over (relists) if called again.
    pub async fn next(&mut self) -> Result<Event> {
        let result = self.step().await;
        if result.is_err() {
            self.state = State::Empty;
        }
        result
    }

    async fn step(&mut self) -> Result<Event> {
        loop {
            match &mut self.state {
                State::Empty => {
                    let permit = match &self.permits {
                        Some(p) => p.clone().acquire_owned().await.ok(),
                        None => None,
                    };
                    // Boxed: the list future is several KiB, and a task's size is that of its
                    // largest state, kept for as long as the task lives.
                    let (kvs, revision) = Box::pin(self.list()).await?;
                    debug!(prefix = %self.prefix, revision, keys = kvs.len(), "listed");
                    self.state = State::Listing {
                        kvs: kvs.into_iter(),
                        revision,
                        _permit: permit,
                    };
                    return Ok(Event::Init);
                }
                State::Listing { kvs, revision, .. } => match kvs.next() {
                    Some(kv) => return Ok(Event::InitApply(kv)),
                    None => {
                        let revision = *revision;
                        self.state = State::Listed { revision };
                        return Ok(Event::InitDone);
                    }
                },
                State::Listed { revision } => {
                    let opts = WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(*revision + 1);
                    match self.conn.watch(&self.prefix, opts).await {
                        Ok(watch) => {
                            self.state = State::Watching {
                                watch,
                                pending: VecDeque::new(),
                            }
                        }
                        Err(Error::WatchLagged { .. }) => self.relist(),
                        Err(e) => return Err(e),
                    }
                }
                State::Watching { watch, pending } => {
                    if let Some(event) = pending.pop_front() {
                        return Ok(event);
                    }
                    let resp = match self.conn.message(watch, &self.prefix).await {
                        Ok(resp) => resp,
                        Err(Error::WatchLagged { .. }) => {
                            self.relist();
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if resp.canceled() {
                        if resp.compact_revision() > 0 {
                            info!(prefix = %self.prefix, revision = resp.compact_revision(),
                                "watch start revision compacted: relisting");
                            self.state = State::Empty;
                            continue;
                        }
                        return Err(Error::WatchEnded {
                            prefix: self.prefix.clone(),
                            reason: format!("canceled: {}", resp.cancel_reason()),
                        });
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Some(key) = relative(&self.prefix, kv.key()) else {
                            continue;
                        };
                        pending.push_back(match ev.event_type() {
                            EventType::Put => Event::Apply(Kv {
                                key,
                                value: Bytes::copy_from_slice(kv.value()),
                            }),
                            EventType::Delete => Event::Delete(key),
                        });
                    }
                }
            }
        }
    }

    /// The watch fell behind the stream it shares: like after compaction, relist.
    fn relist(&mut self) {
        info!(prefix = %self.prefix, "watch fell behind the shared watch stream: relisting");
        self.state = State::Empty;
    }

    /// Every key under the prefix at one revision (keys relative to it), checking the
    /// cluster ID of every page; keys that are not UTF-8 are skipped.
    async fn list(&self) -> Result<(Vec<Kv>, i64)> {
        let (conn, prefix) = (&self.conn, self.prefix.as_str());
        let mut out = Vec::new();
        let revision = crate::list::pages(
            &conn.client,
            prefix,
            Some(REQUEST_TIMEOUT),
            |resp| -> Result<()> {
                conn.guard.check(resp.header(), prefix)?;
                for item in resp.take_kvs() {
                    let (key, value) = item.into_key_value();
                    if let Some(key) = relative(prefix, &key) {
                        out.push(Kv {
                            key,
                            value: Bytes::from(value),
                        });
                    }
                }
                Ok(())
            },
        )
        .await?;
        Ok((out, revision))
    }
}

/// `key` relative to `prefix`, if it is under it, UTF-8 and not the prefix itself.
fn relative(prefix: &str, key: &[u8]) -> Option<SmolStr> {
    let rest = key.strip_prefix(prefix.as_bytes())?;
    if rest.is_empty() {
        return None;
    }
    std::str::from_utf8(rest).ok().map(SmolStr::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_relative_to_the_prefix() {
        let p = "cilium/state/nodes/v1/c2/";
        assert_eq!(
            relative(p, b"cilium/state/nodes/v1/c2/n1").as_deref(),
            Some("n1")
        );
        assert_eq!(relative(p, b"cilium/state/nodes/v1/c2/"), None);
        assert_eq!(relative(p, b"cilium/state/nodes/v1/c22/n1"), None);
        assert_eq!(relative(p, b"cilium/state/nodes/v1/c2/\xff"), None);
    }
}
