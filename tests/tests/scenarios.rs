//! Conformance: every `*.txtar` scenario (Cilium's, in `tests/cilium-testdata`
//! or `$CILIUM_TESTDATA`, and ours in `tests/scenarios/`) against the real
//! `clustermesh-apiserver` binary and a fresh etcd over mTLS per scenario, once per source:
//! a manifest directory and the test Kubernetes API server (real kube-rs client). Both runs
//! must pass, and every `kvstore/list` of the two runs must list the same etcd contents.
//! `SCENARIO_SOURCE=manifests|kubernetes|both` (default both) picks the sources.
//!
//! Needs the binary: `cargo build -p clustermesh-apiserver` (or `CLUSTERMESH_APISERVER_BIN`).
//! `SCENARIO=<substring>` runs only matching scenarios; `SCENARIO_TIMEOUT=30s` changes how
//! long `*` commands retry.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use clustermesh_tests::etcd::TestEtcd;
use clustermesh_tests::scenario::source::{self, KubeApiSource, ManifestDir, Source};
use clustermesh_tests::scenario::{self, apiserver, Options, Scenario};

/// What each `kvstore/list` of a run wrote last, by output file.
type Listings = std::collections::BTreeMap<String, String>;

/// Runs one scenario against a fresh etcd and a fresh apiserver reading `kind`. On failure
/// the scratch directory (files, manifests, kubeconfig, apiserver log) is kept, if `keep`,
/// and named in the error.
async fn run_one(
    scenario: &Scenario,
    options: &Options,
    keep: bool,
    kind: source::Kind,
) -> anyhow::Result<Listings> {
    let bin = apiserver::find_binary()?;
    let etcd = TestEtcd::start().context("starting etcd")?;
    let root = tempfile::Builder::new()
        .prefix(&format!("scenario-{}-{}-", scenario.name, kind.name()))
        .tempdir()?;
    let config = root.path().join("etcd-config.yaml");
    etcd.write_client_config(&format!("admin-{}", scenario.cluster_name()), &config)?;
    let mut backend =
        apiserver::Apiserver::new(bin, config, root.path().join("apiserver.log")).await?;
    let mut src: Box<dyn Source> = match kind {
        source::Kind::Manifests => Box::new(ManifestDir::new(&root.path().join("manifests"))?),
        source::Kind::Kubernetes => {
            Box::new(KubeApiSource::start(&root.path().join("kube")).await?)
        }
    };
    let result =
        scenario::run_with(scenario, &mut backend, src.as_mut(), root.path(), options).await;
    let result = result.map(|()| {
        let mut listings = Listings::new();
        for cmd in &scenario.commands {
            let args: Vec<String> = cmd
                .args
                .iter()
                .map(scenario::script::Word::literal)
                .collect();
            if args.first().map(String::as_str) == Some("kvstore/list") {
                if let Some(out) = args.last() {
                    let text = std::fs::read_to_string(root.path().join("work").join(out))
                        .unwrap_or_default();
                    listings.insert(out.clone(), text);
                }
            }
        }
        listings
    });
    match result {
        Err(error) if keep => {
            let kept = root.keep();
            Err(error.context(format!("scratch directory kept at {}", kept.display())))
        }
        other => other,
    }
}

/// A listing's entries, with the values that are times of writing (synced canaries, the
/// heartbeat) reduced to their presence: two runs write them at different moments.
fn comparable(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = scenario::listing::parse(text)
        .into_iter()
        .map(|e| {
            let timed = e.key.starts_with("cilium/synced/") || e.key.ends_with(".heartbeat");
            (e.key, if timed { "<time>".to_owned() } else { e.value })
        })
        .collect();
    out.sort();
    out
}

