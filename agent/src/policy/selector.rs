//! Label selectors (Kubernetes `LabelSelector` semantics) matched against identities' label
//! sets in Cilium's `source:key=value` form.
//!
//! A requirement key may carry a source (`k8s:app`); without one, or with `any:`, it
//! matches a label of that key from any source, as in Cilium.

use clustermesh_types::identity::LabelArray;

/// The operator of a requirement.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// The label exists with one of the values.
    In(Vec<String>),
    /// The label is absent or has none of the values.
    NotIn(Vec<String>),
    /// The label exists (any value).
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// One requirement on one label key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    /// Label source (`k8s`, `reserved`, ...); `None` = any source.
    pub source: Option<String>,
    /// Label key without source.
    pub key: String,
    /// The operator and its values (sorted, deduplicated).
    pub op: Op,
}

impl Requirement {
    /// A requirement from a selector key as written in a policy (`app`, `k8s:app`,
    /// `any:app`).
    pub fn new(key: &str, op: Op) -> Self {
        let (source, key) = split_key(key);
        let op = match op {
            Op::In(mut v) => {
                v.sort();
                v.dedup();
                Op::In(v)
            }
            Op::NotIn(mut v) => {
                v.sort();
                v.dedup();
                Op::NotIn(v)
            }
            o => o,
        };
        Self {
            source,
            key: key.to_owned(),
            op,
        }
    }

    fn value<'a>(&self, labels: &'a LabelArray) -> Option<&'a str> {
        labels
            .iter()
            .find(|l| l.key == self.key && self.source.as_deref().is_none_or(|s| s == l.source))
            .map(|l| l.value.as_str())
    }

    /// Whether `labels` satisfies the requirement.
    pub fn matches(&self, labels: &LabelArray) -> bool {
        let v = self.value(labels);
        match &self.op {
            Op::In(vals) => v.is_some_and(|v| vals.iter().any(|x| x == v)),
            Op::NotIn(vals) => v.is_none_or(|v| !vals.iter().any(|x| x == v)),
            Op::Exists => v.is_some(),
            Op::DoesNotExist => v.is_none(),
        }
    }
}

/// `k8s:app` → (`Some("k8s")`, `app`); `any:app` and `app` → (`None`, `app`). A key such as
/// `io.kubernetes.pod.namespace` has no `:` and so no source.
fn split_key(key: &str) -> (Option<String>, &str) {
    match key.split_once(':') {
        Some(("any", k)) => (None, k),
        Some((s, k)) if !s.is_empty() && !s.contains('/') && !s.contains('.') => {
            (Some(s.to_owned()), k)
        }
        _ => (None, key),
    }
}

/// A conjunction of requirements; empty matches every identity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    /// Requirements, sorted (so equal selectors compare equal and share a cache slot).
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// A selector from requirements (sorted and deduplicated here).
    pub fn new(mut requirements: Vec<Requirement>) -> Self {
        requirements.sort();
        requirements.dedup();
        Self { requirements }
    }

    /// Whether every requirement holds for `labels`.
    pub fn matches(&self, labels: &LabelArray) -> bool {
        self.requirements.iter().all(|r| r.matches(labels))
    }

    /// Whether some requirement names label `key` (any source).
    pub fn mentions(&self, key: &str) -> bool {
        self.requirements.iter().any(|r| r.key == key)
    }

    /// Adds a requirement `key = value` (source `k8s`).
    pub fn with_eq(mut self, key: &str, value: &str) -> Self {
        self.requirements
            .push(Requirement::new(key, Op::In(vec![value.to_owned()])));
        Self::new(self.requirements)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(s: &str) -> LabelArray {
        LabelArray::parse_kvstore(s).expect("labels")
    }

    #[test]
    fn operators_and_sources() {
        let l = labels("k8s:app=frontend;k8s:io.cilium.k8s.policy.cluster=c1;k8s:io.kubernetes.pod.namespace=default;");
        let eq = |k: &str, v: &str| Requirement::new(k, Op::In(vec![v.into()]));
        assert!(eq("app", "frontend").matches(&l));
        assert!(eq("k8s:app", "frontend").matches(&l));
        assert!(eq("any:app", "frontend").matches(&l));
        assert!(!eq("reserved:app", "frontend").matches(&l));
        assert!(eq("io.kubernetes.pod.namespace", "default").matches(&l));
        assert!(eq("k8s:io.cilium.k8s.policy.cluster", "c1").matches(&l));
        assert!(Requirement::new("app", Op::NotIn(vec!["backend".into()])).matches(&l));
        assert!(!Requirement::new("app", Op::NotIn(vec!["frontend".into()])).matches(&l));
        assert!(Requirement::new("tier", Op::NotIn(vec!["x".into()])).matches(&l));
        assert!(Requirement::new("app", Op::Exists).matches(&l));
        assert!(Requirement::new("tier", Op::DoesNotExist).matches(&l));
        assert!(!Requirement::new("app", Op::DoesNotExist).matches(&l));
        assert!(Selector::default().matches(&l));
        let s = Selector::default()
            .with_eq("app", "frontend")
            .with_eq("k8s:io.cilium.k8s.policy.cluster", "c2");
        assert!(!s.matches(&l));
        assert!(s.mentions("io.cilium.k8s.policy.cluster"));
    }
}
