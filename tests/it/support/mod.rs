//! Peers and fixtures shared by the integration tests.
pub mod agent_node;
pub mod certs;
pub mod fake_imds;
pub mod fake_kube;
pub mod fake_kube_auth;
mod fake_kube_http;
mod fake_kube_watch;
pub mod http;
pub mod moto;
pub mod netns;
pub mod netns6;
pub mod objects;
pub mod process;
pub mod raw_http;
pub mod sdk;
pub mod stack;
pub mod sts_faults;
pub mod wait;
