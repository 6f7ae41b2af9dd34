//! Flow filters of the UI's `/api/flows` and `/api/events`, parsed from a query string, with
//! the meaning of `clustermesh observe`'s flags: every non-empty field must match, any value
//! of a repeated field may match; pods are `[namespace/]name-prefix`.
//!
//! It must not know how flows are stored or sent: it sees only a flow's [`Keys`].

use std::fmt;

use clustermesh_observer_api as api;
use serde::Serialize;

/// The filter keys a query string may carry (others are the endpoint's own or an error).
pub const KEYS: &[&str] = &[
    "cluster",
    "from-cluster",
    "to-cluster",
    "pod",
    "from-pod",
    "to-pod",
    "verdict",
];

/// A flow filter.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Filter {
    /// Source or destination cluster.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster: Vec<String>,
    /// Source cluster (`observe --from-cluster`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_cluster: Vec<String>,
    /// Destination cluster (`observe --to-cluster`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to_cluster: Vec<String>,
    /// Source or destination pod.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pod: Vec<String>,
    /// Source pod (`observe --from-pod`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub from_pod: Vec<String>,
    /// Destination pod (`observe --to-pod`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub to_pod: Vec<String>,
    /// Verdicts (`FORWARDED`, `DROPPED`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<Verdict>,
}

/// A verdict a filter can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Verdict {
    /// Delivered.
    Forwarded,
    /// Dropped (by policy or as invalid).
    Dropped,
}

/// A query string the filter cannot take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One side of a flow, as much as filters need.
#[derive(Debug, Clone, Default)]
pub struct Side {
    /// Cluster name (empty when unknown).
    pub cluster: Box<str>,
    /// Kubernetes namespace.
    pub namespace: Box<str>,
    /// Pod name (empty for non-pods).
    pub pod: Box<str>,
}

impl Side {
    fn of(e: Option<&api::Endpoint>) -> Self {
        e.map(|e| Self {
            cluster: e.cluster.as_str().into(),
            namespace: e.namespace.as_str().into(),
            pod: e.pod_name.as_str().into(),
        })
        .unwrap_or_default()
    }
}

/// What filters look at in a flow.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// `api::Verdict` as i32.
    pub verdict: i32,
    /// Source.
    pub src: Side,
    /// Destination.
    pub dst: Side,
}

impl Keys {
    /// The keys of `f`.
    pub fn of(f: &api::Flow) -> Self {
        Self {
            verdict: f.verdict,
            src: Side::of(f.source.as_ref()),
            dst: Side::of(f.destination.as_ref()),
        }
    }
}

impl Filter {
    /// Parses the filter keys of `query` (`application/x-www-form-urlencoded`); returns the
    /// pairs that are not filter keys for the caller to judge. Empty values are ignored (an
    /// empty form field means "any").
    pub fn parse(query: &str) -> Result<(Self, Vec<(String, String)>), Error> {
        let mut f = Self::default();
        let mut rest = Vec::new();
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let v = v.trim();
            if v.is_empty() && KEYS.contains(&k.as_ref()) {
                continue;
            }
            match k.as_ref() {
                "cluster" => f.cluster.push(v.to_owned()),
                "from-cluster" => f.from_cluster.push(v.to_owned()),
                "to-cluster" => f.to_cluster.push(v.to_owned()),
                "pod" => f.pod.push(v.to_owned()),
                "from-pod" => f.from_pod.push(v.to_owned()),
                "to-pod" => f.to_pod.push(v.to_owned()),
                "verdict" => f.verdict.push(match v.to_ascii_uppercase().as_str() {
                    "FORWARDED" => Verdict::Forwarded,
                    "DROPPED" => Verdict::Dropped,
                    _ => {
                        return Err(Error(format!(
                            "verdict {v:?} is not one of FORWARDED, DROPPED"
                        )))
                    }
                }),
                _ => rest.push((k.into_owned(), v.to_owned())),
            }
        }
        Ok((f, rest))
    }

    /// Whether nothing is filtered.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether a flow with `k` passes.
    pub fn matches(&self, k: &Keys) -> bool {
        fn cluster(sel: &[String], s: &Side) -> bool {
            sel.iter().any(|c| *c == *s.cluster)
        }
        fn pod(sel: &[String], s: &Side) -> bool {
            sel.iter().any(|p| match p.split_once('/') {
                Some((ns, name)) => *s.namespace == *ns && s.pod.starts_with(name),
                None => !s.pod.is_empty() && s.pod.starts_with(p.as_str()),
            })
        }
        let any = |sel: &[String], f: fn(&[String], &Side) -> bool, side: Option<&Side>| {
            sel.is_empty()
                || match side {
                    Some(s) => f(sel, s),
                    None => f(sel, &k.src) || f(sel, &k.dst),
                }
        };
        let verdict = self.verdict.is_empty()
            || self.verdict.iter().any(|v| {
                k.verdict
                    == match v {
                        Verdict::Forwarded => api::Verdict::Forwarded as i32,
                        Verdict::Dropped => api::Verdict::Dropped as i32,
                    }
            });
        verdict
            && any(&self.cluster, cluster, None)
            && any(&self.from_cluster, cluster, Some(&k.src))
            && any(&self.to_cluster, cluster, Some(&k.dst))
            && any(&self.pod, pod, None)
            && any(&self.from_pod, pod, Some(&k.src))
            && any(&self.to_pod, pod, Some(&k.dst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(verdict: api::Verdict, src: (&str, &str), dst: (&str, &str)) -> Keys {
        let side = |(c, p): (&str, &str)| Side {
            cluster: c.into(),
            namespace: "default".into(),
            pod: p.into(),
        };
        Keys {
            verdict: verdict as i32,
            src: side(src),
            dst: side(dst),
        }
    }

    #[test]
    fn filters_mean_what_observe_flags_mean() {
        let k = keys(
            api::Verdict::Dropped,
            ("c1", "echo-2-1"),
            ("c2", "echo-1-1"),
        );
        let m = |q: &str| Filter::parse(q).map(|(f, _)| f.matches(&k)).unwrap();
        assert!(m(""));
        assert!(m("cluster=c2"), "either side");
        assert!(m("cluster=c1&cluster=c9"), "any value of a repeated key");
        assert!(!m("cluster=c3"));
        assert!(m("from-cluster=c1&to-cluster=c2"));
        assert!(!m("from-cluster=c2"));
        assert!(m("pod=echo-1"), "destination matches by prefix");
        assert!(m("from-pod=default/echo-2"));
        assert!(!m("from-pod=kube-system/echo-2"));
        assert!(!m("to-pod=echo-2"));
        assert!(m("verdict=dropped"));
        assert!(!m("verdict=FORWARDED"));
        assert!(m("cluster=&pod=&verdict="), "empty form fields mean any");
    }

    #[test]
    fn bad_input_is_named_and_unknown_keys_are_returned() {
        let e = Filter::parse("verdict=maybe").unwrap_err();
        assert!(e.0.contains("FORWARDED, DROPPED"), "{e}");
        let (f, rest) = Filter::parse("last=5&cluster=c1").unwrap();
        assert_eq!(f.cluster, ["c1"]);
        assert_eq!(rest, [("last".to_owned(), "5".to_owned())]);
    }
}
