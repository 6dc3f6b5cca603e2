//! kiam-rs: per-pod AWS IAM credentials for Kubernetes, a drop-in replacement for kiam and
//! kube2iam.
//!
//! A map of the crate (one credentials request flows top to bottom):
//! - [`agent`]: the node's metadata endpoint. Identifies the pod by source IP, classifies the
//!   path ([`policy::paths`]), mints IMDSv2 tokens, and asks a [`agent::Backend`].
//! - [`client`]: the gRPC backend the agent and `kiam health` use (mutual TLS).
//! - [`core`]: the request core both modes sit on ([`core::Core`]): pod lookup in [`cluster`],
//!   the decision in [`policy`], and credentials from the single-flight cache in [`creds`],
//!   which calls STS through [`aws`]; plus the prefetcher.
//! - [`server`]: `kiam server`, `kiam.KiamService` and the node view over gRPC on the core.
//! - [`kube2iam`]: kube2iam mode, the agent's metadata surface on an in-process core.
//! - [`cluster`]: pods by IP and namespaces by name, fed by a [`cluster::Source`] (the
//!   Kubernetes watch, or a manifest file).
//! - [`explain`]: `kiam explain`, the server's decision chain for one pod, from the cluster or
//!   from manifests, plus the server's cache state through [`server::debug`].
//! - [`cli`], [`telemetry`], [`tls`], [`pb`]: flags, logs, certificates, generated protobuf;
//!   [`certs`] makes and inspects the certificates (`kiam certs`).
//! - `fuzz`: the fuzz targets over every parser of untrusted input (SECURITY.md). A harness,
//!   not part of the library: compiled for the unit tests (the smoke) and under cargo-fuzz
//!   (`--cfg fuzzing`, the `fuzz/` crate) only.
//! - [`webhook`]: `kiam webhook`, the admission webhook that sets opted-in pods up for the
//!   agent's `GET /v1/credentials` (identity by projected token, EKS Pod Identity's contract).

#![forbid(unsafe_code)]

pub mod agent;
pub mod aws;
pub mod aws_roots;
pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod core;
pub mod creds;
pub mod explain;
#[cfg(any(test, fuzzing))]
pub mod fuzz;
pub mod health;
pub mod kube2iam;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod net;
pub mod pb;
pub mod policy;
pub mod rlimit;
pub mod server;
pub mod task;
pub mod telemetry;
pub mod tls;
pub mod webhook;

/// Installs aws-lc-rs as the process's rustls crypto provider. Call first in `main` and in
/// test setup: with no provider installed, rustls panics at the first handshake.
pub fn install_crypto_provider() {
    // An Err means one is installed already, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}
