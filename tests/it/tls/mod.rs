//! Certificates: what `kiam certs` writes and renews, kiam's cert-manager recipe, and the agent ↔
//! server link (rotation and node binding).

pub mod certs;
pub mod renew;
pub mod transport;
pub mod usages;
