//! The `kiam` binary itself: kiam's flags as a DaemonSet passes them, and start-up hardening.

pub mod flags;
pub mod hardening;
