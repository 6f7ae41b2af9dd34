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
//! Inputs carry what validation parsed ([`clustermesh_syncer::remote::validate`]): an
//! endpoint's prefix and host address typed (IPv4 or IPv6), an identity's number, a node's
//! name. No consumer parses a key or an address string.
//!
//! It must not hold state or do I/O: it names and translates, nothing else.

use std::sync::Arc;

use clustermesh_syncer::remote::{self, Change, Resource, Value};
use clustermesh_types::identity::Identity;
use clustermesh_types::model::{Cidr, IpcacheEntry, Node};

/// One unit of work for the reconcile loop.
#[derive(Debug, Clone)]
pub enum Input {
    /// An ipcache entry of `cluster` changed (`entry: None` = deleted).
    Endpoint {
        /// The cluster that published it.
        cluster: Arc<str>,
        /// The prefix its key names (a host entry is a `/32` or `/128`); on a delete, the
        /// last value's.
        prefix: Cidr,
        /// The validated entry.
        entry: Option<Arc<IpcacheEntry>>,
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
        /// The validated identity (derefs to its labels).
        labels: Option<Arc<Identity>>,
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
                change,
                ..
            } => Some(match change {
                Change::Upsert {
                    value: Value::Endpoint(e),
                    ..
                } => Input::Endpoint {
                    cluster,
                    prefix: e.prefix,
                    entry: Some(e),
                },
                Change::Delete {
                    last: Value::Endpoint(e),
                } => Input::Endpoint {
                    cluster,
                    prefix: e.prefix,
                    entry: None,
                },
                _ => return None,
            }),
            remote::Event::Synced {
                cluster,
                resource: Resource::Endpoints,
            } => Some(Input::Synced { cluster }),
            remote::Event::Drained { cluster } => Some(Input::Drained { cluster }),
            remote::Event::Change {
                cluster,
                resource: Resource::Identities,
                change,
                ..
            } => Some(match change {
                Change::Upsert {
                    value: Value::Identity(i),
                    ..
                } => Input::Identity {
                    cluster,
                    id: i.id,
                    labels: Some(i),
                },
                Change::Delete {
                    last: Value::Identity(i),
                } => Input::Identity {
                    cluster,
                    id: i.id,
                    labels: None,
                },
                _ => return None,
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
    fn remote_endpoints_and_identities_carry_what_validation_parsed() {
        use clustermesh_types::model::IpIdentityPair;
        let cluster: Arc<str> = Arc::from("c3");
        let pair = IpIdentityPair {
            ip: "fd00::7".into(),
            host_ip: "fd00::2".into(),
            id: 70000,
            ..IpIdentityPair::default()
        };
        let e = Arc::new(IpcacheEntry::new(pair).expect("entry"));
        let change = |change| remote::Event::Change {
            cluster: cluster.clone(),
            resource: Resource::Endpoints,
            key: "cilium/cache/ip/v1/c3/fd00::7".into(),
            change,
        };
        let up = change(Change::Upsert {
            raw: Bytes::from_static(b"{}"),
            value: Value::Endpoint(e.clone()),
        });
        assert!(matches!(
            Input::from_remote(up),
            Some(Input::Endpoint { prefix, entry: Some(_), .. }) if prefix == e.prefix
        ));
        // A delete names the prefix of the last value (nothing parses the key).
        let down = change(Change::Delete {
            last: Value::Endpoint(e.clone()),
        });
        assert!(matches!(
            Input::from_remote(down),
            Some(Input::Endpoint { prefix, entry: None, .. }) if prefix.to_string() == "fd00::7/128"
        ));
        let id = Arc::new(Identity {
            id: 196915,
            ..Identity::default()
        });
        let down = remote::Event::Change {
            cluster: cluster.clone(),
            resource: Resource::Identities,
            key: "not/a/number".into(),
            change: Change::Delete {
                last: Value::Identity(id),
            },
        };
        assert!(matches!(
            Input::from_remote(down),
            Some(Input::Identity {
                id: 196915,
                labels: None,
                ..
            })
        ));
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
