//! Test support for clustermesh's end-to-end suites: a real etcd over mTLS (`etcd`), our
//! binaries as processes (`process`), labs (`lab`), a headless Chromium over WebDriver
//! (`browser`), the Cilium scenario runner (`scenario`), and a small honest Kubernetes API
//! server for the real kube-rs client (`kubeapi`).

/// The raw etcd client, for test code that must write what no product writes.
pub use etcd_client;

pub mod browser;
pub mod etcd;
pub mod fixtures;
pub mod kubeapi;
pub mod lab;
pub mod process;
pub mod scenario;
