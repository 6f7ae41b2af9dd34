//! The identity labels of a pod (Cilium's label set: pod labels, namespace labels, cluster,
//! service account, namespace).

use std::collections::BTreeMap;

use clustermesh_types::identity::{
    Label, LabelArray, CLUSTER_LABEL, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX,
    SERVICE_ACCOUNT_LABEL, SOURCE_K8S,
};

use crate::source::objects;
use crate::source::Snapshot;

use super::Exporter;

/// Pod labels that never become identity labels (they differ per pod of one workload).
const IGNORED_POD_LABELS: &[&str] = &[
    "pod-template-hash",
    "controller-revision-hash",
    "pod-template-generation",
    "statefulset.kubernetes.io/pod-name",
    "batch.kubernetes.io/controller-uid",
    "controller-uid",
    "apps.kubernetes.io/pod-index",
];

impl Exporter {
    pub(super) fn pod_identity_labels(&self, snap: &Snapshot, pod: &objects::Pod) -> String {
        let ns = pod.metadata.ns();
        let mut labels: Vec<Label> = pod
            .metadata
            .labels()
            .into_iter()
            .filter(|(k, _)| !IGNORED_POD_LABELS.contains(&k.as_str()))
            .map(|(k, v)| Label::new(SOURCE_K8S, k, v))
            .collect();
        if let Some(n) = snap.namespaces.get(ns) {
            for (k, v) in n.metadata.labels() {
                labels.push(Label::new(
                    SOURCE_K8S,
                    format!("{NAMESPACE_LABELS_PREFIX}{k}"),
                    v,
                ));
            }
        }
        labels.push(Label::new(
            SOURCE_K8S,
            CLUSTER_LABEL,
            self.opts.cluster.name.as_str(),
        ));
        labels.push(Label::new(
            SOURCE_K8S,
            SERVICE_ACCOUNT_LABEL,
            pod.spec
                .service_account_name
                .clone()
                .unwrap_or_else(|| "default".into()),
        ));
        labels.push(Label::new(SOURCE_K8S, NAMESPACE_LABEL, ns));
        LabelArray::new(labels).to_kvstore_string()
    }
}

/// What a pod's identity labels depend on (besides the namespace's labels).
pub(super) type LabelCacheKey<'a> = (
    &'a str,
    Option<&'a BTreeMap<String, String>>,
    Option<&'a str>,
);
