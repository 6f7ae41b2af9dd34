//! The test Kubernetes API server (`clustermesh_tests::kubeapi`) against the real kube-rs
//! client: the protocol promises the apiserver's Kubernetes source relies on.

use std::time::Duration;

use clustermesh_tests::kubeapi::{KubeApi, Outage};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PartialObjectMeta, WatchEvent, WatchParams};
use kube::runtime::{reflector, watcher, WatchStreamExt};
use serde_json::json;

fn pod(name: &str, ip: &str) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": "a"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "c"}]},
        "status": {"podIP": ip, "phase": "Running"}
    })
}

async fn next_event<S, T, E>(stream: &mut S) -> T
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Debug,
{
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no event within 10 s")
        .expect("stream ended")
        .expect("stream error")
}

#[tokio::test]
async fn list_pages_carry_resource_versions_and_a_consistent_snapshot() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    for i in 0..25 {
        api.apply(pod(&format!("p{i:02}"), &format!("10.0.0.{i}")))?;
    }
    let client = api.client().await?;
    let pods: Api<Pod> = Api::all(client);
    let first = pods.list(&ListParams::default().limit(10)).await?;
    assert_eq!(first.items.len(), 10);
    let rv = first.metadata.resource_version.clone().unwrap();
    assert_eq!(rv, api.resource_version().to_string());
    assert!(first
        .items
        .iter()
        .all(|p| p.metadata.resource_version.is_some()));
    // A change between pages does not show up in the rest of this list.
    api.delete("Pod", "default", "p24")?;
    let token = first.metadata.continue_.clone().unwrap();
    let second = pods
        .list(&ListParams::default().limit(10).continue_token(&token))
        .await?;
    let third = pods
        .list(
            &ListParams::default()
                .limit(10)
                .continue_token(second.metadata.continue_.as_deref().unwrap()),
        )
        .await?;
    assert_eq!(third.items.len(), 5, "the snapshot still has p24");
    assert!(third.metadata.continue_.is_none());
    // After compaction an old continue token is 410 Expired.
    let again = pods.list(&ListParams::default().limit(10)).await?;
    api.expire_watches();
    let err = pods
        .list(
            &ListParams::default()
                .limit(10)
                .continue_token(again.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn watcher_and_reflector_see_changes_bookmarks_and_relist_after_410() -> anyhow::Result<()> {
    let api = KubeApi::start_with(Duration::from_millis(200)).await?;
    api.apply(pod("a", "10.0.0.1"))?;
    let client = api.client().await?;
    let (store, writer) = reflector::store::<Pod>();
    let stream = reflector::reflector(
        writer,
        watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().page_size(1),
        ),
    );
    let mut stream = Box::pin(stream);
    loop {
        if let watcher::Event::InitDone = next_event(&mut stream).await {
            break;
        }
    }
    assert_eq!(store.len(), 1);
    api.apply(pod("b", "10.0.0.2"))?;
    assert!(
        matches!(next_event(&mut stream).await, watcher::Event::Apply(p) if p.metadata.name.as_deref() == Some("b"))
    );
    api.apply(pod("b", "10.0.0.3"))?;
    let ev = next_event(&mut stream).await;
    assert!(
        matches!(&ev, watcher::Event::Apply(p) if p.status.as_ref().unwrap().pod_ip.as_deref() == Some("10.0.0.3")),
        "{ev:?}"
    );
    // An identical update is no change: no event, no new version.
    let rv = api.resource_version();
    api.apply(pod("b", "10.0.0.3"))?;
    assert_eq!(api.resource_version(), rv);
    api.delete("Pod", "default", "a")?;
    assert!(matches!(
        next_event(&mut stream).await,
        watcher::Event::Delete(_)
    ));
    assert_eq!(store.len(), 1);

    // Forced compaction: every open watch gets a 410, the watcher relists (a new list
    // request), and the store still has exactly the live objects.
    let lists = api.stats().lists.get("pods").copied().unwrap_or(0);
    api.expire_watches();
    let mut stream = stream.default_backoff().boxed();
    let mut saw_error = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await?
            .unwrap()
        {
            Err(_) => saw_error = true,
            Ok(watcher::Event::InitDone) => break,
            Ok(_) => {}
        }
    }
    assert!(saw_error, "the 410 reached the watcher");
    assert_eq!(api.stats().lists["pods"], lists + 1);
    assert!(api.stats().gone >= 1);
    assert_eq!(store.len(), 1);

    // Bookmarks: a raw watch with bookmarks gets BOOKMARK events carrying a version.
    let pods: Api<Pod> = Api::all(client);
    let rv = api.resource_version().to_string();
    let mut raw = pods
        .watch(
            &WatchParams {
                bookmarks: true,
                ..Default::default()
            },
            &rv,
        )
        .await?
        .boxed();
    let ev = next_event(&mut raw).await;
    assert!(
        matches!(&ev, WatchEvent::Bookmark(b) if b.metadata.resource_version == rv),
        "{ev:?}"
    );
    // A watch from a compacted version: 410 Gone with a Status.
    api.expire_watches();
    let old = (api.resource_version() - 1).to_string();
    let err = match pods.watch(&WatchParams::default(), &old).await {
        Err(e) => e,
        Ok(s) => {
            let mut s = s.boxed();
            match tokio::time::timeout(Duration::from_secs(5), s.next()).await? {
                Some(Err(e)) => e,
                other => panic!("expected 410, got {other:?}"),
            }
        }
    };
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 410 && s.reason == "Expired"),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn forbidden_resources_get_a_403_naming_user_verb_resource_and_group() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    api.add_crd("CiliumIdentity")?;
    api.set_forbidden("cilium.io", "ciliumidentities", true);
    let client = api.client().await?;
    let ar = kube::core::ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: "CiliumIdentity".into(),
        plural: "ciliumidentities".into(),
    };
    let ids: Api<kube::api::DynamicObject> = Api::all_with(client.clone(), &ar);
    let err = ids.list(&ListParams::default()).await.unwrap_err();
    let kube::Error::Api(s) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(s.code, 403);
    assert_eq!(s.reason, "Forbidden");
    assert!(
        s.message
            .contains("cannot list resource \"ciliumidentities\" in API group \"cilium.io\"")
            && s.message.contains(clustermesh_tests::kubeapi::USER),
        "{}",
        s.message
    );
    // Pods are still readable; an unknown CRD's resource is 404.
    Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    api.set_forbidden("cilium.io", "ciliumidentities", false);
    ids.list(&ListParams::default()).await?;
    api.remove_crd("CiliumIdentity")?;
    let err = ids.list(&ListParams::default()).await.unwrap_err();
    assert!(
        matches!(&err, kube::Error::Api(s) if s.code == 404),
        "{err:?}"
    );
    Ok(())
}

