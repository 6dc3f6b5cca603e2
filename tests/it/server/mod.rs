//! The server: its gRPC face, Events, prefetch, what sessions carry, ServiceAccount roles, metrics
//! under kiam's names, and its roots of trust for STS.

pub mod events;
pub mod grpc;
pub mod metrics;
pub mod prefetch;
pub mod service_accounts;
pub mod session;
pub mod sts_roots;
