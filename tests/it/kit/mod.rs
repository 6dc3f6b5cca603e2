//! Tests of the test kit itself (`kiam-testkit` and `support/`): each fails if its peer is broken,
//! so that a passing suite means the peers did what the other tests assume.

pub mod fake_kube;
pub mod peers;