#[tokio::test]
async fn crds_list_and_watch_as_partial_object_metadata() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    api.add_crd("CiliumNode")?;
    let client = api.client().await?;
    let crds: Api<PartialObjectMeta<CustomResourceDefinition>> = Api::all(client);
    let list = crds.list_metadata(&ListParams::default()).await?;
    let names: Vec<_> = list
        .items
        .iter()
        .filter_map(|m| m.metadata.name.clone())
        .collect();
    assert_eq!(names, ["ciliumnodes.cilium.io"]);
    let mut w = watcher(crds, watcher::Config::default()).boxed();
    loop {
        if let watcher::Event::InitDone = next_event(&mut w).await {
            break;
        }
    }
    api.add_crd("CiliumIdentity")?;
    let ev = next_event(&mut w).await;
    assert!(
        matches!(&ev, watcher::Event::Apply(m) if m.metadata.name.as_deref() == Some("ciliumidentities.cilium.io")),
        "{ev:?}"
    );
    Ok(())
}

#[tokio::test]
async fn an_outage_cuts_connections_and_the_watcher_recovers_after_it() -> anyhow::Result<()> {
    let api = KubeApi::start().await?;
    api.apply(pod("a", "10.0.0.1"))?;
    let client = api.client().await?;
    let (store, writer) = reflector::store::<Pod>();
    let mut stream = reflector::reflector(
        writer,
        watcher(Api::<Pod>::all(client), watcher::Config::default()),
    )
    .default_backoff()
    .boxed();
    loop {
        if let watcher::Event::InitDone = next_event(&mut stream).await {
            break;
        }
    }
    api.set_outage(Some(Outage::Refuse));
    let err = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Err(e)) = stream.next().await {
                return e;
            }
        }
    })
    .await?;
    println!("during the outage: {err}");
    assert_eq!(store.len(), 1, "the store keeps its objects");
    api.apply(pod("b", "10.0.0.2"))?;
    api.set_outage(None);
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) if store.len() == 2 => return true,
                None => return false,
                _ => {}
            }
        }
    })
    .await?;
    assert!(found);
    Ok(())
}
