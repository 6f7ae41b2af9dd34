//! The resources the apiserver's Kubernetes source watches, and the RBAC it needs, written
//! once as data. The deploy objects' ClusterRole is [`rbac_rules`] (so it holds exactly what
//! the source reads); the source uses [`RESOURCES`] to start its watches and
//! [`Resource::rule`] to name a missing permission.

use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::core::ApiResource;

/// One watched resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource {
    /// API group ("" for core).
    pub group: &'static str,
    /// Version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Plural (the RBAC resource name).
    pub plural: &'static str,
    /// Exists only while its CustomResourceDefinition does.
    pub crd: bool,
    /// Watched only with `--clustermesh-enable-mcs-api`.
    pub mcs_only: bool,
}

const fn r(
    group: &'static str,
    version: &'static str,
    kind: &'static str,
    plural: &'static str,
    crd: bool,
    mcs_only: bool,
) -> Resource {
    Resource {
        group,
        version,
        kind,
        plural,
        crd,
        mcs_only,
    }
}

/// What the clustermesh-apiserver watches: Cilium's set (Namespace, Service, EndpointSlice,
/// ServiceExport, CiliumNode, CiliumIdentity, CiliumEndpoint, CiliumEndpointSlice), plus Node
/// and Pod (clusters without Cilium's CRDs), and the two policy kinds for the cluster's own
/// agents.
pub const RESOURCES: &[Resource] = &[
    r("", "v1", "Namespace", "namespaces", false, false),
    r("", "v1", "Node", "nodes", false, false),
    r("", "v1", "Pod", "pods", false, false),
    r("", "v1", "Service", "services", false, false),
    r(
        "discovery.k8s.io",
        "v1",
        "EndpointSlice",
        "endpointslices",
        false,
        false,
    ),
    r(
        "networking.k8s.io",
        "v1",
        "NetworkPolicy",
        "networkpolicies",
        false,
        false,
    ),
    r(
        "multicluster.x-k8s.io",
        "v1beta1",
        "ServiceExport",
        "serviceexports",
        true,
        true,
    ),
    r("cilium.io", "v2", "CiliumNode", "ciliumnodes", true, false),
    r(
        "cilium.io",
        "v2",
        "CiliumIdentity",
        "ciliumidentities",
        true,
        false,
    ),
    r(
        "cilium.io",
        "v2",
        "CiliumEndpoint",
        "ciliumendpoints",
        true,
        false,
    ),
    r(
        "cilium.io",
        "v2alpha1",
        "CiliumEndpointSlice",
        "ciliumendpointslices",
        true,
        false,
    ),
    r(
        "cilium.io",
        "v2",
        "CiliumNetworkPolicy",
        "ciliumnetworkpolicies",
        true,
        false,
    ),
];

/// CustomResourceDefinitions, listed as metadata only to learn which CRDs exist.
pub const CRDS: Resource = r(
    "apiextensions.k8s.io",
    "v1",
    "CustomResourceDefinition",
    "customresourcedefinitions",
    false,
    false,
);

/// The verbs every rule grants: the source only reads.
pub const VERBS: &[&str] = &["get", "list", "watch"];

impl Resource {
    /// `apiVersion`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The CRD's name (`<plural>.<group>`).
    pub fn crd_name(&self) -> String {
        format!("{}.{}", self.plural, self.group)
    }

    /// `plural.group` (`pods` for core), as kubectl and RBAC messages name it.
    pub fn name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_string()
        } else {
            self.crd_name()
        }
    }

    /// kube-rs' dynamic type for it.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_string(),
            version: self.version.to_string(),
            api_version: self.api_version(),
            kind: self.kind.to_string(),
            plural: self.plural.to_string(),
        }
    }

    /// The ClusterRole rule that lets the source read it, as a user would add it.
    pub fn rule(&self) -> String {
        format!(
            "{{apiGroups: [\"{}\"], resources: [\"{}\"], verbs: [\"get\", \"list\", \"watch\"]}}",
            self.group, self.plural
        )
    }

    /// Whether the source watches it with these settings.
    pub fn enabled(&self, enable_mcs_api: bool) -> bool {
        !self.mcs_only || enable_mcs_api
    }
}

/// The ClusterRole rules the apiserver needs: get/list/watch on exactly the resources it
/// watches (one rule per API group, resources sorted), CRDs included.
pub fn rbac_rules(enable_mcs_api: bool) -> Vec<PolicyRule> {
    let mut groups: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for res in RESOURCES
        .iter()
        .filter(|r| r.enabled(enable_mcs_api))
        .chain(std::iter::once(&CRDS))
    {
        groups.entry(res.group).or_default().push(res.plural);
    }
    groups
        .into_iter()
        .map(|(group, mut resources)| {
            resources.sort_unstable();
            PolicyRule {
                api_groups: Some(vec![group.to_string()]),
                resources: Some(resources.into_iter().map(String::from).collect()),
                verbs: VERBS.iter().map(|v| v.to_string()).collect(),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_cover_every_watched_resource_read_only() {
        let rules = rbac_rules(true);
        for res in RESOURCES.iter().chain(std::iter::once(&CRDS)) {
            assert!(
                rules.iter().any(
                    |r| r.api_groups.as_deref() == Some(&[res.group.to_string()])
                        && r.resources
                            .as_ref()
                            .is_some_and(|rs| rs.iter().any(|x| x == res.plural))
                ),
                "{} missing",
                res.name()
            );
        }
        for rule in &rules {
            assert_eq!(rule.verbs, ["get", "list", "watch"]);
        }
        let without = rbac_rules(false);
        assert!(!without
            .iter()
            .any(|r| r.api_groups.as_deref() == Some(&["multicluster.x-k8s.io".to_string()])));
        let cilium = rules
            .iter()
            .find(|r| r.api_groups.as_deref() == Some(&["cilium.io".to_string()]))
            .unwrap();
        assert_eq!(
            cilium.resources.as_deref().unwrap(),
            [
                "ciliumendpoints",
                "ciliumendpointslices",
                "ciliumidentities",
                "ciliumnetworkpolicies",
                "ciliumnodes"
            ]
        );
    }

    #[test]
    fn rule_names_group_resource_and_verbs() {
        let ci = RESOURCES
            .iter()
            .find(|r| r.plural == "ciliumidentities")
            .unwrap();
        assert_eq!(
            ci.rule(),
            "{apiGroups: [\"cilium.io\"], resources: [\"ciliumidentities\"], verbs: [\"get\", \"list\", \"watch\"]}"
        );
    }
}
