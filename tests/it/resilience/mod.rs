//! Faults injected into a whole stack and into processes, and several servers behind one name.

pub mod failover;
pub mod faults;
pub mod process_faults;
