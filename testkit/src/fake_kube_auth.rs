//! TokenReview for the fake API server, answered as a real one answers it
//! (as the Kubernetes API documents it): only authenticated callers may ask; the status carries
//! `authenticated`, the audiences (the intersection of the token's with the request's), and the
//! user with the pod-bound extras (`pod-name`, `pod-uid` and, since 1.32, `node-name`). Like a
//! real one, it publishes its ServiceAccount signing key (issuer discovery and `/openid/v1/jwks`)
//! and signs the tokens it issues with it (ES256, one P-256 key per test process).

use std::sync::OnceLock;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

use axum::http::{HeaderMap, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::fake_kube::Shared;
use crate::fake_kube_http::{ApiError, respond};

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
    /// `iss`: [`ISSUER`] for the cluster's own tokens.
    pub issuer: String,
    /// `nbf`, in seconds from now (negative: in the past).
    pub not_before: i64,
    /// The key that signs it.
    pub signer: Signer,
}

/// The issuer the fake API server names in its discovery and its tokens.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The id of the fake's signing key in its JWKS.
const KID: &str = "fake-cluster-key";

/// Who signs a token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The fake API server's published key.
    Cluster,
    /// Another key, announced under the cluster key's id (a forger's).
    Forger,
    /// Another key, under an id the cluster does not publish.
    UnknownKid,
}

fn key(signer: Signer) -> &'static EcdsaKeyPair {
    static CLUSTER: OnceLock<EcdsaKeyPair> = OnceLock::new();
    static FORGER: OnceLock<EcdsaKeyPair> = OnceLock::new();
    let make = || EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("a P-256 key");
    match signer {
        Signer::Cluster => CLUSTER.get_or_init(make),
        Signer::Forger | Signer::UnknownKid => FORGER.get_or_init(make),
    }
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
            issuer: ISSUER.into(),
            not_before: -10,
            signer: Signer::Cluster,
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
            issuer: ISSUER.into(),
            not_before: -10,
            signer: Signer::Cluster,
        }
    }

    /// A token string shaped as a projected one (a compact JWS whose payload carries `exp`, the
    /// audiences and the pod), unique per call, signed by [`TokenIdentity::signer`], for
    /// [`FakeKube::issue_token`] (which TokenReview needs; local verification does not).
    ///
    /// [`FakeKube::issue_token`]: crate::fake_kube::FakeKube::issue_token
    pub fn jwt(&self) -> String {
        static NONCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nonce = NONCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let exp = if self.expired { now.as_secs() - 60 } else { now.as_secs() + 3600 };
        let (namespace, sa) = self.service_account.split_once(':').unwrap_or(("default", "default"));
        let nbf = now.as_secs().saturating_add_signed(self.not_before);
        let payload = json!({
            "iss": self.issuer, "sub": format!("system:serviceaccount:{namespace}:{sa}"),
            "aud": self.audiences, "exp": exp, "iat": now.as_secs(), "nbf": nbf, "jti": nonce.to_string(),
            "kubernetes.io": {"namespace": namespace,
                "pod": {"name": self.pod_name, "uid": self.pod_uid},
                "serviceaccount": {"name": sa, "uid": "uid-sa"}},
        });
        let kid = if self.signer == Signer::UnknownKid { "rotated-away" } else { KID };
        let header = json!({"alg": "ES256", "kid": kid}).to_string();
        let input = format!("{}.{}", base64url(header.as_bytes()), base64url(payload.to_string().as_bytes()));
        let signature = key(self.signer).sign(&SystemRandom::new(), input.as_bytes()).expect("sign");
        format!("{input}.{}", base64url(signature.as_ref()))
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

/// `GET /.well-known/openid-configuration` (`discovery`) or `GET /openid/v1/jwks`, as a real API
/// server serves them to authenticated callers; 503 while [`FakeKube::withhold_keys`] holds.
///
/// [`FakeKube::withhold_keys`]: crate::fake_kube::FakeKube::withhold_keys
pub(crate) fn keys(shared: &Shared, headers: &HeaderMap, discovery: bool) -> Result<Response, ApiError> {
    let caller = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if caller != Some("Bearer fake-token") {
        return Err(ApiError::new(401, "Unauthorized", "Unauthorized"));
    }
    if shared.keys_withheld.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(ApiError::new(503, "ServiceUnavailable", "the key set is unavailable"));
    }
    if discovery {
        return Ok(respond(
            200,
            &json!({"issuer": ISSUER, "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
                "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["ES256"]}),
        ));
    }
    let point = key(Signer::Cluster).public_key().as_ref().to_vec();
    let (x, y) = (&point[1..33], &point[33..65]);
    let jwk = json!({"use": "sig", "kty": "EC", "kid": KID, "crv": "P-256", "alg": "ES256",
        "x": base64url(x), "y": base64url(y)});
    Ok(respond(200, &json!({"keys": [jwk]})))
}
