//! Finding the pod to explain exactly as the server would: the pods read from the cluster or
//! the manifests are fed to the server's own [`PodIndex`], whose `lookup` applies the one rule
//! for who owns an IP ([`crate::model::ip_owner`]: finished and hostNetwork pods never match, a
//! terminating pod keeps its IP until another live pod has it, and several live pods on one IP
//! are an error).

use std::net::IpAddr;

use crate::cluster::Change;
use crate::cluster::index::{Lookup, PodIndex};
use crate::model::PodFacts;

/// What the server would make of the pod in question.
#[derive(Clone, Debug)]
pub enum Located {
    /// No pod to explain. By IP, `skipped` lists the pods at the address that the server never
    /// matches (hostNetwork or finished), which usually explains why.
    Missing { ip: Option<IpAddr>, skipped: Vec<PodFacts> },
    /// Several live pods claim the IP: the server refuses to guess.
    Ambiguous { ip: IpAddr, pods: Vec<PodFacts> },
    /// The pod, and who the server finds at its IP.
    Pod { pod: Box<PodFacts>, owner: Owner },
}

/// Whom the server finds at a pod's IP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owner {
    /// This pod.
    Itself,
    /// The pod has no IP yet (or its manifest has no status): it is found once it has one.
    NoIp,
    /// The server never matches this pod: it is hostNetwork or has finished.
    Skipped,
    /// Another pod (`namespace/name`): this one is terminating and its IP was reused.
    Other(String),
    /// Several live pods (`namespace/name`), this one among them.
    Ambiguous(Vec<String>),
}

fn index(pods: &[PodFacts]) -> PodIndex {
    let mut index = PodIndex::default();
    for pod in pods {
        index.apply(Change::Apply(pod.clone()));
    }
    index
}

/// Whether the server never matches `pod` by its IP (the one rule, [`PodFacts::can_own_ip`]).
fn skipped(pod: &PodFacts) -> bool {
    !pod.can_own_ip()
}

/// The pod `namespace/name` among `pods` (which should hold every pod sharing its IP).
pub fn by_name(pods: &[PodFacts], namespace: &str, name: &str) -> Located {
    let Some(pod) = pods.iter().find(|p| &*p.namespace == namespace && &*p.name == name) else {
        return Located::Missing { ip: None, skipped: Vec::new() };
    };
    let owner = match pod.ip {
        _ if skipped(pod) => Owner::Skipped,
        None => Owner::NoIp,
        Some(ip) => match index(pods).lookup(ip) {
            Lookup::Found(p) if p.namespace == pod.namespace && p.name == pod.name => Owner::Itself,
            Lookup::Found(p) => Owner::Other(p.qualified_name()),
            Lookup::Ambiguous(ps) => Owner::Ambiguous(ps.iter().map(|p| p.qualified_name()).collect()),
            // Unreachable for a live pod with this IP in `pods`; say so rather than guess.
            Lookup::NotFound => Owner::Skipped,
        },
    };
    Located::Pod { pod: Box::new(pod.clone()), owner }
}

/// The pod the server finds at `ip` among `pods` (which should hold every pod with that IP).
pub fn by_ip(pods: &[PodFacts], ip: IpAddr) -> Located {
    match index(pods).lookup(ip) {
        Lookup::Found(pod) => Located::Pod { pod: Box::new((*pod).clone()), owner: Owner::Itself },
        Lookup::Ambiguous(ps) => Located::Ambiguous { ip, pods: ps.iter().map(|p| (**p).clone()).collect() },
        Lookup::NotFound => Located::Missing {
            ip: Some(ip),
            skipped: pods.iter().filter(|p| p.ip == Some(ip) && skipped(p)).cloned().collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn pod(name: &str, ip: &str) -> PodFacts {
        PodFacts::test("ns", name, ip, Some("role"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn owner(l: Located) -> Owner {
        match l {
            Located::Pod { owner, .. } => owner,
            other => panic!("expected a pod, got {other:?}"),
        }
    }

    #[test]
    fn by_name_checks_who_owns_the_ip() {
        let mut old = pod("old", "10.0.0.1");
        old.terminating = true;
        let pods = vec![old.clone(), pod("new", "10.0.0.1")];
        assert_eq!(owner(by_name(&pods, "ns", "new")), Owner::Itself);
        assert_eq!(owner(by_name(&pods, "ns", "old")), Owner::Other("ns/new".into()));
        assert_eq!(owner(by_name(&[old], "ns", "old")), Owner::Itself, "keeps its IP until reused");
        let twins = vec![pod("a", "10.0.0.2"), pod("b", "10.0.0.2")];
        assert!(matches!(owner(by_name(&twins, "ns", "a")), Owner::Ambiguous(v) if v.len() == 2));
        let mut host = pod("host", "10.0.0.3");
        host.host_network = true;
        assert_eq!(owner(by_name(&[host], "ns", "host")), Owner::Skipped);
        let mut pending = pod("pending", "");
        pending.phase = Phase::Pending;
        assert_eq!(owner(by_name(&[pending], "ns", "pending")), Owner::NoIp);
        assert!(matches!(by_name(&pods, "ns", "nope"), Located::Missing { ip: None, .. }));
    }

    #[test]
    fn by_ip_matches_the_server_lookup() {
        let mut done = pod("done", "10.0.0.1");
        done.phase = Phase::Succeeded;
        let mut host = pod("host", "10.0.0.1");
        host.host_network = true;
        match by_ip(&[done.clone(), host.clone()], ip("10.0.0.1")) {
            Located::Missing { skipped, .. } => assert_eq!(skipped.len(), 2),
            other => panic!("finished and hostNetwork pods never match: {other:?}"),
        }
        let live = pod("live", "10.0.0.1");
        match by_ip(&[done, host, live.clone()], ip("10.0.0.1")) {
            Located::Pod { pod, owner: Owner::Itself } => assert_eq!(&*pod.name, "live"),
            other => panic!("the live pod owns the IP: {other:?}"),
        }
        let twin = pod("twin", "10.0.0.1");
        assert!(
            matches!(by_ip(&[live, twin], ip("10.0.0.1")), Located::Ambiguous { pods, .. } if pods.len() == 2)
        );
        assert!(matches!(by_ip(&[], ip("10.0.0.9")), Located::Missing { skipped, .. } if skipped.is_empty()));
    }
}
