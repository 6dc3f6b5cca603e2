//! The one integration-test binary (every `tests/*.rs` would link its own copy of kube, AWS and tonic).
//!
//! One folder per area (agent, server, security, resilience, pod_token, kube2iam, compat, netns,
//! tls, binary, deploy, tools, kit). The peers the tests run against (moto for STS, a fake
//! Kubernetes API server that follows the list/watch protocol, a fake upstream metadata service,
//! test certificates, pod network namespaces and the real AWS SDKs) are the `kiam-testkit` crate
//! (`testkit/`), shared with the benchmarks; `support/` re-exports it and starts the binary.

mod agent;
mod architecture;
mod binary;
mod compat;
mod deploy;
mod e2e;
mod kit;
mod kube2iam;
mod netns;
mod pod_token;
mod resilience;
mod security;
mod server;
mod support;
mod tls;
mod tools;
