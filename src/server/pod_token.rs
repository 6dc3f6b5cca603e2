//! Pods' projected ServiceAccount tokens, as `GET /v1/credentials` presents them: verified
//! locally against the cluster's signing keys ([`verify`]), and read
//! for the pod they are bound to. Whether that pod is still alive, on the caller's node, and may
//! have its role is the core's business, not this module's.
//!
//! Only when the keys cannot be had (no discovery, no JWKS) is a token sent to the TokenReview
//! API, and then within budgets keyed on what a pod cannot forge: the agent's proven node and
//! the request's source address, under a global cap per second. A token naming a key the
//! cluster does not publish is refused without an API call. Positive TokenReview verdicts are
//! remembered (by the token's SHA-256, never the token) for a short while that always ends
//! before the token's own `exp`. Tokens never reach a log line.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::Api;
use kube::api::PostParams;

use super::jwks::{Jwks, Lookup};

/// The longest a positive verdict is reused.
const VERDICT_TTL: Duration = Duration::from_secs(60);
/// The most verdicts remembered.
const VERDICT_CACHE: usize = 10_000;
/// TokenReviews one (node, source address) may cause per second, when keys cannot be had.
const REVIEWS_PER_SECOND: u32 = 5;
/// TokenReviews the whole server may make per second, when keys cannot be had.
const GLOBAL_REVIEWS_PER_SECOND: u32 = 50;
/// The longest token accepted (projected tokens are about 1 KiB).
const MAX_TOKEN: usize = 16 * 1024;
const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// The pod a verified token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodClaims {
    pub namespace: String,
    pub service_account: String,
    pub pod_name: String,
    pub pod_uid: String,
}

/// Why a token proves no pod. The texts name the reason, never the token.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// Empty, oversized, or not printable.
    #[error("the token is malformed")]
    Malformed,
    /// The API server did not authenticate it (unknown, expired, revoked, deleted pod).
    #[error("the token is not valid: {0}")]
    NotAuthenticated(String),
    /// It is valid, but not for our audience.
    #[error("the token is not for the audience {0:?}")]
    WrongAudience(String),
    /// It is not a pod-bound ServiceAccount token.
    #[error("the token is not bound to a pod")]
    NotPodBound,
    /// This source (or the server as a whole) had too many tokens reviewed in the last second.
    #[error("too many token reviews")]
    RateLimited,
    /// TokenReview could not be asked.
    #[error("TokenReview failed: {0}")]
    Api(String),
    /// This server has no API access.
    #[error("this server does not check pod tokens (it has no API access)")]
    Unsupported,
}

/// Checks pods' tokens: locally, or with TokenReview when the keys cannot be had.
pub struct PodTokens {
    client: kube::Client,
    keys: Jwks,
    audience: String,
    verdicts: Mutex<HashMap<[u8; 32], (Instant, PodClaims)>>,
    reviews: Mutex<HashMap<String, (Instant, u32)>>,
    global: Mutex<HashMap<String, (Instant, u32)>>,
}

impl PodTokens {
    /// Checks tokens through `client` for `audience`.
    pub fn new(client: kube::Client, audience: &str) -> PodTokens {
        PodTokens {
            keys: Jwks::new(client.clone()),
            client,
            global: Mutex::default(),
            audience: audience.to_string(),
            verdicts: Mutex::default(),
            reviews: Mutex::default(),
        }
    }

