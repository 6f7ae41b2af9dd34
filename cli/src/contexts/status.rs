//! `clustermesh status --context C [--wait] [-o json]`: the same report and hints as the
//! state-directory form, with the apiserver's `/status` read through the API server's pod
//! proxy (nothing but the kubeconfig is needed to reach it).

use anyhow::Context as _;
use clustermesh_k8s::apply::{self, Ref};
use clustermesh_k8s::client::Target;
use clustermesh_k8s::k8s_openapi::api::core::v1::{Pod, Secret};
use clustermesh_k8s::kube::api::{Api, ListParams};
use clustermesh_k8s::objects;
use serde_json::Value;

use super::{read_identity, runtime, secret_data, target};
use crate::remotes::{report_status, status_doc, StatusArgs, StatusInput};

/// The running apiserver pod's `/status`, or why there is none.
async fn apiserver_report(t: &Target, ns: &str) -> anyhow::Result<(Option<Value>, String)> {
    let pods = Api::<Pod>::namespaced(t.client.clone(), ns)
        .list(&ListParams::default().labels(&format!("k8s-app={}", objects::APISERVER)))
        .await
        .map_err(|e| apply::explain(t, "list", &Ref::of::<Pod>(Some(ns), "*"), e))?;
    let running = pods.items.iter().find(|p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.phase.as_deref() == Some("Running") && s.pod_ip.is_some())
    });
    let Some(pod) = running else {
        return Ok((
            None,
            format!(
                "no running pod with label k8s-app={} in namespace {ns}",
                objects::APISERVER
            ),
        ));
    };
    let name = pod.metadata.name.clone().unwrap_or_default();
    let health = format!(
        "pod {ns}/{name}:{} (through the API server's pod proxy)",
        objects::HEALTH_PORT
    );
    let report = apply::pod_proxy_get(t, ns, &name, objects::HEALTH_PORT, "/status")
        .await
        .ok()
        .and_then(|body| serde_json::from_str::<Value>(&body).ok());
    Ok((report, health))
}

async fn read(t: &Target, ns: &str, warn: bool) -> anyhow::Result<StatusInput> {
    let id = read_identity(t, ns).await?.with_context(|| {
        format!(
            "context {}: the cluster is not enabled (no ConfigMap {ns}/{}): run `clustermesh enable --context {}`",
            t.context,
            objects::CLUSTER_CONFIG,
            t.context
        )
    })?;
    let configured = apply::get::<Secret>(t, Some(ns), objects::KVSTOREMESH_SECRET)
        .await?
        .map(|s| secret_data(&s))
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| *k != id.name && !k.contains('.') && v.contains("endpoints:"))
        .map(|(k, _)| k)
        .collect();
    let endpoints = match super::connect::access_address(t, ns, &id.name, None, warn).await {
        Ok(a) => a.ips.iter().map(|ip| format!("{ip}:{}", a.port)).collect(),
        Err(e) => vec![format!("unknown ({e:#})")],
    };
    let (report, health) = apiserver_report(t, ns).await?;
    Ok(StatusInput {
        name: id.name,
        id: id.id,
        max_connected_clusters: id.max_connected_clusters,
        endpoints,
        configured,
        report,
        health,
        kvstoremesh: true,
    })
}

/// `clustermesh status --context C`.
pub fn run(a: &StatusArgs) -> anyhow::Result<()> {
    let rt = runtime()?;
    let ns = a.kube.namespace.clone();
    let t = rt.block_on(target(&a.kube.kubeconfig, a.kube.context.as_deref()))?;
    let first = rt.block_on(read(&t, &ns, a.output != "json"))?;
    let name = first.name.clone();
    let mut first = Some(first);
    report_status(a, &name, || {
        let input = match first.take() {
            Some(i) => i,
            None => rt.block_on(read(&t, &ns, false))?,
        };
        Ok(status_doc(&input))
    })
}
