//! The syncer's etcd connection against a real etcd over mTLS: a client re-reads its
//! certificate files when it redials (a rotation reaches a `Client` made before it), a dead
//! peer is noticed by keepalives within seconds, and each failure is classified by its real
//! cause with a hint naming the file at fault.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context as _, Result};
use clustermesh_syncer::failure::Class;
use clustermesh_syncer::watcher::{Conn, Event, Watcher};
use clustermesh_syncer::{connect, ConnectConfig, EtcdConfig};
use clustermesh_tests::etcd::TestEtcd;

fn config(etcd: &TestEtcd, dir: &Path, cn: &str) -> Result<EtcdConfig> {
    let path = dir.join(cn);
    etcd.write_client_config(cn, &path)?;
    Ok(EtcdConfig::load(&path)?)
}

/// Connects and returns the failure's class and text; fails if the connection works.
async fn connect_err(cfg: &EtcdConfig) -> Result<(Class, String)> {
    let opts = ConnectConfig {
        connect_timeout: Duration::from_secs(2),
        ..Default::default()
    };
    match connect(cfg, &opts).await {
        Ok(_) => bail!("connected although it should not"),
        Err(clustermesh_syncer::Error::Connect {
            class,
            hint,
            source,
            ..
        }) => {
            println!("  cause: {source:?}");
            Ok((class, hint))
        }
        Err(e) => bail!("not a connect error: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connected_client_redials_with_rotated_files() -> Result<()> {
    let mut etcd = TestEtcd::start()?;
    let tmp = tempfile::tempdir()?;
    // Its own user: the harness checks etcd's health with `root`'s files.
    let cfg = config(&etcd, tmp.path(), "rotating")?;
    let cert = cfg.cert_file.clone().context("cert-file")?;
    let key = cfg.key_file.clone().context("key-file")?;
    let client = connect(&cfg, &ConnectConfig::default()).await?;
    client.probe().await?;

    // Rotate the client's files to a certificate etcd does not trust: the established
    // connection goes on with its session.
    let foreign = clustermesh_certs::Ca::generate("Other CA")?.issue_client("rotating", 30)?;
    std::fs::write(&key, &foreign.key_pem)?;
    std::fs::write(&cert, &foreign.cert_pem)?;
    client
        .probe()
        .await
        .context("established connection after rotation")?;

    // etcd restarts: the client redials on its own, and the new handshake uses the new files,
    // which etcd refuses.
    etcd.restart()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match client.probe().await {
            Err(e) => break e,
            Ok(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Ok(_) => bail!("the client kept its old certificate across a redial"),
        }
    };
    println!("the client redialed with the rotated files and etcd refused them: {err}");
    // What a reconnecting reader reports: the refused file, named. (The request that met the
    // refusal may only have seen "connection closed": the alert arrives in hyper's task.)
    let (class, hint) = connect_err(&cfg).await?;
    println!("connect with the foreign certificate: {class:?}: {hint}");
    ensure!(class == Class::Tls, "{hint}");
    ensure!(
        hint.contains(&cert.display().to_string()),
        "names cert-file: {hint}"
    );

    // A good certificate again (a new serial from etcd's CA): the same client recovers.
    let good = etcd.ca().issue_client("rotating", 30)?;
    std::fs::write(&key, &good.key_pem)?;
    std::fs::write(&cert, &good.cert_pem)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.probe().await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => bail!("the client did not pick up the good certificate: {e}"),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_ends_the_watch_within_seconds() -> Result<()> {
    let etcd = TestEtcd::start()?;
    let tmp = tempfile::tempdir()?;
    let cfg = config(&etcd, tmp.path(), "root")?;
    let client = connect(&cfg, &ConnectConfig::default()).await?;
    let mut watcher = Watcher::new(Conn::new(client), "cilium/", None);
    // The watch is established (the list is done, the machine watches) before etcd freezes.
    loop {
        if let Event::InitDone = watcher.next().await? {
            break;
        }
    }
    etcd.stop_process()?;
    let t = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(30), watcher.next()).await;
    let took = t.elapsed();
    etcd.continue_process()?;
    let err = match ended {
        Ok(Err(e)) => e,
        Ok(Ok(m)) => bail!("the watch went on: {m:?}"),
        Err(_) => bail!("the watch did not end within 30 s of etcd freezing"),
    };
    let failure = clustermesh_syncer::failure::classify(&err, Some(&cfg));
    println!("frozen etcd: watch ended after {took:?}: {err} -> {failure:?}");
    let (interval, timeout) = ConnectConfig::default().keepalive;
    ensure!(
        took <= interval + timeout + Duration::from_secs(1),
        "a dead peer is noticed within interval + timeout, not {took:?}"
    );
    ensure!(failure.class == Class::Unreachable, "{failure:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_classified_by_cause() -> Result<()> {
    let etcd = TestEtcd::start()?;
    let tmp = tempfile::tempdir()?;
    let good = config(&etcd, tmp.path(), "root")?;

    // Nothing listens: unreachable, and not a word about certificates.
    let port = clustermesh_tests::process::free_port();
    let mut closed = good.clone();
    closed.endpoints = vec![format!("https://127.0.0.1:{port}")];
    let (class, hint) = connect_err(&closed).await?;
    println!("closed port: {class:?}: {hint}");
    ensure!(class == Class::Unreachable, "{hint}");
    ensure!(
        !hint.contains("CA") && !hint.contains("certificate"),
        "{hint}"
    );

    // A frozen etcd (or a link that drops everything) answers nothing: unreachable, timed
    // out, and not a word about certificates (a partition's reconnect attempts meet this).
    etcd.stop_process()?;
    let frozen = connect_err(&good).await;
    etcd.continue_process()?;
    let (class, hint) = frozen?;
    println!("frozen etcd: {class:?}: {hint}");
    ensure!(
        class == Class::Unreachable && hint.contains("timed out"),
        "{hint}"
    );
    ensure!(
        !hint.contains("CA") && !hint.contains("certificate"),
        "{hint}"
    );

    // We do not trust the server's CA.
    let other = clustermesh_certs::Ca::generate("Other CA")?;
    let ca_file = tmp.path().join("other-ca.crt");
    std::fs::write(&ca_file, other.cert_pem())?;
    let mut unknown_ca = good.clone();
    unknown_ca.trusted_ca_file = Some(ca_file.clone());
    let (class, hint) = connect_err(&unknown_ca).await?;
    println!("unknown CA: {class:?}: {hint}");
    ensure!(class == Class::Tls && hint.contains("unknown CA"), "{hint}");
    ensure!(hint.contains(&ca_file.display().to_string()), "{hint}");

    // Our certificate expired yesterday: the file and its expiry are named.
    let expired = etcd
        .ca()
        .issue_client_until("root", SystemTime::now() - Duration::from_secs(86_400))?
        .write(tmp.path(), "expired")?;
    let mut old = good.clone();
    old.cert_file = Some(expired.cert.clone());
    old.key_file = Some(expired.key.clone());
    let (class, hint) = connect_err(&old).await?;
    println!("expired client certificate: {class:?}: {hint}");
    ensure!(class == Class::Tls, "{hint}");
    ensure!(
        hint.contains(&expired.cert.display().to_string()) && hint.contains("expired at"),
        "{hint}"
    );

    // The server's name is not the one we dial.
    let mut wrong_name = good.clone();
    wrong_name.host_aliases =
        serde_yaml::from_str("- hostname: c9.example.org\n  ips: [127.0.0.1]\n")?;
    wrong_name.endpoints = vec![format!("https://c9.example.org:{}", etcd.addr().port())];
    let (class, hint) = connect_err(&wrong_name).await?;
    println!("wrong name: {class:?}: {hint}");
    ensure!(class == Class::Tls && hint.contains("wrong name"), "{hint}");
    Ok(())
}