    /// The pod `token` is bound to, for an agent on `node` asked from `source`.
    pub async fn verify(&self, node: &str, source: &str, token: &str) -> Result<PodClaims, TokenRefusal> {
        let token = token.trim();
        if token.is_empty() || token.len() > MAX_TOKEN || !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(TokenRefusal::Malformed);
        }
        let header = verify::header(token)?;
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        match self.keys.lookup(header.kid.as_deref()).await {
            Lookup::Keys(keys, issuer) => {
                return verify::verify(token, &keys, &issuer, &self.audience, epoch.as_secs())
                    .map(|(claims, _)| claims);
            }
            Lookup::Unknown => {
                return Err(TokenRefusal::NotAuthenticated(
                    "signed by a key the cluster does not publish".into(),
                ));
            }
            Lookup::Unavailable(_) => {}
        }
        let key = digest(token);
        let now = Instant::now();
        if let Some(claims) = self.cached(&key, now) {
            return Ok(claims);
        }
        let unverified = jwt::Unverified::read(token);
        if !allow(&self.reviews, &format!("{node}/{source}"), REVIEWS_PER_SECOND, now)
            || !allow(&self.global, "", GLOBAL_REVIEWS_PER_SECOND, now)
        {
            return Err(TokenRefusal::RateLimited);
        }
        let claims = self.review(token).await?;
        if let Some(ttl) = verdict_ttl(unverified.and_then(|u| u.expires), epoch) {
            self.remember(key, now + ttl, claims.clone());
        }
        Ok(claims)
    }

    fn cached(&self, key: &[u8; 32], now: Instant) -> Option<PodClaims> {
        let verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        verdicts.get(key).filter(|(until, _)| now < *until).map(|(_, claims)| claims.clone())
    }

    fn remember(&self, key: [u8; 32], until: Instant, claims: PodClaims) {
        let mut verdicts = self.verdicts.lock().unwrap_or_else(PoisonError::into_inner);
        if verdicts.len() >= VERDICT_CACHE {
            let now = Instant::now();
            verdicts.retain(|_, (until, _)| now < *until);
            if verdicts.len() >= VERDICT_CACHE {
                verdicts.clear();
            }
        }
        verdicts.insert(key, (until, claims));
    }

    async fn review(&self, token: &str) -> Result<PodClaims, TokenRefusal> {
        let status = review_token(&self.client, token, &self.audience).await.map_err(TokenRefusal::Api)?;
        if status.authenticated != Some(true) {
            let error = status.error.unwrap_or_default();
            if error.contains("audience") {
                return Err(TokenRefusal::WrongAudience(self.audience.clone()));
            }
            return Err(TokenRefusal::NotAuthenticated(error));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(TokenRefusal::WrongAudience(self.audience.clone()));
        }
        let user = status.user.ok_or(TokenRefusal::NotPodBound)?;
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|sa| sa.split_once(':'))
            .ok_or(TokenRefusal::NotPodBound)?;
        let mut extra = user.extra.unwrap_or_default();
        let mut one =
            |key: &str| extra.remove(key).and_then(|v| v.into_iter().next()).filter(|v| !v.is_empty());
        let (Some(pod_name), Some(pod_uid)) = (one(POD_NAME_EXTRA), one(POD_UID_EXTRA)) else {
            return Err(TokenRefusal::NotPodBound);
        };
        Ok(PodClaims {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            pod_name,
            pod_uid,
        })
    }
}

/// A remembered verdict ends this long before the token's `exp`.
const EXP_MARGIN: Duration = Duration::from_secs(5);

/// How long a positive verdict on a token whose `exp` is `exp` may be reused, at `now` (since the
/// epoch): at most [`VERDICT_TTL`], and ending [`EXP_MARGIN`] before the token does. A token
/// without a readable `exp` is not remembered at all.
fn verdict_ttl(exp: Option<u64>, now: Duration) -> Option<Duration> {
    let left = Duration::from_secs(exp?).checked_sub(now)?.checked_sub(EXP_MARGIN)?;
    Some(left.min(VERDICT_TTL)).filter(|t| !t.is_zero())
}

/// Counts one review for `key` in its one-second window at `now`; false once over `budget`.
fn allow(reviews: &Mutex<HashMap<String, (Instant, u32)>>, key: &str, budget: u32, now: Instant) -> bool {
    let mut windows = reviews.lock().unwrap_or_else(PoisonError::into_inner);
    if windows.len() > VERDICT_CACHE {
        windows.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(1));
    }
    let window = windows.entry(key.to_string()).or_insert((now, 0));
    if now.duration_since(window.0) >= Duration::from_secs(1) {
        *window = (now, 0);
    }
    window.1 += 1;
    window.1 <= budget
}

fn digest(token: &str) -> [u8; 32] {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(d.as_ref());
    key
}

pub mod jwt;
pub mod verify;

/// Asks the API server to review `token` for `audience`: the review's status, or why there is
/// none. Agents' node tokens and pods' own tokens are both checked through it.
pub async fn review_token(
    client: &kube::Client,
    token: &str,
    audience: &str,
) -> Result<TokenReviewStatus, String> {
    let review = TokenReview {
        spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![audience.to_string()]) },
        ..TokenReview::default()
    };
    let answer = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .map_err(|e| format!("TokenReview: {e}"))?;
    answer.status.ok_or_else(|| "TokenReview gave no status".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_end_before_the_token_does() {
        let now = Duration::from_secs(1_000_000);
        assert_eq!(verdict_ttl(None, now), None, "no exp, no memory");
        assert_eq!(verdict_ttl(Some(999_000), now), None, "expired");
        assert_eq!(verdict_ttl(Some(1_000_003), now), None, "inside the margin");
        assert_eq!(verdict_ttl(Some(1_000_030), now), Some(Duration::from_secs(25)));
        assert_eq!(verdict_ttl(Some(1_003_600), now), Some(VERDICT_TTL));
    }

    #[test]
    fn reviews_are_budgeted_per_key_and_second() {
        let reviews = Mutex::default();
        let start = Instant::now();
        let b = REVIEWS_PER_SECOND;
        for _ in 0..b {
            assert!(allow(&reviews, "node-a/10.0.0.1", b, start));
        }
        assert!(!allow(&reviews, "node-a/10.0.0.1", b, start), "over the budget");
        assert!(allow(&reviews, "node-a/10.0.0.2", b, start), "another source has its own");
        assert!(allow(&reviews, "node-a/10.0.0.1", b, start + Duration::from_secs(1)), "a new second");
    }
}
