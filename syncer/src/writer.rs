//! A leased, batched, reconciling key-value writer: the apiserver's only path into etcd.
//!
//! The caller hands it the complete desired contents of a prefix; the writer diffs that
//! against what it knows is in etcd and sends only the difference, in transactions of at most
//! [`Config::txn_ops`] operations with [`Config::in_flight`] transactions in flight (etcd 3.4
//! caps a transaction at 128 operations; single puts are ~30x slower, see TOOLCHAIN.md).
//!
//! Every key carries a lease of [`Config::lease_ttl`]; a lease holds at most
//! [`Config::max_keys_per_lease`] keys (etcd issue 15993: put latency grows with the keys
//! attached to a lease). The keep-alive task reports leases that expired (etcd was away for
//! longer than the TTL, or someone revoked them); their keys are forgotten, so the next sync
//! writes them again.
//!
//! Restarts reconcile instead of rewriting: [`Writer::adopt`] reads what an earlier writer
//! left under a prefix, keeps its still-alive leases alive, and the first sync then only
//! touches keys whose value differs. Unchanged keys produce no watch events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{PutOptions, Txn, TxnOp};
use tokio::sync::{mpsc, Notify};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::{scope_of, Metrics, ScopeLabels};
use crate::{Client, Error, Result};

/// Writer settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// TTL of every lease (Cilium default 15 min; valid 25 s – 24 h).
    pub lease_ttl: Duration,
    /// Keys per lease before a new one is granted (Cilium: 1000).
    pub max_keys_per_lease: usize,
    /// Operations per transaction (etcd 3.4 default `--max-txn-ops` is 128).
    pub txn_ops: usize,
    /// Bytes of values per transaction (etcd's default request limit is 1.5 MiB).
    pub txn_bytes: usize,
    /// Transactions in flight at once.
    pub in_flight: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15 * 60),
            max_keys_per_lease: 1000,
            txn_ops: 128,
            txn_bytes: 1024 * 1024,
            in_flight: 8,
        }
    }
}

