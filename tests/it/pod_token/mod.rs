//! `GET /v1/credentials` (the EKS Pod Identity compatible endpoint) and the server's verification of
//! pods' tokens.

pub mod endpoint;
pub mod keys;
