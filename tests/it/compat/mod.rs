//! What a user switching from kiam or kube2iam relies on: the compatibility table, and kiam's wire
//! protocol through an independent gRPC implementation.

pub mod grpcio;
pub mod table;
