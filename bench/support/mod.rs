//! The integration tests' peers, reused as they are: the fake API server (with its object
//! builders), moto, the test PKI and the small HTTP client. Only the helpers the benchmarks need
//! are included, so that work in progress on the other helpers cannot break the bench build.
//!
//! The files live in `tests/it/support/` and are not edited from here. They refer to each other
//! as `super::…` and to `crate::support::…`, which is why this module keeps their names.

// Each helper has API the benchmarks do not call.
#![allow(dead_code)]

#[path = "../../tests/it/support/certs.rs"]
pub mod certs;
#[path = "../../tests/it/support/fake_kube.rs"]
pub mod fake_kube;
#[path = "../../tests/it/support/fake_kube_auth.rs"]
pub mod fake_kube_auth;
#[path = "../../tests/it/support/fake_kube_http.rs"]
mod fake_kube_http;
#[path = "../../tests/it/support/fake_kube_watch.rs"]
mod fake_kube_watch;
#[path = "../../tests/it/support/http.rs"]
pub mod http;
#[path = "../../tests/it/support/moto.rs"]
pub mod moto;
#[path = "../../tests/it/support/objects.rs"]
pub mod objects;
