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
}
