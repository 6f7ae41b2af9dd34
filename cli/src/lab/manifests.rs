//! Kubernetes-shaped manifests of a lab cluster (Nodes, Pods, the `echo` services) and the
//! names and addresses of the lab's services.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::plan;
use super::state::{Cluster, Node, Pod};

/// Kubernetes-shaped manifests of one lab cluster, one file per object kind and one per pod
/// (so a test can delete a single pod): Nodes, Pods with the echo container, and a global
/// service selecting `app=echo`.
pub fn manifests(cluster: &Cluster) -> Vec<(String, String)> {
    let mut files = Vec::new();
    let mut nodes = String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n");
    for node in &cluster.nodes {
        // Dual-stack: a second pod CIDR and InternalIP, as a dual-stack Node has (an
        // IPv6-only Node has the IPv6 ones alone, as its first).
        let cidr6 = node
            .pod_cidr6
            .as_ref()
            .filter(|c| **c != node.pod_cidr)
            .map(|c| format!("  - {c}\n"))
            .unwrap_or_default();
        let ip6 = node
            .ip6
            .filter(|a| node.ip != IpAddr::from(*a))
            .map(|a| format!("  - type: InternalIP\n    address: {a}\n"))
            .unwrap_or_default();
        nodes.push_str(&format!(
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    kubernetes.io/hostname: {name}\nspec:\n  podCIDR: {cidr}\n  podCIDRs:\n  - {cidr}\n{cidr6}status:\n  addresses:\n  - type: InternalIP\n    address: {ip}\n{ip6}  - type: Hostname\n    address: {name}\n",
            name = node.name,
            cidr = node.pod_cidr,
            ip = node.ip,
        ));
        for pod in &node.pods {
            files.push((
                format!("pod-{}.yaml", pod.name),
                pod_manifest(cluster, node, pod),
            ));
        }
    }
    files.push(("nodes.yaml".into(), nodes));
    let dual = cluster.nodes.iter().any(|n| n.pod_cidr6.is_some());
    let v6_only = cluster.ip.is_ipv6();
    // Dual-stack services: both VIPs, as a `RequireDualStack` Service has them; IPv6-only
    // ones the IPv6 VIP alone (`ipFamilies: [IPv6]`).
    let vips = |v4: Ipv4Addr, v6: Ipv6Addr| {
        if v6_only {
            format!("  clusterIP: {v6}\n  clusterIPs:\n  - {v6}\n  ipFamilyPolicy: SingleStack\n  ipFamilies:\n  - IPv6\n")
        } else if dual {
            format!("  clusterIP: {v4}\n  clusterIPs:\n  - {v4}\n  - {v6}\n  ipFamilyPolicy: RequireDualStack\n  ipFamilies:\n  - IPv4\n  - IPv6\n")
        } else {
            format!("  clusterIP: {v4}\n")
        }
    };
    files.push((
        "service.yaml".into(),
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\nspec:\n{}  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    app: echo\n", vips(ECHO_VIP, ECHO_VIP6)),
    ));
    files.push((
        "service-echo-local.yaml".into(),
        format!("apiVersion: v1\nkind: Service\nmetadata:\n  name: {ECHO_LOCAL}\n  namespace: default\n  annotations:\n    service.cilium.io/global: \"true\"\n    service.cilium.io/affinity: local\nspec:\n{}  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    {ECHO_LOCAL_LABEL}\n", vips(ECHO_LOCAL_VIP, ECHO_LOCAL_VIP6)),
    ));
    files
}

/// The global service of every lab cluster (selects every pod, VIP [`ECHO_VIP`], port 80).
pub const ECHO: &str = "echo";
/// VIP of [`ECHO`].
pub const ECHO_VIP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 10);
/// IPv6 VIP of [`ECHO`] (dual-stack labs; VIPs are in `fd00:20::/108`).
pub const ECHO_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x10);
/// A global service with `service.cilium.io/affinity: local`, selecting the pods with
/// [`ECHO_LOCAL_LABEL`] (the last pod of each cluster, [`in_echo_local`]).
pub const ECHO_LOCAL: &str = "echo-local";
/// VIP of [`ECHO_LOCAL`].
pub const ECHO_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(172, 20, 0, 11);
/// IPv6 VIP of [`ECHO_LOCAL`] (dual-stack labs).
pub const ECHO_LOCAL_VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x11);
/// The label line (YAML, as in a pod's `labels:`) that [`ECHO_LOCAL`] selects.
pub const ECHO_LOCAL_LABEL: &str = "svc: echo-local";
/// Port of the lab's services.
pub const SERVICE_PORT: u16 = 80;

/// Whether `pod` backs [`ECHO_LOCAL`]: the last pod of the cluster's last node.
pub fn in_echo_local(cluster: &Cluster, node: &Node, pod: &Pod) -> bool {
    cluster.nodes.last().is_some_and(|n| n.name == node.name)
        && node.pods.last().is_some_and(|p| p.name == pod.name)
}

/// `pod_manifest` without the [`ECHO_LOCAL_LABEL`]: the pod stays, the service loses it.
pub fn pod_manifest_without_echo_local(cluster: &Cluster, node: &Node, pod: &Pod) -> String {
    pod_manifest(cluster, node, pod).replace(&format!("    {ECHO_LOCAL_LABEL}\n"), "")
}

/// One pod's manifest.
pub fn pod_manifest(cluster: &Cluster, node: &Node, pod: &Pod) -> String {
    let extra = if in_echo_local(cluster, node, pod) {
        format!("    {ECHO_LOCAL_LABEL}\n")
    } else {
        String::new()
    };
    format!(
        "# lab pod {c}/{n}/{p}: network namespace {ns}\napiVersion: v1\nkind: Pod\nmetadata:\n  name: {p}\n  namespace: {pns}\n  labels:\n    app: echo\n    instance: {p}\n{extra}spec:\n  nodeName: {n}\n  containers:\n  - name: echo\n    ports:\n    - name: http\n      containerPort: {port}\nstatus:\n  phase: Running\n  hostIP: {host}\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n{ip6}",
        c = cluster.name,
        n = node.name,
        p = pod.name,
        ns = pod.ns,
        pns = pod.namespace,
        port = plan::ECHO_PORT,
        host = node.ip,
        ip = pod.ip,
        ip6 = pod
            .ip6
            .filter(|a| pod.ip != IpAddr::from(*a))
            .map(|a| format!("  - ip: {a}\n"))
            .unwrap_or_default(),
    )
}
