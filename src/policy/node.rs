//! Node binding (`--agent-node-binding`): an agent may ask only about pods on its own node. The
//! server and `kiam explain` both decide it here, on the one pod the request resolved to.

use crate::model::PodFacts;

/// Who asks, as node binding sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Node binding is off: any agent may ask about any pod.
    Any,
    /// The agent on this node (from its certificate's `urn:kiam:node:<name>` URI SAN).
    Node(String),
    /// Node binding is on, but the caller proved no node: it may ask about nothing.
    Unnamed,
}

/// Why node binding refuses a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NodeDenial {
    /// The caller named no node.
    #[error("node binding is on and the client certificate names no node (urn:kiam:node:<name>)")]
    Unnamed,
    /// The pod runs on another node than the caller's (or on none).
    #[error("pod {pod} is not on node {node}, the caller's")]
    OtherNode { pod: String, node: String },
    /// A pod's token came from an address that is not the pod's (`GET /v1/credentials`).
    #[error("the token of pod {pod} was presented from {from}, not from the pod's own address")]
    OtherSource { pod: String, from: std::net::IpAddr },
}

/// Whether `caller` may ask about `pod`.
pub fn check_node(pod: &PodFacts, caller: &Caller) -> Result<(), NodeDenial> {
    match caller {
        Caller::Any => Ok(()),
        Caller::Unnamed => Err(NodeDenial::Unnamed),
        Caller::Node(node) if pod.node_name.as_deref() == Some(node.as_str()) => Ok(()),
        Caller::Node(node) => Err(NodeDenial::OtherNode { pod: pod.qualified_name(), node: node.clone() }),
    }
}

/// Whether a request from `source` may present `pod`'s token: it must come from one of the pod's
/// own addresses, or, for a hostNetwork pod (whose addresses are the node's), from the node's
/// loopback, which no other machine can send from.
pub fn check_source(pod: &PodFacts, source: std::net::IpAddr) -> Result<(), NodeDenial> {
    let source = source.to_canonical();
    if pod.addresses().contains(&source) || (pod.host_network && source.is_loopback()) {
        return Ok(());
    }
    Err(NodeDenial::OtherSource { pod: pod.qualified_name(), from: source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_pods_own_node_may_ask() {
        let pod = PodFacts::test("ns", "web", "10.0.0.5", Some("r")); // on node-1
        assert_eq!(check_node(&pod, &Caller::Any), Ok(()));
        assert_eq!(check_node(&pod, &Caller::Node("node-1".into())), Ok(()));
        assert_eq!(
            check_node(&pod, &Caller::Node("node-2".into())),
            Err(NodeDenial::OtherNode { pod: "ns/web".into(), node: "node-2".into() })
        );
        assert_eq!(check_node(&pod, &Caller::Unnamed), Err(NodeDenial::Unnamed));
        let nowhere = PodFacts { node_name: None, ..pod };
        assert!(check_node(&nowhere, &Caller::Node("node-1".into())).is_err());
    }

    #[test]
    fn a_token_is_served_only_from_its_pods_address_or_a_host_network_pods_loopback() {
        let mut pod = PodFacts::test("ns", "web", "10.0.0.5", Some("r"));
        let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
        assert!(check_source(&pod, ip("10.0.0.5")).is_ok());
        assert!(check_source(&pod, ip("::ffff:10.0.0.5")).is_ok(), "v4-mapped");
        assert!(check_source(&pod, ip("10.0.0.6")).is_err(), "a neighbour");
        assert!(check_source(&pod, ip("127.0.0.1")).is_err(), "the node, for a pod-network pod");
        pod.host_network = true;
        assert!(check_source(&pod, ip("127.0.0.1")).is_ok(), "the node, for a hostNetwork pod");
        assert!(check_source(&pod, ip("10.0.0.7")).is_err(), "another machine");
    }
}
