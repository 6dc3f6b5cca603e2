//! The generated protobuf and gRPC types: kiam's `kiam` package (from `proto/kiam/service.proto`)
//! at the top level, and kiam-rs's own diagnostics in [`debug`].

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kiam");

/// `kiamrs.node` (from `proto/kiamrs/node.proto`): the node view the server streams to agents.
pub mod node {
    tonic::include_proto!("kiamrs.node");
}

/// `kiamrs.token` (from `proto/kiamrs/token.proto`): credentials for a pod's projected token.
pub mod token {
    tonic::include_proto!("kiamrs.token");
}

/// `kiamrs.debug` (from `proto/kiamrs/debug.proto`): the server's cache state for `kiam explain`.
pub mod debug {
    tonic::include_proto!("kiamrs.debug");
}

/// The kubelet's PodResources API, `v1` (from `proto/k8s/podresources/api.proto`): the pods
/// running on this node, which the agent reads to confirm its view while no server answers.
pub mod podresources {
    tonic::include_proto!("v1");
}

/// kiam's status messages, which agents and servers of either implementation compare verbatim.
/// They live with the protocol, so that the server and the client share them without importing
/// each other.
pub mod status {
    /// A policy denial.
    pub const FORBIDDEN: &str = "forbidden by policy";
    /// An unknown pod, on `GetPodCredentials`.
    pub const NO_POD_FOUND: &str = "no pod found";
    /// An unknown pod, on `GetPodRole` (kiam spelled it differently there).
    pub const POD_NOT_FOUND: &str = "pod not found";
}
