//! The generated `kiam` protobuf and gRPC types (from `proto/kiam/service.proto`).

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("kiam");
