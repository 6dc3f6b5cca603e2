//! The helper commands: `kiam explain` and `kiam webhook`.

pub mod explain;
pub mod webhook;
