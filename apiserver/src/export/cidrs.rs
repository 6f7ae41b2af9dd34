//! The cluster-CIDR rule of the export (`--cluster-cidr`): an endpoint IP (a Pod's, a
//! CiliumEndpoint's) or a node's pod CIDR (`IPv4AllocCIDR`/`IPv6AllocCIDR` and the
//! secondary ones) outside the cluster's CIDRs is left out of the export and reported as a
//! [`ProblemKind::OutsideClusterCidrs`] problem naming the object, the address and what to
//! do; everything else of the object, and every other object, is exported as usual. With
//! no CIDR configured there is no rule.
//!
//! Remotes apply the same rule to what they read from us (`syncer::remote::validate`), so
//! an address left out here would be refused there anyway: leaving it out keeps it from
//! counting as a hostile entry on every peer, and says where the mistake is.
//!
//! The full pass and the incremental pass both filter through [`inside`], before claims on
//! shared IPs are decided, so a refused claim never owns an IP and both passes agree.

use clustermesh_types::cluster_cidrs::ClusterCidrs;
use clustermesh_types::model::Cidr;

use super::{Problem, ProblemKind};

fn refusal(cidrs: &ClusterCidrs, object: String, what: String) -> Problem {
    Problem {
        kind: ProblemKind::OutsideClusterCidrs,
        object,
        message: format!(
            "{what} is outside the cluster CIDRs {cidrs}: not exported (remote clusters would \
             refuse it); fix the address, or add its range to --cluster-cidr"
        ),
    }
}

/// Whether endpoint IP `ip` of `object` (`Pod/<ns>/<name>`) may be exported; if not, the
/// refusal is added to `problems`. An IP that does not parse is left to the callers' own
/// checks (they only pass valid ones).
pub(super) fn inside(
    cidrs: &ClusterCidrs,
    object: impl FnOnce() -> String,
    ip: &str,
    problems: &mut Vec<Problem>,
) -> bool {
    if cidrs.is_empty() {
        return true;
    }
    match ip.parse() {
        Ok(addr) if !cidrs.contains_ip(&addr) => {
            problems.push(refusal(cidrs, object(), format!("address {ip}")));
            false
        }
        _ => true,
    }
}

/// [`inside`] without a report (for rebuilding the incremental index, whose problems the
/// full pass before it reported).
pub(super) fn allowed(cidrs: &ClusterCidrs, ip: &str) -> bool {
    inside(cidrs, String::new, ip, &mut Vec::new())
}

/// A node's pod CIDRs without those outside the cluster's CIDRs (each refused one added to
/// `problems`).
pub(super) fn node_cidrs(
    cidrs: &ClusterCidrs,
    object: &str,
    pod_cidrs: Vec<Cidr>,
    problems: &mut Vec<Problem>,
) -> Vec<Cidr> {
    pod_cidrs
        .into_iter()
        .filter(|c| {
            let ok = cidrs.contains_prefix(c);
            if !ok {
                problems.push(refusal(cidrs, object.into(), format!("pod CIDR {c}")));
            }
            ok
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_name_object_address_and_hint() {
        let cidrs = ClusterCidrs::parse(["10.1.0.0/16", "fd00:1::/64"]).unwrap();
        let mut problems = Vec::new();
        assert!(inside(
            &cidrs,
            || "Pod/a/b".into(),
            "10.1.0.5",
            &mut problems
        ));
        assert!(inside(
            &cidrs,
            || "Pod/a/b".into(),
            "fd00:1::5",
            &mut problems
        ));
        assert!(problems.is_empty());
        assert!(!inside(
            &cidrs,
            || "Pod/a/c".into(),
            "10.9.0.5",
            &mut problems
        ));
        assert!(!inside(
            &cidrs,
            || "Pod/a/c".into(),
            "fd00:9::5",
            &mut problems
        ));
        assert_eq!(problems.len(), 2);
        let p = &problems[1];
        assert_eq!(p.kind, ProblemKind::OutsideClusterCidrs);
        assert_eq!(p.object, "Pod/a/c");
        assert!(
            p.message.contains("fd00:9::5")
                && p.message.contains("10.1.0.0/16,fd00:1::/64")
                && p.message.contains("--cluster-cidr"),
            "{}",
            p.message
        );
        let kept = node_cidrs(
            &cidrs,
            "Node/n1",
            vec![
                "10.1.3.0/24".parse().unwrap(),
                "10.0.0.0/8".parse().unwrap(),
            ],
            &mut problems,
        );
        assert_eq!(kept, vec!["10.1.3.0/24".parse::<Cidr>().unwrap()]);
        assert!(problems[2].message.contains("pod CIDR 10.0.0.0/8"));
        let none = ClusterCidrs::default();
        assert!(inside(&none, || unreachable!(), "8.8.8.8", &mut problems));
    }
}
