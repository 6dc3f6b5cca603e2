//! The peers the tests run against: the test kit (`kiam-testkit`, shared with the benchmarks),
//! re-exported here, and the one helper only an integration test can have, which starts the
//! `kiam` binary cargo built for it ([`process`]).
pub use kiam_testkit::*;
pub mod process;
