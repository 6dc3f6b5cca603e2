//! TokenReview for the fake API server, answered as a real one answers it
//! (`shared/reference/test-peers.md` §8): only authenticated callers may ask; the status carries
//! `authenticated`, the audiences (the intersection of the token's with the request's), and the
//! user with the pod-bound extras (`pod-name`, `pod-uid` and, since 1.32, `node-name`).

use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};

use super::fake_kube::Shared;
use super::fake_kube_http::{ApiError, respond};

/// What a token the test issued stands for.
#[derive(Clone, Debug)]
pub struct TokenIdentity {
    /// `namespace:name` of the ServiceAccount.
    pub service_account: String,
    pub audiences: Vec<String>,
    pub pod_name: String,
    pub pod_uid: String,
    /// The node the pod-bound token names; `None` for a token without one.
    pub node: Option<String>,
    /// An expired token authenticates nothing.
    pub expired: bool,
}

impl TokenIdentity {
    /// A valid pod-bound token of the agents' ServiceAccount (`kube-system:kiam-agent`) for
    /// audience `kiam`, on `node`.
    pub fn agent_on(node: &str) -> TokenIdentity {
        TokenIdentity {
            service_account: "kube-system:kiam-agent".into(),
            audiences: vec!["kiam".into()],
            pod_name: format!("kiam-agent-{node}"),
            pod_uid: format!("uid-agent-{node}"),
            node: Some(node.into()),
            expired: false,
        }
    }
}

/// The audience of pods' tokens for the container credentials endpoint (EKS Pod Identity's).
pub const POD_AUDIENCE: &str = "pods.eks.amazonaws.com";

impl TokenIdentity {
    /// A valid token of pod `namespace/name` (ServiceAccount `default`) with `uid`, on `node`, for
    /// [`POD_AUDIENCE`].
    pub fn pod(namespace: &str, name: &str, uid: &str, node: &str) -> TokenIdentity {
        TokenIdentity {
            service_account: format!("{namespace}:default"),
            audiences: vec![POD_AUDIENCE.into()],
            pod_name: name.into(),
            pod_uid: uid.into(),
            node: Some(node.into()),
            expired: false,
        }
    }

    /// A token string shaped as a projected one (a compact JWS whose payload carries `exp`, the
    /// audiences and the pod), unique per call, for [`FakeKube::issue_token`]. Unsigned: only
    /// the fake's TokenReview decides whether it is valid.
    ///
    /// [`FakeKube::issue_token`]: super::fake_kube::FakeKube::issue_token
    pub fn jwt(&self) -> String {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let exp = if self.expired { now.as_secs() - 60 } else { now.as_secs() + 3600 };
        let payload = json!({
            "aud": self.audiences, "exp": exp, "iat": now.as_secs(), "jti": nonce.to_string(),
            "kubernetes.io": {"namespace": self.service_account.split(':').next(),
                "pod": {"name": self.pod_name, "uid": self.pod_uid}},
        });
        format!(
            "{}.{}.{}",
            base64url(br#"{"alg":"RS256"}"#),
            base64url(payload.to_string().as_bytes()),
            "c2ln"
        )
    }
}

/// Unpadded base64url.
fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

/// `POST /apis/authentication.k8s.io/v1/tokenreviews`.
pub(crate) fn token_review(shared: &Shared, headers: &HeaderMap, body: &[u8]) -> Result<Response, ApiError> {
    let caller = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if caller != Some("Bearer fake-token") {
        return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::new(400, "BadRequest", format!("not JSON: {e}")))?;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect())
        .unwrap_or_default();
    let known = shared.lock().tokens.get(token).cloned();
    let status = match known {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(identity) if identity.expired => json!({"authenticated": false, "error": "token has expired"}),
        Some(identity) => {
            let audiences: Vec<&String> = if wanted.is_empty() {
                identity.audiences.iter().collect()
            } else {
                identity.audiences.iter().filter(|a| wanted.contains(a)).collect()
            };
            if audiences.is_empty() {
                json!({"authenticated": false, "error": "token audiences are invalid for the target audiences"})
            } else {
                let (namespace, _) = identity.service_account.split_once(':').unwrap_or(("default", ""));
                let mut extra = json!({
                    "authentication.kubernetes.io/pod-name": [identity.pod_name],
                    "authentication.kubernetes.io/pod-uid": [identity.pod_uid],
                });
                if let Some(node) = &identity.node {
                    extra["authentication.kubernetes.io/node-name"] = json!([node]);
                }
                json!({
                    "authenticated": true,
                    "audiences": audiences,
                    "user": {
                        "username": format!("system:serviceaccount:{}", identity.service_account),
                        "uid": "uid-sa",
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{namespace}"), "system:authenticated"],
                        "extra": extra,
                    },
                })
            }
        }
    };
    let answer = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    });
    Ok(respond(201, &answer))
}