/// Runs `scenario` against every source of `SCENARIO_SOURCE` and checks that they listed
/// the same etcd contents.
async fn run_sources(
    scenario: &Scenario,
    options: &Options,
    kinds: &[source::Kind],
) -> anyhow::Result<()> {
    let mut first: Option<(source::Kind, Listings)> = None;
    for &kind in kinds {
        let started = Instant::now();
        let listings = run_one(scenario, options, true, kind)
            .await
            .with_context(|| format!("source {}", kind.name()))?;
        println!(
            "    source {}: ok ({:.1}s)",
            kind.name(),
            started.elapsed().as_secs_f64()
        );
        match &first {
            None => first = Some((kind, listings)),
            Some((k0, l0)) => {
                for (file, text) in l0 {
                    let other = listings.get(file).map(String::as_str).unwrap_or("");
                    let (a, b) = (comparable(text), comparable(other));
                    if a != b {
                        let only = |x: &[(String, String)], y: &[(String, String)]| {
                            x.iter()
                                .filter(|e| !y.contains(e))
                                .map(|(k, v)| format!("{k} = {v}"))
                                .collect::<Vec<_>>()
                        };
                        anyhow::bail!(
                            "{file}: the {} source listed other etcd contents than the {} source\n  only with {}: {:?}\n  only with {}: {:?}",
                            kind.name(),
                            k0.name(),
                            k0.name(),
                            only(&a, &b),
                            kind.name(),
                            only(&b, &a)
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Newest modification time of any file below `dir`.
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let time = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(time);
    }
    newest
}

/// `cargo test -p clustermesh-tests` does not rebuild the apiserver binary: say so when it
/// is older than the sources it is built from.
fn warn_if_stale(bin: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let Ok(built) = bin.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let sources = ["apiserver", "syncer", "types", "certs"]
        .iter()
        .filter_map(|krate| newest_mtime(&repo.join(krate).join("src")))
        .max();
    if sources.is_some_and(|newest| newest > built) {
        println!(
            "WARNING: {} is older than its sources; run `cargo build -p clustermesh-apiserver`",
            bin.display()
        );
    }
}

fn all_scenarios() -> anyhow::Result<Vec<PathBuf>> {
    let reference = scenario::reference_dir();
    let mut files = scenario::discover(&reference)?;
    anyhow::ensure!(
        !files.is_empty(),
        "no Cilium scenarios found in {} (set CILIUM_TESTDATA)",
        reference.display()
    );
    files.extend(scenario::discover(&scenario::own_dir())?);
    if let Ok(filter) = std::env::var("SCENARIO") {
        files.retain(|p| p.to_string_lossy().contains(&filter));
    }
    Ok(files)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios() -> anyhow::Result<()> {
    let options = Options::from_env()?;
    let kinds = source::Kind::from_env()?;
    let files = all_scenarios()?;
    warn_if_stale(&apiserver::find_binary()?);
    let mut failed = Vec::new();
    for path in &files {
        let started = Instant::now();
        let result = match Scenario::load(path) {
            Ok(s) => {
                println!("=== {} ({})", s.name, path.display());
                run_sources(&s, &options, &kinds).await
            }
            Err(e) => Err(e),
        };
        let name = path.file_stem().unwrap_or_default().to_string_lossy();
        match result {
            Ok(()) => println!("--- PASS {name} ({:.1}s)", started.elapsed().as_secs_f64()),
            Err(error) => {
                println!(
                    "--- FAIL {name} ({:.1}s)\n{error:#}",
                    started.elapsed().as_secs_f64()
                );
                failed.push(name.into_owned());
            }
        }
    }
    println!(
        "{} passed, {} failed",
        files.len() - failed.len(),
        failed.len()
    );
    anyhow::ensure!(failed.is_empty(), "failed scenarios: {}", failed.join(", "));
    Ok(())
}

/// A wrong expectation must fail (not hang, not pass) and name the differing key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_expectation_fails_with_key_diff() -> anyhow::Result<()> {
    let path = scenario::reference_dir().join("clusterconfig.txtar");
    let mut s = Scenario::load(&path)?;
    s.name = "clusterconfig-broken".to_owned();
    let expected = s
        .file_mut("config.expected")
        .context("clusterconfig.txtar has config.expected")?;
    anyhow::ensure!(expected.contains("\"id\": 3"), "unexpected fixture");
    *expected = expected.replace("\"id\": 3", "\"id\": 4");
    let options = Options {
        retry_timeout: Duration::from_secs(3),
        verbose: true,
    };
    let started = Instant::now();
    let error = run_one(&s, &options, false, source::Kind::Manifests)
        .await
        .expect_err("a broken expectation must fail");
    let message = format!("{error:#}");
    println!("{message}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
    // `<key>: expected .. got ..` (or `<key>: missing ..` if nothing was written).
    assert!(
        message.contains("cilium/cluster-config/cluster3: "),
        "error does not name the key: {message}"
    );
    Ok(())
}
