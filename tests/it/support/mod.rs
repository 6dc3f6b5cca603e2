//! Peers and fixtures shared by the integration tests.
