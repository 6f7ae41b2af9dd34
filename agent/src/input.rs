//! The agent's input vocabulary: what its readers hand to the reconcile loop, and the
//! translation of a remote reader event into it.
//!
//! The local etcd reader ([`crate::local`]) and the remote reader (through
//! [`Input::from_remote`]) produce [`Input`]s; the loop in [`crate::app`] passes each one to
//! its consumers in a fixed order: the node table ([`crate::nodes`]), then the policy hook
//! ([`crate::policy::hook`], identities and policies, and the gate that holds an endpoint
//! until its identity is known), then the reconciler ([`crate::reconcile`], ipcache
//! entries). The consumers depend on this module, never on each other's types. Services
//! keep their own vocabulary ([`crate::services::LocalInput`] and the remote event), as
//! the services loop runs beside this one.
//!
//! It must not hold state or do I/O: it names and translates, nothing else.

use std::sync::Arc;

use clustermesh_syncer::remote::{self, Change, Resource, Value};
use clustermesh_types::identity::LabelArray;
use clustermesh_types::model::{IpIdentityPair, Node};

/// One unit of work for the reconcile loop.
#[derive(Debug, Clone)]
pub enum Input {
    /// An ipcache entry of `cluster` changed (`pair: None` = deleted).
    Endpoint {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// Its etcd key (unique per cluster).
        key: String,
        /// The validated entry.
        pair: Option<Arc<IpIdentityPair>>,
    },
    /// `cluster`'s ipcache has been listed completely (every entry before this input).
    Synced {
        /// The cluster.
        cluster: Arc<str>,
    },
    /// A removed remote's entries have all been deleted.
    Drained {
        /// The cluster.
        cluster: Arc<str>,
    },
    /// An identity of `cluster` changed (`labels: None` = deleted): for policy and flow
    /// enrichment ([`crate::policy::hook`]); the reconciler ignores it.
    Identity {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// Numeric identity.
        id: u32,
        /// Its labels.
        labels: Option<Arc<LabelArray>>,
    },
    /// A local policy changed (`raw: None` = deleted); the reconciler ignores it.
    Policy {
        /// Key below `clustermesh/local/v1/policies/`: `<kind>/<namespace>/<name>`.
        key: String,
        /// The exported policy (JSON).
        raw: Option<Vec<u8>>,
    },
    /// A node of `cluster` changed (`node: None` = deleted): for the node table
    /// ([`crate::nodes`]); the policy hook and the reconciler ignore it.
    Node {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// The node's name (its key below the cluster's node prefix, checked against the
        /// value by validation).
        name: Arc<str>,
        /// The validated node.
        node: Option<Arc<Node>>,
    },
}

impl Input {
    /// The loop's view of a remote reader event: ipcache entries, identities and nodes, the
    /// ipcache's initial sync and a remote's drain. Services and service exports go to the
    /// services loop instead (`None` here).
    pub fn from_remote(ev: remote::Event) -> Option<Input> {
        match ev {
            remote::Event::Change {
                cluster,
                resource: Resource::Endpoints,
                key,
                change,
            } => Some(Input::Endpoint {
                cluster,
                key,
                pair: match change {
                    Change::Upsert {
                        value: Value::Endpoint(p),
                        ..
                    } => Some(p),
                    Change::Upsert { .. } => return None,
                    Change::Delete { .. } => None,
                },
            }),
            remote::Event::Synced {
                cluster,
                resource: Resource::Endpoints,
            } => Some(Input::Synced { cluster }),
            remote::Event::Drained { cluster } => Some(Input::Drained { cluster }),
            remote::Event::Change {
                cluster,
                resource: Resource::Identities,
                key,
                change,
            } => Some(Input::Identity {
                cluster,
                id: key.rsplit('/').next()?.parse().ok()?,
                labels: match change {
                    Change::Upsert {
                        value: Value::Identity(l),
                        ..
                    } => Some(l),
                    Change::Upsert { .. } => return None,
                    Change::Delete { .. } => None,
                },
            }),
            remote::Event::Change {
                cluster,
                resource: Resource::Nodes,
                change,
                ..
            } => {
                let (node, present) = match change {
                    Change::Upsert {
                        value: Value::Node(n),
                        ..
                    } => (n, true),
                    Change::Delete {
                        last: Value::Node(n),
                    } => (n, false),
                    _ => return None,
                };
                Some(Input::Node {
                    cluster,
                    name: Arc::from(node.name.as_str()),
                    node: present.then_some(node),
                })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn node(name: &str) -> Arc<Node> {
        Arc::new(Node {
            name: name.into(),
            cluster: "c3".into(),
            cluster_id: 3,
            ..Node::default()
        })
    }

    #[test]
    fn remote_nodes_become_node_inputs() {
        let cluster: Arc<str> = Arc::from("c3");
        let up = remote::Event::Change {
            cluster: cluster.clone(),
            resource: Resource::Nodes,
            key: "cilium/cache/nodes/v1/c3/n1".into(),
            change: Change::Upsert {
                raw: Bytes::from_static(b"{}"),
                value: Value::Node(node("n1")),
            },
        };
        match Input::from_remote(up) {
            Some(Input::Node {
                cluster,
                name,
                node: Some(n),
            }) => {
                assert_eq!((&*cluster, &*name, n.name.as_str()), ("c3", "n1", "n1"));
            }
            other => panic!("{other:?}"),
        }
        let down = remote::Event::Change {
            cluster,
            resource: Resource::Nodes,
            key: "cilium/cache/nodes/v1/c3/n1".into(),
            change: Change::Delete {
                last: Value::Node(node("n1")),
            },
        };
        assert!(matches!(
            Input::from_remote(down),
            Some(Input::Node { node: None, ref name, .. }) if &**name == "n1"
        ));
    }
}
