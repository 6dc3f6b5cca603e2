//! The one rule for "this pod owns this IP", used wherever an address is turned into a pod: the
//! cluster's index (so the server's lookups, the node view and prefetch), `kiam explain`, and
//! kube2iam mode's `/debug/store`.
//!
//! Finished and hostNetwork pods never own an address (a hostNetwork pod shares the node's). A
//! terminating pod keeps its IP until another live pod has it: a new pod on a reused IP wins, so
//! it never receives the old pod's credentials. Two live pods that are not terminating are
//! ambiguous, and so are several terminating ones with no other claimant: nobody guesses.

use super::PodFacts;

/// Who owns an IP among the pods that claim it.
#[derive(Clone, Debug, PartialEq)]
pub enum IpOwner<P> {
    /// No pod that can own an address claims it.
    Nobody,
    /// This pod.
    One(P),
    /// Several pods claim it with equal right: the request is refused.
    Several(Vec<P>),
}

/// So that [`ip_owner`] takes plain facts as well as `Arc`s of them.
impl AsRef<PodFacts> for PodFacts {
    fn as_ref(&self) -> &PodFacts {
        self
    }
}

impl PodFacts {
    /// Whether the pod can own an address at all: not finished, not hostNetwork.
    pub fn can_own_ip(&self) -> bool {
        !self.phase.is_finished() && !self.host_network
    }
}

/// The owner among `claimants`, every pod that has the IP (in any state).
pub fn ip_owner<P: AsRef<PodFacts>>(claimants: impl IntoIterator<Item = P>) -> IpOwner<P> {
    let (mut live, mut terminating): (Vec<P>, Vec<P>) =
        claimants.into_iter().filter(|p| p.as_ref().can_own_ip()).partition(|p| !p.as_ref().terminating);
    match (live.pop(), terminating.pop()) {
        (Some(pod), _) if live.is_empty() => IpOwner::One(pod),
        (Some(pod), _) => {
            live.push(pod);
            IpOwner::Several(live)
        }
        (None, Some(pod)) if terminating.is_empty() => IpOwner::One(pod),
        (None, Some(pod)) => {
            terminating.push(pod);
            IpOwner::Several(terminating)
        }
        (None, None) => IpOwner::Nobody,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Phase;

    fn pod(name: &str) -> PodFacts {
        PodFacts::test("ns", name, "10.0.0.1", Some("app"))
    }

    fn names(owner: IpOwner<&PodFacts>) -> Vec<&str> {
        match owner {
            IpOwner::Nobody => vec![],
            IpOwner::One(p) => vec![&*p.name],
            IpOwner::Several(ps) => {
                let mut names: Vec<&str> = ps.iter().map(|p| &*p.name).collect();
                names.sort_unstable();
                names
            }
        }
    }

    #[test]
    fn finished_and_host_network_pods_never_own_an_address() {
        let mut done = pod("done");
        done.phase = Phase::Succeeded;
        let mut host = pod("host");
        host.host_network = true;
        assert!(!done.can_own_ip() && !host.can_own_ip() && pod("live").can_own_ip());
        assert_eq!(ip_owner([&done, &host]), IpOwner::Nobody);
        assert_eq!(ip_owner(Vec::<&PodFacts>::new()), IpOwner::Nobody);
        let live = pod("live");
        assert!(matches!(ip_owner([&done, &live, &host]), IpOwner::One(p) if &*p.name == "live"));
    }

    #[test]
    fn a_terminating_pod_keeps_its_ip_until_another_pod_has_it() {
        let mut old = pod("old");
        old.terminating = true;
        assert_eq!(names(ip_owner([&old])), ["old"]);
        let new = pod("new");
        assert!(matches!(ip_owner([&old, &new]), IpOwner::One(p) if &*p.name == "new"));
        assert!(matches!(ip_owner([&new, &old]), IpOwner::One(p) if &*p.name == "new"));
    }

    #[test]
    fn equal_claims_are_ambiguous() {
        let (a, b) = (pod("a"), pod("b"));
        let mut old = pod("old");
        old.terminating = true;
        assert!(matches!(ip_owner([&a, &old, &b]), IpOwner::Several(_)));
        assert_eq!(names(ip_owner([&a, &old, &b])), ["a", "b"], "the terminating pod is not among them");
        let mut older = pod("older");
        older.terminating = true;
        assert_eq!(names(ip_owner([&old, &older])), ["old", "older"]);
    }
}
