//! Benchmarks of the remote-cluster reader, each printed beside a baseline measured in the
//! same run:
//!
//! (a) propagation latency put → reader cache (event after the cache update), beside a plain
//!     etcd-client watch on the same range, for the same puts;
//! (c) decode (and full validation) of a ClusterService with 1k backends, beside parsing the
//!     same bytes into a `serde_json::Value`;
//! (b-lite) KVStoreMesh mode: R remotes × E endpoints read from one local etcd: time to ready
//!     and RSS growth per endpoint (the full 250 × 1000 profile belongs to the kvstoremesh work).
//!
//! `cargo run --release -p clustermesh-tests --bin bench-remote [-- --remotes R --endpoints E]`

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clustermesh_syncer::remote::validate::{validate, Context};
use clustermesh_syncer::remote::{Config, Event, Manager, Metrics, Mode, Resource};
use clustermesh_tests::etcd::TestEtcd;
use clustermesh_types::cluster::{ClusterInfo, ClusterName, IdentityRange, MaxConnectedClusters};
use clustermesh_types::model::ClusterService;
use etcd_client::{Client, EventType, Txn, TxnOp, WatchOptions};
use tokio_util::sync::CancellationToken;

const N_PUTS: usize = 2000;
const RATE_PER_SEC: u64 = 500;

fn local() -> ClusterInfo {
    ClusterInfo {
        name: ClusterName::new("cluster1").expect("valid name"),
        id: 1,
        max_connected_clusters: MaxConnectedClusters::Max255,
    }
}

fn ip_of(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256)
}

