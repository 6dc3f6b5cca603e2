//! The agent's own surface against a real server: its HTTP answers, which pod a caller is, the
//! node view, node readiness, and the one mapping from a failure to what a pod sees.

pub mod failures;
pub mod http;
pub mod lookup;
pub mod node_view;
pub mod readiness;
