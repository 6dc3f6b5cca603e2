//! kube2iam mode: the binary run with kube2iam's flags, in one process per node.

pub mod mode;