fn ip_entry(ip: &str, id: u32) -> String {
    format!(
        r#"{{"IP":"{ip}","Mask":null,"HostIP":"172.18.0.2","ID":{id},"Key":0,"Metadata":"","K8sNamespace":"default","K8sPodName":"pod-{ip}","K8sServiceAccount":"default"}}"#
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

async fn seed_remote(c: &mut Client, name: &str, id: u32, cached: bool) -> anyhow::Result<()> {
    let cfg = if cached {
        format!(
            r#"{{"id":{id},"capabilities":{{"syncedCanaries":true,"cached":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#
        )
    } else {
        format!(
            r#"{{"id":{id},"capabilities":{{"syncedCanaries":true,"maxConnectedClusters":255,"serviceExportsEnabled":false}}}}"#
        )
    };
    c.put(format!("cilium/cluster-config/{name}"), cfg, None)
        .await?;
    let root = if cached { "cache" } else { "state" };
    for s in [
        "nodes/v1",
        "services/v1",
        "serviceexports/v1",
        "identities/v1",
        "ip/v1",
    ] {
        c.put(
            format!("cilium/synced/{name}/cilium/{root}/{s}"),
            "2025-01-01T00:00:00Z",
            None,
        )
        .await?;
    }
    Ok(())
}

async fn bench_latency() -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    c.put("cilium/.heartbeat", "x", None).await?;
    seed_remote(&mut c, "cluster3", 3, false).await?;
    let dir = tempfile::tempdir()?;
    let config = Config::new(local(), dir.path().to_path_buf(), Mode::Direct);
    let (manager, mut rx) = Manager::new(config, Metrics::default())?;
    let mut status = manager.status();
    let token = CancellationToken::new();
    let run = tokio::spawn(manager.run(token.child_token()));
    etcd.write_client_config("remote", &dir.path().join("cluster3"))?;
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.get("cluster3").is_some_and(|s| s.ready)),
    )
    .await
    .context("reader not ready")??;

    let reader_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let consumer = tokio::spawn({
        let seen = reader_seen.clone();
        async move {
            while let Some(ev) = rx.recv().await {
                if let Event::Change { key, .. } = ev {
                    seen.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, Instant::now());
                }
            }
        }
    });
    let plain_seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let prefix = "cilium/state/ip/v1/default/";
    let watcher_client = etcd.client("root").await?;
    let mut wc = watcher_client.watch_client();
    let mut stream = wc
        .watch(prefix, Some(WatchOptions::new().with_prefix()))
        .await?;
    let plain = tokio::spawn({
        let seen = plain_seen.clone();
        async move {
            while let Ok(Some(resp)) = stream.message().await {
                let now = Instant::now();
                for ev in resp.events() {
                    if ev.event_type() == EventType::Put {
                        if let Some(kv) = ev.kv() {
                            let key = String::from_utf8_lossy(kv.key()).into_owned();
                            seen.lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .insert(key, now);
                        }
                    }
                }
            }
        }
    });

    let range = IdentityRange::for_cluster(3, MaxConnectedClusters::Max255);
    let mut sent: Vec<(String, Instant)> = Vec::with_capacity(N_PUTS);
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    for i in 0..N_PUTS {
        tick.tick().await;
        let ip = ip_of(i);
        let key = format!("{prefix}{ip}");
        let value = ip_entry(&ip, range.min + 1000 + (i as u32 % 1000));
        let at = Instant::now();
        c.put(key.clone(), value, None).await?;
        sent.push((key, at));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        let r = reader_seen.lock().unwrap_or_else(|e| e.into_inner()).len();
        let p = plain_seen.lock().unwrap_or_else(|e| e.into_inner()).len();
        if r >= N_PUTS && p >= N_PUTS {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lat = |seen: &Arc<Mutex<HashMap<String, Instant>>>| {
        let seen = seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<Duration> = sent
            .iter()
            .filter_map(|(k, at)| seen.get(k).map(|t| t.saturating_duration_since(*at)))
            .collect();
        v.sort();
        v
    };
    let reader = lat(&reader_seen);
    let baseline = lat(&plain_seen);
    let (r50, r99) = (percentile(&reader, 0.5), percentile(&reader, 0.99));
    let (b50, b99) = (percentile(&baseline, 0.5), percentile(&baseline, 0.99));
    let target = b99.mul_f64(1.5) + Duration::from_millis(2);
    println!("(a) propagation put -> cache, {N_PUTS} puts at ~{RATE_PER_SEC}/s");
    println!(
        "    reader       p50 {}  p99 {}  ({} of {N_PUTS} seen)",
        ms(r50),
        ms(r99),
        reader.len()
    );
    println!(
        "    plain watch  p50 {}  p99 {}  ({} of {N_PUTS} seen)",
        ms(b50),
        ms(b99),
        baseline.len()
    );
    println!(
        "    target p99 <= 1.5 x plain + 2 ms = {}: {}",
        ms(target),
        if r99 <= target && reader.len() == N_PUTS {
            "PASS"
        } else {
            "FAIL"
        }
    );
    token.cancel();
    let _ = run.await;
    consumer.abort();
    plain.abort();
    Ok(())
}

fn bench_decode() -> anyhow::Result<()> {
    let mut backends = String::new();
    for i in 0..1000 {
        if i > 0 {
            backends.push(',');
        }
        backends.push_str(&format!(
            r#""10.244.{}.{}":{{"http":{{"Protocol":"TCP","Port":8080}}}}"#,
            i / 256,
            i % 256
        ));
    }
    let raw = format!(
        r#"{{"cluster":"cluster3","namespace":"ns","name":"big","frontends":{{"10.96.0.10":{{"http":{{"Protocol":"TCP","Port":80}}}}}},"backends":{{{backends}}},"labels":{{}},"selector":{{"app":"big"}},"includeExternal":true,"shared":true,"clusterID":3}}"#
    );
    let raw = raw.as_bytes();
    let ctx = Context {
        cluster: "cluster3".into(),
        cluster_id: 3,
        range: IdentityRange::for_cluster(3, MaxConnectedClusters::Max255),
    };
    let svc = ClusterService::decode(raw)?;
    anyhow::ensure!(svc.backends.len() == 1000, "bad fixture");
    let iters = 500;
    let time = |f: &dyn Fn()| {
        for _ in 0..20 {
            f();
        }
        let mut v: Vec<Duration> = (0..iters)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        v.sort();
        (percentile(&v, 0.5), percentile(&v, 0.99))
    };
    let decode = time(&|| {
        std::hint::black_box(ClusterService::decode(std::hint::black_box(raw)).ok());
    });
    let full = time(&|| {
        std::hint::black_box(
            validate(
                &ctx,
                Resource::Services,
                "ns/big",
                std::hint::black_box(raw),
            )
            .ok(),
        );
    });
    let value = time(&|| {
        std::hint::black_box(
            serde_json::from_slice::<serde_json::Value>(std::hint::black_box(raw)).ok(),
        );
    });
    println!(
        "(c) ClusterService with 1k backends ({} bytes), {iters} iterations",
        raw.len()
    );
    println!(
        "    ClusterService::decode          p50 {:>8.1} µs  p99 {:>8.1} µs",
        us(decode.0),
        us(decode.1)
    );
    println!(
        "    remote validate (decode+checks) p50 {:>8.1} µs  p99 {:>8.1} µs",
        us(full.0),
        us(full.1)
    );
    println!(
        "    serde_json::Value baseline      p50 {:>8.1} µs  p99 {:>8.1} µs",
        us(value.0),
        us(value.1)
    );
    println!(
        "    target decode <= 100 µs: {}",
        if full.0 <= Duration::from_micros(100) {
            "PASS"
        } else {
            "FAIL"
        }
    );
    Ok(())
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

async fn bench_kvstoremesh(remotes: usize, endpoints: usize) -> anyhow::Result<()> {
    let etcd = TestEtcd::start()?;
    let mut c = etcd.client("root").await?;
    c.put("cilium/.heartbeat", "x", None).await?;
    let max = MaxConnectedClusters::Max255;
    for r in 0..remotes {
        let id = 2 + r as u32;
        let name = format!("c{id}");
        seed_remote(&mut c, &name, id, true).await?;
        let range = IdentityRange::for_cluster(id, max);
        let mut ops = Vec::new();
        for e in 0..endpoints {
            let ip = ip_of(r * endpoints + e);
            ops.push(TxnOp::put(
                format!("cilium/cache/ip/v1/{name}/{ip}"),
                ip_entry(&ip, range.min + (e as u32 % 1000)),
                None,
            ));
            if ops.len() == 128 {
                c.txn(Txn::new().and_then(std::mem::take(&mut ops))).await?;
            }
        }
        if !ops.is_empty() {
            c.txn(Txn::new().and_then(ops)).await?;
        }
    }
    let dir = tempfile::tempdir()?;
    let cfg_path = etcd.dir().join("local.yaml");
    etcd.write_client_config("local-test", &cfg_path)?;
    let local_etcd = clustermesh_syncer::EtcdConfig::load(&cfg_path)?;
    let mut config = Config::new(
        local(),
        dir.path().to_path_buf(),
        Mode::KvstoreMesh { local_etcd },
    );
    config.per_remote_ready_timeout = Duration::from_secs(600);
    let (manager, rx) = Manager::new(config, Metrics::default())?;
    drop(rx); // an agent would consume; here only the caches count
    let mut status = manager.status();
    let caches = manager.caches();
    let rss_before = rss_bytes();
    let start = Instant::now();
    let token = CancellationToken::new();
    let run = tokio::spawn(manager.run(token.child_token()));
    for r in 0..remotes {
        std::fs::write(
            dir.path().join(format!("c{}", 2 + r)),
            "endpoints:\n- https://unused.invalid:2379\n",
        )?;
    }
    tokio::time::timeout(
        Duration::from_secs(300),
        status.wait_for(|s| s.clusters.len() == remotes && s.clusters.iter().all(|c| c.ready)),
    )
    .await
    .context("kvstoremesh reader not ready")??;
    let took = start.elapsed();
    let total: usize = caches
        .names()
        .iter()
        .filter_map(|n| caches.with(n, |c| c.len(Resource::Endpoints)))
        .sum();
    let rss_after = rss_bytes();
    let per = rss_after.saturating_sub(rss_before) as f64 / total.max(1) as f64;
    println!(
        "(b-lite) KVStoreMesh mode, {remotes} remotes x {endpoints} endpoints from one local etcd"
    );
    println!(
        "    time to ready {:.2} s, {total} endpoints cached",
        took.as_secs_f64()
    );
    println!(
        "    RSS growth {:.1} MiB = {per:.0} B per endpoint (target <= 1024 B)",
        rss_after.saturating_sub(rss_before) as f64 / 1048576.0
    );
    token.cancel();
    let _ = run.await;
    Ok(())
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    bench_decode()?;
    bench_latency().await?;
    bench_kvstoremesh(arg("--remotes", 50), arg("--endpoints", 1000)).await?;
    Ok(())
}
