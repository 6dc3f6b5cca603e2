//! Nodes made of network namespaces with the real `iptables`: interception, the binary as a
//! DaemonSet runs it, the connection limit and the container endpoint.

pub mod agent;
pub mod binary;
pub mod connlimit;
pub mod interception;
pub mod pod_token;
