//! placeholder
pub mod etcd;
