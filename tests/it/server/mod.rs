//! The server: its gRPC face, Events, prefetch, what sessions carry, ServiceAccount roles, metrics
//! under kiam's names, its roots of trust for STS, and servers that share identities (`--peers`).

pub mod events;
pub mod grpc;
pub mod metrics;
pub mod prefetch;
pub mod scale_out;
pub mod scale_out_routing;
pub mod service_accounts;
pub mod session;
pub mod sts_roots;
