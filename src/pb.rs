//! The generated protobuf and gRPC types: kiam's `kiam` package (from `proto/kiam/service.proto`)
//! at the top level, and kiam-rs's own diagnostics in [`debug`].

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kiam");

/// `kiamrs.debug` (from `proto/kiamrs/debug.proto`): the server's cache state for `kiam explain`.
pub mod debug {
    tonic::include_proto!("kiamrs.debug");
}
