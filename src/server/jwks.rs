//! The cluster's ServiceAccount token signing keys, read as any OIDC relying party reads them:
//! the API server's issuer discovery (`/.well-known/openid-configuration`, for the issuer) and
//! its key set (`/openid/v1/jwks`), both through the server's own kube client. Keys are fetched
//! on first use, again when a token names a key id we do not have (key rotation), and again once
//! they are older than [`MAX_AGE`] (a removed key stops verifying); never more often than once
//! per [`MIN_REFRESH`], so a pod spraying tokens with made-up key ids costs the API server at most
//! one pair of GETs per interval. RS256 and ES256 keys are kept; others are skipped.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// The fewest seconds between two fetches.
const MIN_REFRESH: Duration = Duration::from_secs(10);
/// Keys older than this are fetched again on the next lookup.
const MAX_AGE: Duration = Duration::from_secs(600);
/// Where the API server serves its issuer discovery and key set.
const DISCOVERY: &str = "/.well-known/openid-configuration";
const JWKS: &str = "/openid/v1/jwks";

/// One verification key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Key {
    /// RS256: the modulus and exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// ES256: the uncompressed P-256 point (`0x04 || x || y`).
    P256(Vec<u8>),
}

/// The keys and the issuer they sign for.
#[derive(Clone, Debug, Default)]
pub struct KeySet {
    pub issuer: String,
    pub keys: HashMap<String, Key>,
}

/// What a lookup found.
pub enum Lookup {
    /// The keys to try (one for a known `kid`; every key for a token without one) and the issuer.
    Keys(Vec<Key>, String),
    /// The key set is known and has no such key, even after a refresh.
    Unknown,
    /// No key set could be read: the caller falls back to TokenReview.
    Unavailable(String),
}

#[derive(Default)]
struct State {
    set: Option<Arc<KeySet>>,
    fetched: Option<Instant>,
    attempted: Option<Instant>,
    error: String,
}

/// The key set of one cluster.
pub struct Jwks {
    client: kube::Client,
    state: tokio::sync::Mutex<State>,
}

impl Jwks {
    /// Keys read through `client`.
    pub fn new(client: kube::Client) -> Jwks {
        Jwks { client, state: tokio::sync::Mutex::default() }
    }

    /// The keys for a token whose header names `kid` (or none).
    pub async fn lookup(&self, kid: Option<&str>) -> Lookup {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let found = state.set.as_ref().map(|set| pick(set, kid));
        let stale = state.fetched.is_none_or(|at| now.duration_since(at) >= MAX_AGE);
        let may_fetch = state.attempted.is_none_or(|at| now.duration_since(at) >= MIN_REFRESH);
        let want = stale || matches!(found, Some(None));
        if want && may_fetch {
            state.attempted = Some(now);
            match fetch(&self.client).await {
                Ok(set) => {
                    state.set = Some(Arc::new(set));
                    state.fetched = Some(now);
                    state.error.clear();
                }
                Err(error) => {
                    tracing::warn!(%error, "service-account signing keys unavailable");
                    state.error = error;
                }
            }
        }
        match &state.set {
            Some(set) => match pick(set, kid) {
                Some(keys) => Lookup::Keys(keys, set.issuer.clone()),
                None => Lookup::Unknown,
            },
            None => Lookup::Unavailable(state.error.clone()),
        }
    }
}

/// The keys of `set` for `kid`; `None` when it names a key the set lacks.
fn pick(set: &KeySet, kid: Option<&str>) -> Option<Vec<Key>> {
    match kid {
        Some(kid) => set.keys.get(kid).map(|k| vec![k.clone()]),
        None => Some(set.keys.values().cloned().collect()).filter(|k: &Vec<Key>| !k.is_empty()),
    }
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<Jwk>,
}

#[derive(Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

async fn get(client: &kube::Client, path: &str) -> Result<String, String> {
    let request = axum::http::Request::get(path).body(Vec::new()).map_err(|e| format!("{path}: {e}"))?;
    client.request_text(request).await.map_err(|e| format!("{path}: {e}"))
}

async fn fetch(client: &kube::Client) -> Result<KeySet, String> {
    let discovery: Discovery =
        serde_json::from_str(&get(client, DISCOVERY).await?).map_err(|e| format!("{DISCOVERY}: {e}"))?;
    let text = get(client, JWKS).await?;
    let set = parse(&discovery.issuer, &text)?;
    tracing::info!(issuer = %set.issuer, keys = set.keys.len(), "service-account signing keys read");
    Ok(set)
}

/// The usable keys of a JWKS document for `issuer`: an error when there are none, so that a
/// cluster whose keys we cannot read is not mistaken for one that signs with none.
pub fn parse(issuer: &str, text: &str) -> Result<KeySet, String> {
    if issuer.is_empty() {
        return Err(format!("{DISCOVERY}: no issuer"));
    }
    let set: JwkSet = serde_json::from_str(text).map_err(|e| format!("{JWKS}: {e}"))?;
    let mut keys = HashMap::new();
    for jwk in set.keys {
        if jwk.usage.as_deref().is_some_and(|u| u != "sig") {
            continue;
        }
        let (Some(kid), Some(key)) = (jwk.kid.clone(), key_of(&jwk)) else { continue };
        keys.insert(kid, key);
    }
    if keys.is_empty() {
        return Err(format!("{JWKS}: no RS256 or ES256 key"));
    }
    Ok(KeySet { issuer: issuer.to_string(), keys })
}

fn key_of(jwk: &Jwk) -> Option<Key> {
    let b64 = |v: &Option<String>| v.as_deref().and_then(super::pod_token::jwt::base64url);
    match (jwk.kty.as_str(), jwk.alg.as_deref()) {
        ("RSA", None | Some("RS256")) => Some(Key::Rsa { n: b64(&jwk.n)?, e: b64(&jwk.e)? }),
        ("EC", None | Some("ES256")) if jwk.crv.as_deref() == Some("P-256") => {
            let (x, y) = (b64(&jwk.x)?, b64(&jwk.y)?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            Some(Key::P256([&[4u8][..], &x, &y].concat()))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_rsa_and_p256_keys_and_skips_the_rest() {
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let text = serde_json::json!({"keys": [
            {"kty": "RSA", "kid": "r", "alg": "RS256", "use": "sig", "n": "AQAB", "e": "AQAB"},
            {"kty": "EC", "kid": "p", "crv": "P-256", "x": x, "y": y},
            {"kty": "EC", "kid": "q", "crv": "P-384", "x": x, "y": y},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
        ]})
        .to_string();
        let set = parse("https://kubernetes.default.svc", &text).expect("keys");
        let mut kids: Vec<&String> = set.keys.keys().collect();
        kids.sort();
        assert_eq!(kids, ["p", "r"]);
        assert!(matches!(&set.keys["p"], Key::P256(point) if point.len() == 65 && point[0] == 4));
        assert!(parse("", &text).is_err(), "no issuer");
        assert!(parse("i", r#"{"keys": []}"#).is_err(), "no usable key");
        assert!(pick(&set, Some("nope")).is_none());
        assert_eq!(pick(&set, None).map(|k| k.len()), Some(2));
    }
}
