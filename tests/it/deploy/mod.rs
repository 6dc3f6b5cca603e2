//! What ships besides the binary: the Helm chart and kustomize manifests (rendered through Helm's
//! engine and validated against Kubernetes schemas), upstream values, `helm test`, monitoring, the
//! release workflow and the image's default user.

pub mod cases;
pub mod helm_test;
pub mod image;
pub mod kube2iam;
pub mod kustomize;
pub mod monitoring;
pub mod release;
pub mod render;
pub mod upstream;
