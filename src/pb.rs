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

/// The codec of kiam-rs's own services (`proto/kiamrs/`; kiam's and the kubelet's, whose calls
/// are all unary, keep tonic's): prost's, with buffers of 1 KiB where tonic's default
/// is 8 KiB. A stream keeps one buffer for what it sends and one for what it receives for as
/// long as it lives: with the default, a node-view stream cost the server 16 KiB of buffers for
/// an agent's Subscribe and Acks (figure 11 counts memory per agent, 2,000 of them). A larger
/// message (a snapshot) grows the buffer 1 KiB at a time.
pub struct Compact<T, U>(std::marker::PhantomData<fn(T) -> U>);

impl<T, U> Default for Compact<T, U> {
    fn default() -> Self {
        Compact(std::marker::PhantomData)
    }
}

/// [`Compact`]'s buffers; the yield threshold stays tonic's (32 KiB).
fn buffers() -> tonic::codec::BufferSettings {
    tonic::codec::BufferSettings::new(1024, 32 * 1024)
}

impl<T, U> tonic::codec::Codec for Compact<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = tonic_prost::ProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstEncoder::new(buffers())
    }

    fn decoder(&mut self) -> Self::Decoder {
        tonic_prost::ProstDecoder::new(buffers())
    }
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
