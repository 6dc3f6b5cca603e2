//! Credentials: the model (with secrets that never print), the IMDS document the agent serves,
//! lifetimes (when to serve, refresh, or keep in spite of STS failures), and the single-flight
//! cache in front of STS with its global gate.

pub mod cache;
mod gate;
pub mod lifetimes;
pub mod model;
pub mod pace;
pub mod time;
pub mod wire;

#[cfg(test)]
mod cache_tests;

pub use cache::{AssumeRole, CacheStats, Clock, CredentialCache, StsError, StsErrorKind};
pub use lifetimes::Lifetimes;
pub use model::{Credentials, Identity, ImdsDocument};
pub use pace::Reason;
