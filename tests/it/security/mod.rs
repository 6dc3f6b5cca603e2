//! Attacks from a hostile pod or a stolen credential, each with the answer it must get: hostile
//! requests, the node view during a server outage, the server's authorization table, and where a
//! pod's token may be presented from.

pub mod access;
pub mod hostile;
pub mod token_source;
pub mod view_outage;
