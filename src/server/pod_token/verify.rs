//! Local verification of a pod's projected ServiceAccount token against the cluster's signing
//! keys ([`Jwks`](super::jwks::Jwks)): the signature (RS256 or ES256, as the API server signs),
//! the issuer, our audience, `exp` and `nbf`, and the pod the token is bound to (the
//! `kubernetes.io` claim). No API call is made, so a pod spraying forged tokens costs the API
//! server nothing; whether the bound pod still runs (revocation) is checked by the core against
//! the pod cache, by UID and name, on every request.

use aws_lc_rs::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;

use super::jwt::base64url;
use super::{PodClaims, TokenRefusal};
use crate::server::jwks::Key;

/// Clock skew allowed between the API server and us, on `exp` and `nbf`.
const LEEWAY: u64 = 30;

/// A compact JWS's header: the fields that pick the key.
#[derive(Deserialize, Debug)]
pub struct Header {
    pub alg: String,
    pub kid: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    iss: Option<String>,
    aud: Option<Audience>,
    exp: Option<u64>,
    nbf: Option<u64>,
    sub: Option<String>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Kubernetes>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Kubernetes {
    namespace: Option<String>,
    pod: Option<Named>,
    serviceaccount: Option<Named>,
}

#[derive(Deserialize)]
struct Named {
    name: Option<String>,
    uid: Option<String>,
}

fn part<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, TokenRefusal> {
    let bytes = base64url(text).ok_or(TokenRefusal::Malformed)?;
    serde_json::from_slice(&bytes).map_err(|_| TokenRefusal::Malformed)
}

/// The header of `token`, if it is a compact JWS at all.
pub fn header(token: &str) -> Result<Header, TokenRefusal> {
    let (head, _) = token.split_once('.').ok_or(TokenRefusal::Malformed)?;
    part(head)
}

/// The pod `token` is bound to, when one of `keys` signed it for `issuer` and `audience` and it
/// is valid at `now` (seconds since the epoch); with the token's `exp`.
pub fn verify(
    token: &str,
    keys: &[Key],
    issuer: &str,
    audience: &str,
    now: u64,
) -> Result<(PodClaims, u64), TokenRefusal> {
    let mut parts = token.split('.');
    let (Some(head), Some(body), Some(sig), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenRefusal::Malformed);
    };
    let header: Header = part(head)?;
    let signature = base64url(sig).ok_or(TokenRefusal::Malformed)?;
    let message = &token.as_bytes()[..head.len() + 1 + body.len()];
    let signed = keys.iter().any(|key| match (header.alg.as_str(), key) {
        ("RS256", Key::Rsa { n, e }) => RsaPublicKeyComponents { n, e }
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, &signature)
            .is_ok(),
        ("ES256", Key::P256(point)) => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
            .verify(message, &signature)
            .is_ok(),
        _ => false,
    });
    if !signed {
        return Err(TokenRefusal::NotAuthenticated("the signature is not the cluster's".into()));
    }
    let payload: Payload = part(body)?;
    if payload.iss.as_deref() != Some(issuer) {
        return Err(TokenRefusal::NotAuthenticated("the token has another issuer".into()));
    }
    let audiences = match payload.aud {
        Some(Audience::One(a)) => vec![a],
        Some(Audience::Many(a)) => a,
        None => Vec::new(),
    };
    if !audiences.iter().any(|a| a == audience) {
        return Err(TokenRefusal::WrongAudience(audience.to_string()));
    }
    let exp = payload.exp.ok_or_else(|| TokenRefusal::NotAuthenticated("the token has no exp".into()))?;
    if exp + LEEWAY <= now {
        return Err(TokenRefusal::NotAuthenticated("the token has expired".into()));
    }
    if payload.nbf.is_some_and(|nbf| nbf > now + LEEWAY) {
        return Err(TokenRefusal::NotAuthenticated("the token is not valid yet (nbf)".into()));
    }
    let k8s = payload.kubernetes.ok_or(TokenRefusal::NotPodBound)?;
    let nonempty = |v: Option<String>| v.filter(|v| !v.is_empty());
    let namespace = nonempty(k8s.namespace).ok_or(TokenRefusal::NotPodBound)?;
    let pod = k8s.pod.ok_or(TokenRefusal::NotPodBound)?;
    let (Some(pod_name), Some(pod_uid)) = (nonempty(pod.name), nonempty(pod.uid)) else {
        return Err(TokenRefusal::NotPodBound);
    };
    let from_sub = payload
        .sub
        .as_deref()
        .and_then(|s| s.strip_prefix("system:serviceaccount:"))
        .and_then(|s| s.split_once(':'))
        .filter(|(ns, _)| *ns == namespace)
        .map(|(_, sa)| sa.to_string());
    let named = k8s.serviceaccount.and_then(|sa| nonempty(sa.name));
    let service_account = named.or(from_sub).ok_or(TokenRefusal::NotPodBound)?;
    Ok((PodClaims { namespace, service_account, pod_name, pod_uid }, exp))
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
