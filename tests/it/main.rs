//! The one integration-test binary (every `tests/*.rs` would link its own copy of kube, AWS and tonic).
//!
//! `support/` holds the real and fake peers the tests run against: moto for STS, a fake Kubernetes
//! API server that follows the list/watch protocol, a fake upstream metadata service, test
//! certificates, pod network namespaces and the real AWS SDKs as pod-side clients.

mod access;
mod agent;
mod agent_hostile;
mod architecture;
mod binary;
mod certs;
mod certs_renew;
mod compat;
mod deploy;
mod deploy_cases;
mod deploy_compat;
mod deploy_helm_test;
mod deploy_kube2iam;
mod deploy_kustomize;
mod e2e;
mod events;
mod explain;
mod failover;
mod failures;
mod fake_kube_tests;
mod faults;
mod faults_process;
mod grpcio;
mod hardening;
mod image_user;
mod kube2iam;
mod lookup;
mod metrics;
mod monitoring;
mod netns_agent;
mod netns_binary;
mod netns_connlimit;
mod netns_interception;
mod netns_pod_token;
mod node_view;
mod peers_tests;
mod pod_token;
mod pod_token_keys;
mod pod_token_source;
mod prefetch;
mod readiness;
mod release;
mod scale_out;
mod scale_out_routing;
mod server;
mod service_accounts;
mod session;
mod sts_roots;
mod support;
mod tls_usages;
mod transport;
mod view_outage;
mod webhook;
