//! Credentials: the model (with secrets that never print), the IMDS document the agent serves,
//! and the single-flight cache in front of STS.

pub mod cache;
pub mod model;
pub mod time;

pub use cache::{AssumeRole, CredentialCache, StsError, StsErrorKind};
pub use model::{Credentials, Identity, ImdsDocument, Lifetimes};
