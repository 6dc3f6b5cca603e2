//! `kiam webhook`: the mutating admission webhook that sets pods up for the container
//! credentials endpoint (`GET /v1/credentials` on 169.254.170.23) exactly as EKS Pod Identity's
//! webhook does: the two environment variables in every container and a projected
//! ServiceAccount token volume for our audience. The SDKs then prefer the container provider
//! over IMDS, and the pod is identified by its token, hostNetwork pods included.
//!
//! Opt-in, never by default: a pod opts in with the label (or annotation) [`OPT_IN`] `"true"`;
//! a namespace opts in with the same label, which the chart's `MutatingWebhookConfiguration`
//! turns into a second webhook entry (a `namespaceSelector`) calling [`NAMESPACE_PATH`]. A pod
//! labelled `"false"` opts out of its namespace's choice. Containers that already set either
//! variable are left alone, as EKS's webhook leaves them.
//!
//! This module is pure: [`review`] turns an AdmissionReview v1 request into its response.
//! [`serve`] is the HTTPS listener.

pub mod serve;

use k8s_openapi::api::core::v1::{Container, Pod};
use serde_json::{Value, json};

/// The pod label (or annotation), and namespace label, that opts in.
pub const OPT_IN: &str = "kiam-rs.io/container-credentials";
/// The path the pod-level webhook entry calls.
pub const POD_PATH: &str = "/mutate";
/// The path the namespace-level webhook entry calls: the namespace has opted in.
pub const NAMESPACE_PATH: &str = "/mutate-namespace";
/// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
pub const FULL_URI_VAR: &str = "AWS_CONTAINER_CREDENTIALS_FULL_URI";
/// `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`.
pub const TOKEN_FILE_VAR: &str = "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE";
/// The volume's name, as EKS's webhook names it.
pub const VOLUME: &str = "eks-pod-identity-token";
/// Where the token is mounted, as EKS's webhook mounts it.
pub const MOUNT_DIR: &str = "/var/run/secrets/pods.eks.amazonaws.com/serviceaccount";

/// What the webhook injects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Injection {
    /// `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub full_uri: String,
    /// The token's audience (the server's `--pod-token-audience`).
    pub audience: String,
    /// The token's `expirationSeconds` (the kubelet refreshes it at 80 %).
    pub expiration_seconds: i64,
}

impl Default for Injection {
    fn default() -> Injection {
        Injection {
            full_uri: "http://169.254.170.23/v1/credentials".into(),
            audience: crate::server::DEFAULT_POD_TOKEN_AUDIENCE.into(),
            expiration_seconds: 86_400,
        }
    }
}

/// Whether `pod` (in a namespace that opted in, or not) wants the injection.
pub fn opted_in(pod: &Pod, namespace_opted_in: bool) -> bool {
    let meta = &pod.metadata;
    let label = meta.labels.as_ref().and_then(|l| l.get(OPT_IN)).map(String::as_str);
    let annotation = meta.annotations.as_ref().and_then(|a| a.get(OPT_IN)).map(String::as_str);
    match label.or(annotation) {
        Some("true") => true,
        Some("false") => false,
        _ => namespace_opted_in,
    }
}

/// The JSON patch (RFC 6902) that sets `pod` up, or `None` when there is nothing to do.
pub fn patch(pod: &Pod, injection: &Injection) -> Option<Vec<Value>> {
    let spec = pod.spec.as_ref()?;
    let token_file = format!("{MOUNT_DIR}/{VOLUME}");
    let mut ops = Vec::new();
    let kinds = [("containers", Some(&spec.containers)), ("initContainers", spec.init_containers.as_ref())];
    for (kind, containers) in kinds {
        for (i, container) in containers.into_iter().flatten().enumerate() {
            if sets_either(container) {
                continue;
            }
            let env = [
                json!({"name": FULL_URI_VAR, "value": injection.full_uri}),
                json!({"name": TOKEN_FILE_VAR, "value": token_file}),
            ];
            append(&mut ops, &format!("/spec/{kind}/{i}/env"), container.env.is_some(), &env);
            let mounted = container.volume_mounts.iter().flatten().any(|m| m.name == VOLUME);
            if !mounted {
                let mount = json!({"name": VOLUME, "mountPath": MOUNT_DIR, "readOnly": true});
                let path = format!("/spec/{kind}/{i}/volumeMounts");
                append(&mut ops, &path, container.volume_mounts.is_some(), &[mount]);
            }
        }
    }
    if ops.is_empty() {
        return None;
    }
    let has_volume = spec.volumes.iter().flatten().any(|v| v.name == VOLUME);
    if !has_volume {
        let volume = json!({"name": VOLUME, "projected": {"sources": [{"serviceAccountToken": {
            "audience": injection.audience,
            "expirationSeconds": injection.expiration_seconds,
            "path": VOLUME,
        }}]}});
        append(&mut ops, "/spec/volumes", spec.volumes.is_some(), &[volume]);
    }
    Some(ops)
}

/// Whether `container` already sets either variable (then it is left as it is).
fn sets_either(container: &Container) -> bool {
    container.env.iter().flatten().any(|e| e.name == FULL_URI_VAR || e.name == TOKEN_FILE_VAR)
}

/// Adds `values` to the array at `path`: one `add` of the whole array when it does not exist,
/// else one `add` per value at its end.
fn append(ops: &mut Vec<Value>, path: &str, exists: bool, values: &[Value]) {
    if exists {
        ops.extend(values.iter().map(|v| json!({"op": "add", "path": format!("{path}/-"), "value": v})));
    } else {
        ops.push(json!({"op": "add", "path": path, "value": values}));
    }
}

/// Why a request is not an AdmissionReview we can answer.
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("not an AdmissionReview v1 request: {0}")]
    Malformed(String),
}

/// The AdmissionReview v1 response to `request`. Anything but a Pod is allowed unchanged; the
/// webhook never denies (its failure policy is the cluster's choice).
pub fn review(
    request: &Value,
    namespace_opted_in: bool,
    injection: &Injection,
) -> Result<Value, ReviewError> {
    let req = request.get("request").ok_or_else(|| ReviewError::Malformed("no request".into()))?;
    let uid =
        req.get("uid").and_then(Value::as_str).ok_or_else(|| ReviewError::Malformed("no uid".into()))?;
    let mut response = json!({"uid": uid, "allowed": true});
    let is_pod = req.pointer("/kind/kind").and_then(Value::as_str) == Some("Pod");
    if is_pod && let Some(object) = req.get("object") {
        let pod: Pod = serde_json::from_value(object.clone())
            .map_err(|e| ReviewError::Malformed(format!("object is not a Pod: {e}")))?;
        if opted_in(&pod, namespace_opted_in)
            && let Some(ops) = patch(&pod, injection)
        {
            let ops = serde_json::to_vec(&ops).map_err(|e| ReviewError::Malformed(e.to_string()))?;
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64(&ops));
        }
    }
    Ok(json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}))
}

/// Standard padded base64, as `patch` is carried.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"\xff\xfe\xfd\xfc"), "//79/A==");
    }
}