impl Config {
    /// Checks the ranges Cilium accepts.
    pub fn validate(&self) -> Result<()> {
        let ttl = self.lease_ttl.as_secs();
        if !(25..=86400).contains(&ttl) {
            return Err(Error::InvalidConfig(format!(
                "lease TTL {ttl}s is outside 25s..=86400s"
            )));
        }
        if self.max_keys_per_lease == 0 || self.txn_ops == 0 || self.in_flight == 0 {
            return Err(Error::InvalidConfig(
                "max keys per lease, txn ops and in-flight must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// What one sync changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Keys written (new or changed, or re-leased).
    pub put: usize,
    /// Stale keys deleted.
    pub deleted: usize,
    /// Keys already correct.
    pub unchanged: usize,
}

#[derive(Debug, Clone)]
struct Known {
    value: Vec<u8>,
    /// 0 = no usable lease (must be re-written with one).
    lease: i64,
}

#[derive(Debug, Default)]
struct Leases {
    counts: HashMap<i64, usize>,
    current: Option<i64>,
    /// Granted ahead of need (a large first sync grants its leases concurrently).
    spare: Vec<i64>,
}

/// The writer. Not `Clone`: one writer owns a set of prefixes.
pub struct Writer {
    client: Client,
    cfg: Config,
    known: BTreeMap<String, Known>,
    leases: Leases,
    register: mpsc::UnboundedSender<i64>,
    lost: mpsc::UnboundedReceiver<i64>,
    lease_lost: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("known", &self.known.len())
            .field("leases", &self.leases.counts.len())
            .finish()
    }
}

impl Writer {
    /// Creates a writer and its lease keep-alive task; the caller runs the task (in its
    /// `JoinSet`) until `cancel` fires.
    pub fn new(
        client: Client,
        cfg: Config,
        metrics: Arc<Metrics>,
        cancel: CancellationToken,
    ) -> Result<(Self, impl std::future::Future<Output = ()> + Send + 'static)> {
        cfg.validate()?;
        let (register, register_rx) = mpsc::unbounded_channel();
        let (lost_tx, lost) = mpsc::unbounded_channel();
        let lease_lost = Arc::new(Notify::new());
        let task = keep_alive_loop(
            client.clone(),
            cfg.lease_ttl,
            register_rx,
            lost_tx,
            lease_lost.clone(),
            metrics.clone(),
            cancel,
        );
        Ok((
            Self {
                client,
                cfg,
                known: BTreeMap::new(),
                leases: Leases::default(),
                register,
                lost,
                lease_lost,
                metrics,
            },
            task,
        ))
    }

    /// Notified whenever a lease was lost; the owner should sync every prefix again.
    pub fn lease_lost(&self) -> Arc<Notify> {
        self.lease_lost.clone()
    }

    /// The etcd client this writer uses.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Number of keys the writer believes it owns.
    pub fn known_keys(&self) -> usize {
        self.known.len()
    }

    /// Whether the writer holds `key` with a live lease.
    pub fn knows(&self, key: &str) -> bool {
        self.known.get(key).map(|k| k.lease != 0).unwrap_or(false)
    }

    /// Like [`Writer::adopt`] for one exact key.
    pub async fn adopt_key(&mut self, key: &str) -> Result<bool> {
        let (kvs, _) = crate::list::list_prefix(&self.client, key).await?;
        let exact: Vec<_> = kvs.into_iter().filter(|kv| kv.key == key).collect();
        Ok(self.adopt_listed(exact).await > 0)
    }

    /// [`Writer::adopt`] for several prefixes and [`Writer::adopt_key`] for several exact
    /// keys, with every list request in flight at once (a restart adopts a dozen prefixes
    /// and keys; one round trip after the other added up). Returns the keys adopted.
    pub async fn adopt_all(&mut self, prefixes: &[String], keys: &[String]) -> Result<usize> {
        let mut set = JoinSet::new();
        for (i, p) in prefixes.iter().chain(keys).enumerate() {
            let (client, p) = (self.client.clone(), p.clone());
            set.spawn(async move { (i, crate::list::list_prefix(&client, &p).await) });
        }
        let mut lists: Vec<Vec<crate::list::Kv>> = vec![Vec::new(); prefixes.len() + keys.len()];
        while let Some(joined) = set.join_next().await {
            let (i, listed) = joined.map_err(|e| Error::Internal(e.to_string()))?;
            lists[i] = listed?.0;
        }
        let mut adopted = 0;
        for (i, kvs) in lists.into_iter().enumerate() {
            let kvs = match i.checked_sub(prefixes.len()) {
                Some(k) => kvs.into_iter().filter(|kv| kv.key == keys[k]).collect(),
                None => kvs,
            };
            adopted += self.adopt_listed(kvs).await;
        }
        Ok(adopted)
    }

    /// Number of leases in use.
    pub fn lease_count(&self) -> usize {
        self.leases.counts.len()
    }

    /// Reads what is already stored under `prefix` so that the next sync only writes the
    /// difference. Keys whose lease is still alive keep it (and it is kept alive from now on).
    pub async fn adopt(&mut self, prefix: &str) -> Result<usize> {
        let (kvs, _rev) = crate::list::list_prefix(&self.client, prefix).await?;
        let adopted = self.adopt_listed(kvs).await;
        debug!(prefix, adopted, "adopted existing keys");
        Ok(adopted)
    }

    /// Takes listed keys as known; a key whose lease is still alive keeps it (asked once per
    /// lease), any other key is re-written with a lease by the next sync.
    async fn adopt_listed(&mut self, kvs: Vec<crate::list::Kv>) -> usize {
        let mut alive: HashMap<i64, bool> = HashMap::new();
        let mut adopted = 0;
        for kv in kvs {
            let lease = kv.lease;
            let ok = if lease == 0 {
                false
            } else if let Some(ok) = alive.get(&lease) {
                *ok
            } else {
                let ttl = self
                    .client
                    .0
                    .lease_client()
                    .time_to_live(lease, None)
                    .await
                    .map(|r| r.ttl())
                    .unwrap_or(-1);
                let ok = ttl > 0;
                alive.insert(lease, ok);
                if ok && !self.leases.counts.contains_key(&lease) {
                    self.leases.counts.insert(lease, 0);
                    let _ = self.register.send(lease);
                }
                ok
            };
            if ok {
                *self.leases.counts.entry(lease).or_insert(0) += 1;
            }
            self.known.insert(
                kv.key,
                Known {
                    value: kv.value,
                    lease: if ok { lease } else { 0 },
                },
            );
            adopted += 1;
        }
        adopted
    }

    fn drain_lost(&mut self) {
        let mut lost = HashSet::new();
        while let Ok(id) = self.lost.try_recv() {
            lost.insert(id);
        }
        if lost.is_empty() {
            return;
        }
        for id in &lost {
            self.leases.counts.remove(id);
            if self.leases.current == Some(*id) {
                self.leases.current = None;
            }
        }
        let mut forgotten = 0;
        for k in self.known.values_mut() {
            if lost.contains(&k.lease) {
                k.lease = 0;
                forgotten += 1;
            }
        }
        warn!(
            leases = lost.len(),
            keys = forgotten,
            "etcd leases lost; their keys will be re-written"
        );
    }

    async fn lease_for_new_key(&mut self) -> Result<i64> {
        if let Some(cur) = self.leases.current {
            if self.leases.counts.get(&cur).copied().unwrap_or(0) < self.cfg.max_keys_per_lease {
                *self.leases.counts.entry(cur).or_insert(0) += 1;
                return Ok(cur);
            }
        }
        let id = match self.leases.spare.pop() {
            Some(id) => id,
            None => {
                let id = grant(&self.client, self.cfg.lease_ttl, &self.metrics).await?;
                let _ = self.register.send(id);
                id
            }
        };
        self.leases.counts.insert(id, 1);
        self.leases.current = Some(id);
        Ok(id)
    }

    fn release(&mut self, lease: i64) {
        if lease == 0 {
            return;
        }
        if let Some(c) = self.leases.counts.get_mut(&lease) {
            *c = c.saturating_sub(1);
        }
    }

    /// Makes the keys under `prefix` exactly `desired` (every desired key must start with
    /// `prefix`). Sends only changed keys and deletes stale ones.
    pub async fn sync_prefix(
        &mut self,
        prefix: &str,
        desired: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Stats> {
        let stats = self.sync_prefixes(&[(prefix, desired)]).await?;
        Ok(stats.into_iter().next().unwrap_or_default())
    }

    /// Like [`Writer::sync_prefix`] for several prefixes at once, in one pipeline of
    /// transactions (the tail of one prefix overlaps the head of the next). Returns the
    /// stats per prefix, in order.
    pub async fn sync_prefixes(
        &mut self,
        stores: &[(&str, &BTreeMap<String, Vec<u8>>)],
    ) -> Result<Vec<Stats>> {
        let pending = self.begin_sync(stores).await?;
        self.finish(pending).await
    }

    /// The first half of [`Writer::sync_prefixes`]: diffs, assigns leases and starts the
    /// transactions in a task of their own, then returns at once. The caller may compute
    /// the next batch while etcd works, then must call [`Writer::finish`] before any other
    /// write, except another `begin_sync` of disjoint prefixes: leases are accounted here
    /// and keys recorded by `finish`, so two pending syncs of different prefixes may overlap
    /// (the apiserver's streamed first export starts the service stores beside the endpoint
    /// stores). (Computing inside a `join!` next to the sync is not the same: the sync's future
    /// is then not polled while the computation runs, so no new transaction starts.)
    pub async fn begin_sync(
        &mut self,
        stores: &[(&str, &BTreeMap<String, Vec<u8>>)],
    ) -> Result<PendingSync> {
        self.drain_lost();
        let mut all_stats = vec![Stats::default(); stores.len()];
        let mut puts: Vec<(String, Vec<u8>)> = Vec::new();
        let mut deletes: Vec<String> = Vec::new();
        for ((prefix, desired), stats) in stores.iter().zip(all_stats.iter_mut()) {
            for (k, v) in desired.iter() {
                debug_assert!(k.starts_with(prefix), "{k} outside {prefix}");
                match self.known.get(k) {
                    Some(known) if known.value == *v && known.lease != 0 => stats.unchanged += 1,
                    _ => {
                        stats.put += 1;
                        puts.push((k.clone(), v.clone()));
                    }
                }
            }
            for (k, _) in self
                .known
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .filter(|(k, _)| !desired.contains_key(*k))
            {
                stats.deleted += 1;
                deletes.push(k.clone());
            }
        }
        let scope = stores.first().map(|(p, _)| *p).unwrap_or("");
        let batches = self.prepare(puts, deletes).await?;
        Ok(PendingSync {
            task: self.spawn_pipeline(scope, batches),
            stats: all_stats,
        })
    }

    /// Waits for the transactions of [`Writer::begin_sync`] and records what they wrote.
    /// Returns the stats per prefix, or the first error (keys of failed transactions are
    /// written again by the next sync).
    pub async fn finish(&mut self, mut pending: PendingSync) -> Result<Vec<Stats>> {
        let done = (&mut pending.task)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        let mut total = Stats::default();
        self.record(done, &mut total)?;
        Ok(std::mem::take(&mut pending.stats))
    }

    /// Applies key-level changes in one pipeline (one transaction for up to
    /// [`Config::txn_ops`] of them): `Some(value)` puts the key unless the writer already
    /// holds that value, `None` deletes it if the writer owns it. The incremental export's
    /// write: the known keys stay the mirror a later [`Writer::sync_prefixes`] diffs against.
    pub async fn apply_changes(
        &mut self,
        changes: Vec<(String, Option<Vec<u8>>)>,
    ) -> Result<Stats> {
        self.drain_lost();
        let mut stats = Stats::default();
        let mut puts = Vec::new();
        let mut deletes = Vec::new();
        for (k, v) in changes {
            match v {
                Some(v) => match self.known.get(&k) {
                    Some(known) if known.value == v && known.lease != 0 => stats.unchanged += 1,
                    _ => puts.push((k, v)),
                },
                None if self.known.contains_key(&k) => deletes.push(k),
                None => {}
            }
        }
        let scope = puts
            .first()
            .map(|(k, _)| k.clone())
            .or_else(|| deletes.first().cloned())
            .unwrap_or_default();
        self.apply(&scope, puts, deletes, &mut stats).await?;
        Ok(stats)
    }

    /// How many keys the writer holds under `prefix`.
    pub fn count_prefix(&self, prefix: &str) -> usize {
        self.known
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .count()
    }

    /// Writes several single keys (leased) in one pipeline, skipping those already current.
    pub async fn put_keys(&mut self, keys: Vec<(String, Vec<u8>)>) -> Result<usize> {
        self.drain_lost();
        let puts: Vec<(String, Vec<u8>)> = keys
            .into_iter()
            .filter(|(k, v)| {
                !self
                    .known
                    .get(k)
                    .map(|x| x.value == *v && x.lease != 0)
                    .unwrap_or(false)
            })
            .collect();
        let n = puts.len();
        let scope = puts.first().map(|(k, _)| k.clone()).unwrap_or_default();
        let mut stats = Stats::default();
        self.apply(&scope, puts, Vec::new(), &mut stats).await?;
        Ok(n)
    }

    /// Writes one key (leased) unless the writer knows it already holds `value`.
    /// Returns whether it wrote.
    pub async fn put_key(&mut self, key: &str, value: Vec<u8>) -> Result<bool> {
        self.drain_lost();
        if let Some(k) = self.known.get(key) {
            if k.value == value && k.lease != 0 {
                return Ok(false);
            }
        }
        let mut stats = Stats::default();
        self.apply(key, vec![(key.to_string(), value)], Vec::new(), &mut stats)
            .await?;
        Ok(true)
    }

    /// Writes one key even if the writer believes it is current (heartbeat), or when the
    /// stored value may have been changed behind its back (periodic enforcement).
    pub async fn force_put_key(&mut self, key: &str, value: Vec<u8>) -> Result<()> {
        if let Some(k) = self.known.get_mut(key) {
            k.value.clear();
            k.value.push(0xff); // never equal to a real value
        }
        self.put_key(key, value).await.map(|_| ())
    }

    /// Checks etcd for `key` and re-writes it if it is missing or differs (Cilium's
    /// `UpdateIfDifferent`, used to re-enforce the cluster config).
    pub async fn enforce_key(&mut self, key: &str, value: Vec<u8>) -> Result<bool> {
        let started = Instant::now();
        let res = self.client.0.get(key, None).await;
        self.metrics
            .observe("get", &scope_of(key), res.is_ok(), started.elapsed());
        let res = res.map_err(|source| Error::Etcd {
            op: "get",
            key: key.into(),
            source,
        })?;
        let current = res
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.lease()));
        let lease_ok = match &current {
            Some((_, lease)) => self.leases.counts.contains_key(lease),
            None => false,
        };
        if current.as_ref().map(|(v, _)| v == &value).unwrap_or(false) && lease_ok {
            return Ok(false);
        }
        self.force_put_key(key, value).await?;
        Ok(true)
    }

    /// Deletes one key if the writer owns it.
    pub async fn delete_key(&mut self, key: &str) -> Result<bool> {
        if !self.known.contains_key(key) {
            return Ok(false);
        }
        let mut stats = Stats::default();
        self.apply(key, Vec::new(), vec![key.to_string()], &mut stats)
            .await?;
        Ok(true)
    }

    async fn apply(
        &mut self,
        scope_key: &str,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
        stats: &mut Stats,
    ) -> Result<()> {
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let batches = self.prepare(puts, deletes).await?;
        let done = self
            .spawn_pipeline(scope_key, batches)
            .await
            .map_err(|e| Error::Internal(e.to_string()))?;
        self.record(done, stats)
    }

    /// Assigns a lease to every put (granting the leases a large batch needs concurrently)
    /// and cuts the operations into transactions.
    async fn prepare(
        &mut self,
        puts: Vec<(String, Vec<u8>)>,
        deletes: Vec<String>,
    ) -> Result<Vec<Vec<Op>>> {
        let needs_lease = puts
            .iter()
            .filter(|(k, _)| {
                !self
                    .known
                    .get(k)
                    .map(|k| k.lease != 0 && self.leases.counts.contains_key(&k.lease))
                    .unwrap_or(false)
            })
            .count();
        let room = self
            .leases
            .current
            .map(|c| {
                self.cfg
                    .max_keys_per_lease
                    .saturating_sub(self.leases.counts.get(&c).copied().unwrap_or(0))
            })
            .unwrap_or(0);
        let missing = needs_lease
            .saturating_sub(room)
            .div_ceil(self.cfg.max_keys_per_lease)
            .saturating_sub(self.leases.spare.len());
        if missing > 1 {
            let mut grants = JoinSet::new();
            for _ in 0..missing {
                let (client, ttl, metrics) = (
                    self.client.clone(),
                    self.cfg.lease_ttl,
                    self.metrics.clone(),
                );
                grants.spawn(async move { grant(&client, ttl, &metrics).await });
            }
            while let Some(g) = grants.join_next().await {
                let id = g.map_err(|e| Error::Internal(e.to_string()))??;
                let _ = self.register.send(id);
                self.leases.spare.push(id);
            }
        }
        let mut ops: Vec<Op> = Vec::with_capacity(puts.len() + deletes.len());
        for (key, value) in puts {
            let reuse = self
                .known
                .get(&key)
                .map(|k| k.lease)
                .filter(|l| *l != 0 && self.leases.counts.contains_key(l));
            let lease = match reuse {
                Some(l) => l,
                None => self.lease_for_new_key().await?,
            };
            ops.push(Op::Put { key, value, lease });
        }
        for key in deletes {
            ops.push(Op::Delete { key });
        }

        let mut batches: Vec<Vec<Op>> = Vec::new();
        let mut cur: Vec<Op> = Vec::new();
        let mut cur_bytes = 0;
        for op in ops {
            let size = op.size();
            if !cur.is_empty()
                && (cur.len() >= self.cfg.txn_ops || cur_bytes + size > self.cfg.txn_bytes)
            {
                batches.push(std::mem::take(&mut cur));
                cur_bytes = 0;
            }
            cur_bytes += size;
            cur.push(op);
        }
        if !cur.is_empty() {
            batches.push(cur);
        }
        Ok(batches)
    }

    /// Sends the transactions, [`Config::in_flight`] at a time, from a task of its own (so
    /// they keep flowing while the caller computes); yields every transaction with its result.
    fn spawn_pipeline(&self, scope_key: &str, batches: Vec<Vec<Op>>) -> JoinHandle<Vec<Done>> {
        let scope = scope_of(scope_key);
        let metrics = self.metrics.clone();
        let client = self.client.clone();
        let in_flight = self.cfg.in_flight;
        tokio::spawn(async move {
            let queue_labels = ScopeLabels {
                scope: scope.clone(),
            };
            let set_queue = |n: i64| metrics.sync_queue_size.get_or_create(&queue_labels).set(n);
            let mut remaining: i64 = batches.iter().map(|b| b.len() as i64).sum();
            set_queue(remaining);
            let mut done = Vec::with_capacity(batches.len());
            let mut pending = batches.into_iter();
            let mut set: JoinSet<Done> = JoinSet::new();
            loop {
                while set.len() < in_flight {
                    let Some(batch) = pending.next() else { break };
                    let mut kv = client.0.kv_client();
                    set.spawn(async move {
                        let started = Instant::now();
                        let txn_ops: Vec<TxnOp> = batch.iter().map(Op::to_txn_op).collect();
                        let res = kv.txn(Txn::new().and_then(txn_ops)).await.map(|_| ());
                        (batch, res, started.elapsed())
                    });
                }
                let Some(joined) = set.join_next().await else {
                    break;
                };
                match joined {
                    Ok(d) => {
                        metrics.observe("txn", &scope, d.1.is_ok(), d.2);
                        if d.1.is_err() {
                            metrics
                                .sync_errors
                                .get_or_create(&ScopeLabels {
                                    scope: scope.clone(),
                                })
                                .inc();
                        }
                        remaining -= d.0.len() as i64;
                        set_queue(remaining);
                        done.push(d);
                    }
                    // A transaction task cannot panic short of a bug in the client; its
                    // keys stay unknown and are written again by the next sync.
                    Err(e) => warn!(error = %e, "etcd transaction task failed"),
                }
            }
            set_queue(0);
            done
        })
    }

    /// Records the outcome of sent transactions: written keys become known (their old
    /// lease released), failed new keys give their lease slot back.
    fn record(&mut self, done: Vec<Done>, stats: &mut Stats) -> Result<()> {
        let mut first_err: Option<Error> = None;
        for (batch, res, _) in done {
            match res {
                Ok(()) => {
                    for op in batch {
                        match op {
                            Op::Put { key, value, lease } => {
                                if let Some(old) = self.known.insert(key, Known { value, lease }) {
                                    if old.lease != lease {
                                        self.release(old.lease);
                                    }
                                }
                                stats.put += 1;
                            }
                            Op::Delete { key } => {
                                if let Some(old) = self.known.remove(&key) {
                                    self.release(old.lease);
                                }
                                stats.deleted += 1;
                            }
                        }
                    }
                }
                Err(source) => {
                    // New keys that failed still count against their lease: undo that.
                    for op in &batch {
                        if let Op::Put { key, lease, .. } = op {
                            if self.known.get(key).map(|k| k.lease) != Some(*lease) {
                                self.release(*lease);
                            }
                        }
                    }
                    if first_err.is_none() {
                        first_err = Some(Error::Etcd {
                            op: "txn",
                            key: batch
                                .first()
                                .map(|o| o.key().to_string())
                                .unwrap_or_default(),
                            source,
                        });
                    }
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A transaction sent: its operations, the result, and how long it took.
type Done = (
    Vec<Op>,
    std::result::Result<(), etcd_client::Error>,
    Duration,
);

/// Transactions started by [`Writer::begin_sync`]; hand it to [`Writer::finish`]. Dropped
/// unfinished (the session ended), its remaining transactions are abandoned.
#[must_use = "a started sync must be finished with Writer::finish"]
pub struct PendingSync {
    task: JoinHandle<Vec<Done>>,
    stats: Vec<Stats>,
}

impl Drop for PendingSync {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for PendingSync {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingSync")
            .field("stores", &self.stats.len())
            .finish()
    }
}

enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: i64,
    },
    Delete {
        key: String,
    },
}

impl Op {
    fn size(&self) -> usize {
        match self {
            Op::Put { key, value, .. } => key.len() + value.len() + 16,
            Op::Delete { key } => key.len() + 16,
        }
    }
    fn key(&self) -> &str {
        match self {
            Op::Put { key, .. } | Op::Delete { key } => key,
        }
    }
    fn to_txn_op(&self) -> TxnOp {
        match self {
            Op::Put { key, value, lease } => TxnOp::put(
                key.as_bytes(),
                value.clone(),
                Some(PutOptions::new().with_lease(*lease)),
            ),
            Op::Delete { key } => TxnOp::delete(key.as_bytes(), None),
        }
    }
}

async fn grant(client: &Client, ttl: Duration, metrics: &Metrics) -> Result<i64> {
    let started = Instant::now();
    let res = client
        .0
        .clone()
        .lease_grant(ttl.as_secs() as i64, None)
        .await;
    metrics.observe("lease_grant", "lease", res.is_ok(), started.elapsed());
    Ok(res
        .map_err(|source| Error::Etcd {
            op: "grant lease",
            key: String::new(),
            source,
        })?
        .id())
}

/// Keeps every registered lease alive; reports leases etcd no longer knows.
async fn keep_alive_loop(
    client: Client,
    ttl: Duration,
    mut register: mpsc::UnboundedReceiver<i64>,
    lost: mpsc::UnboundedSender<i64>,
    notify: Arc<Notify>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let period = (ttl / 3).max(Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // lease → time of the last successful refresh
    let mut leases: HashMap<i64, Instant> = HashMap::new();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            Some(id) = register.recv() => { leases.insert(id, Instant::now()); }
            _ = tick.tick() => {
                let mut gone = Vec::new();
                for (id, last_ok) in leases.iter_mut() {
                    match refresh(&client, *id).await {
                        Ok(ttl_left) if ttl_left > 0 => *last_ok = Instant::now(),
                        Ok(_) => gone.push(*id),
                        Err(e) if e.to_string().contains("not found") => gone.push(*id),
                        Err(e) => {
                            if last_ok.elapsed() > ttl {
                                gone.push(*id);
                            } else {
                                debug!(lease = id, error = %e, "lease keep-alive failed; will retry");
                            }
                        }
                    }
                }
                if !gone.is_empty() {
                    for id in &gone {
                        leases.remove(id);
                        metrics.leases_lost.inc();
                        let _ = lost.send(*id);
                    }
                    info!(count = gone.len(), "leases expired");
                    notify.notify_one();
                }
            }
        }
    }
}

async fn refresh(client: &Client, id: i64) -> std::result::Result<i64, etcd_client::Error> {
    let mut lc = client.0.lease_client();
    let (mut keeper, mut stream) = lc.keep_alive(id).await?;
    keeper.keep_alive().await?;
    let ttl = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .map_err(|_| etcd_client::Error::InvalidArgs("keep-alive timed out".into()))??
        .map(|r| r.ttl())
        .unwrap_or(0);
    Ok(ttl)
}
