//! placeholder
pub mod etcd;
pub mod scenario;
