//! Test support for clustermesh's end-to-end suites: a real etcd over mTLS (`etcd`), our
//! binaries as processes (`process`), and the Cilium scenario runner (`scenario`).

pub mod etcd;
pub mod fixtures;
pub mod lab;
pub mod process;
pub mod scenario;
