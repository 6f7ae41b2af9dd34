//! What the clustermesh-apiserver and the `clustermesh` CLI share about Kubernetes, so that
//! neither imports the other:
//!
//! - [`client`]: a kube-rs client from a kubeconfig file and context (or the pod's service
//!   account), with errors that name the file and the context;
//! - [`resources`]: what the apiserver's Kubernetes source watches and the ClusterRole rules
//!   that follow from it, written once as data;
//! - [`objects`]: every object of a cluster's mesh install (the apiserver Deployment with its
//!   etcd sidecar, the etcd Service, RBAC, the agent DaemonSet, ConfigMaps, certificate
//!   Secrets) as typed k8s-openapi values — the same code renders `deploy/kubernetes/` and
//!   is what `clustermesh enable --context` applies;
//! - [`kubelet`]: one container of those objects materialised off-cluster (its ConfigMap and
//!   Secret volumes as files, its command line expanded), which is how the lab runs them;
//! - [`apply`]: server-side apply (field manager `clustermesh`) and deletes that report what
//!   changed, and the one-line explanations of API errors.
//!
//! It must not decide policy (which cluster connects to which, when to issue certificates):
//! the CLI does. It holds no certificate code (that is `clustermesh-certs`).

pub mod apply;
pub mod client;
pub mod kubelet;
pub mod objects;
pub mod resources;

pub use k8s_openapi;
pub use kube;
