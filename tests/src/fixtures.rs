//! Generated Kubernetes-shaped manifests for tests and benchmarks.

use std::fmt::Write;

/// Shape of a generated cluster.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// Cluster ID (used in addresses).
    pub cluster_id: u32,
    /// Nodes.
    pub nodes: u32,
    /// Pods in total (spread over nodes).
    pub pods: u32,
    /// Services (each selects one app; half are global).
    pub services: u32,
}

/// YAML documents for `shape`: one namespace, nodes, pods (app label cycles over the
/// services so each service has backends), services.
pub fn cluster(shape: Shape) -> String {
    let c = shape.cluster_id;
    let mut out = String::with_capacity(shape.pods as usize * 420);
    out.push_str("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n");
    for n in 0..shape.nodes {
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node{n}\nspec:\n  podCIDR: 10.{c}.{hi}.{lo}/28\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 198.18.{c}.{n}\n",
            hi = (n * 16) / 256,
            lo = (n * 16) % 256,
        );
    }
    let apps = shape.services.max(1);
    for p in 0..shape.pods {
        let node = p % shape.nodes.max(1);
        let ip: u32 = (10 << 24) + (c << 16) + p + 1;
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: pod{p}\n  namespace: default\n  uid: uid-{p}\n  labels:\n    app: app{app}\nspec:\n  nodeName: node{node}\n  containers:\n  - name: c\n    ports:\n    - name: http\n      containerPort: 8080\nstatus:\n  phase: Running\n  hostIP: 198.18.{c}.{node}\n  podIP: {a}.{b}.{d}.{e}\n",
            app = p % apps,
            a = (ip >> 24) & 255,
            b = (ip >> 16) & 255,
            d = (ip >> 8) & 255,
            e = ip & 255,
        );
    }
    for s in 0..shape.services {
        let global = if s % 2 == 0 { "\"true\"" } else { "\"false\"" };
        let _ = write!(
            out,
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: svc{s}\n  namespace: default\n  annotations:\n    service.cilium.io/global: {global}\nspec:\n  clusterIP: 172.20.{hi}.{lo}\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  selector:\n    app: app{s}\n",
            hi = s / 256,
            lo = s % 256,
        );
    }
    out
}
