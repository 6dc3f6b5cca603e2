//! The test kit: the real and fake peers that the integration tests (`tests/it/`) and the
//! benchmarks (`bench/`) run kiam-rs against, in one crate that both depend on.
//!
//! - STS: moto, a real implementation run from the project's virtualenv ([`moto`]), and faults
//!   injected in front of it ([`sts_faults`]).
//! - Kubernetes: a fake API server that follows the list/watch protocol, with TokenReview and the
//!   service-account issuer's keys ([`fake_kube`]), and builders for its objects ([`objects`]).
//! - The node: a fake upstream metadata service ([`fake_imds`]), pods as network namespaces with the
//!   real `iptables` ([`netns`], [`netns6`]), and the real AWS SDKs run inside them ([`sdk`]).
//! - Assembly: test certificates ([`certs`]), an in-process server and agent ([`stack`],
//!   [`agent_node`]), several servers behind one name ([`names`]), a small HTTP client ([`http`], [`raw_http`]), metrics scraping
//!   ([`metrics`]) and waiting on a condition with a timeout ([`wait`]).
//!
//! Starting the `kiam` binary itself stays with the tests (`tests/it/support/process.rs`): only an
//! integration test of the root package knows where cargo built it.

pub mod agent_node;
pub mod apart;
pub mod certs;
pub mod fake_imds;
pub mod fake_kube;
pub mod fake_kube_auth;
mod fake_kube_http;
mod fake_kube_watch;
pub mod http;
pub mod metrics;
pub mod moto;
pub mod names;
pub mod netns;
pub mod netns6;
pub mod objects;
pub mod raw_http;
pub mod sdk;
pub mod stack;
pub mod sts_faults;
pub mod wait;
