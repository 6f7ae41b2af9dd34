//! The clustermesh node agent: loads and pins the eBPF datapath, checks that the kernel can
//! run it, and (next) reconciles its maps from the syncer's caches.
//!
//! It must not talk to the Kubernetes API (agents read only etcd, DESIGN.md decision 1) and
//! must not create or configure interfaces: the CNI (or the lab) owns them.
// The datapath needs raw syscalls and BPF; every `unsafe` block carries a `// SAFETY:` note.
#![allow(unsafe_code)]

pub mod datapath;
pub mod kernel;
