//! Which node an agent runs on, as it proves it: the `urn:kiam:node:<name>` URI SAN of its client
//! certificate, or its projected ServiceAccount token, checked with the TokenReview API. Per-node
//! certificates do not survive node autoscaling; tokens do, because the API server writes the
//! node name into pod-bound tokens (`authentication.kubernetes.io/node-name`, Kubernetes 1.32+).
//! The node is never taken from the request itself.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::Request;

use super::pod_token::PodTokens;

/// How long a positive token verdict is reused (well under any projected token's lifetime).
const VERDICT_TTL: Duration = Duration::from_secs(30);
/// The most verdicts remembered.
const VERDICT_CACHE: usize = 4096;
/// The extra field the API server writes the node name into.
const NODE_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// How agents prove their node.
pub struct Identities {
    tokens: Option<TokenVerifier>,
}

/// The audience of pods' tokens for `GET /v1/credentials` by default: EKS Pod Identity's, so that
/// pods set up for EKS (by its webhook or by hand) work unchanged.
pub const DEFAULT_POD_TOKEN_AUDIENCE: &str = "pods.eks.amazonaws.com";

/// Checks agents' tokens with TokenReview.
pub struct TokenVerifier {
    client: kube::Client,
    /// The audience agents' tokens are projected for.
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    username: String,
    verdicts: Mutex<HashMap<[u8; 32], (Instant, String)>>,
    /// Pods' tokens, for `GET /v1/credentials`, through the same client.
    pods: PodTokens,
}

impl TokenVerifier {
    /// Verifies agents' tokens through `client` for `audience`, accepting only `service_account`
    /// (`namespace:name` or `namespace/name`), and pods' tokens for `pod_audience`.
    pub fn new(
        client: kube::Client,
        audience: &str,
        service_account: &str,
        pod_audience: &str,
    ) -> TokenVerifier {
        let sa = service_account.replacen('/', ":", 1);
        TokenVerifier {
            pods: PodTokens::new(client.clone(), pod_audience),
            client,
            audience: audience.to_string(),
            username: format!("system:serviceaccount:{sa}"),
            verdicts: Mutex::default(),
        }
    }

    /// The node `token` proves, or why it proves none. Only positive verdicts are cached.
    pub async fn node(&self, token: &str) -> Result<String, String> {
        let key: [u8; 32] = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .map_err(|_| "digest".to_string())?;
        let cached =
            self.verdicts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&key).cloned();
        if let Some((at, node)) = cached
            && at.elapsed() < VERDICT_TTL
        {
            return Ok(node);
        }
        let status = super::pod_token::review_token(&self.client, token, &self.audience).await?;
        if status.authenticated != Some(true) {
            return Err(format!("token not authenticated: {}", status.error.unwrap_or_default()));
        }
        if !status.audiences.unwrap_or_default().contains(&self.audience) {
            return Err(format!("token is not for the audience {:?}", self.audience));
        }
        let user = status.user.ok_or("TokenReview named no user")?;
        if user.username.as_deref() != Some(self.username.as_str()) {
            return Err(format!("token belongs to {:?}, not the agents' ServiceAccount", user.username));
        }
        let node =
            user.extra.and_then(|mut extra| extra.remove(NODE_EXTRA)).and_then(|v| v.into_iter().next());
        let node = node.filter(|n| !n.is_empty()).ok_or("token is not bound to a node")?;
        let mut verdicts = self.verdicts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if verdicts.len() >= VERDICT_CACHE {
            verdicts.retain(|_, (at, _)| at.elapsed() < VERDICT_TTL);
            if verdicts.len() >= VERDICT_CACHE {
                verdicts.clear();
            }
        }
        verdicts.insert(key, (Instant::now(), node.clone()));
        Ok(node)
    }
}

impl Identities {
    /// Certificates only, or certificates and tokens.
    pub fn new(tokens: Option<TokenVerifier>) -> Identities {
        Identities { tokens }
    }

    /// The checker of pods' tokens, when this server has API access.
    pub fn pod_tokens(&self) -> Option<&PodTokens> {
        self.tokens.as_ref().map(|t| &t.pods)
    }

    /// The node the caller proves: its certificate's node URI SAN first, then its bearer token.
    pub async fn node<T>(&self, request: &Request<T>) -> Result<String, String> {
        let certs = request.peer_certs();
        if let Some(node) =
            certs.as_ref().and_then(|c| c.first()).and_then(|leaf| crate::tls::x509::node_name(leaf))
        {
            return Ok(node);
        }
        self.token_node(request).await
    }

    /// The node the caller's bearer token proves, whatever its certificate says.
    pub async fn token_node<T>(&self, request: &Request<T>) -> Result<String, String> {
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match (token, &self.tokens) {
            (Some(token), Some(verifier)) => verifier.node(token).await,
            (Some(_), None) => Err("this server does not check tokens (it has no API access)".into()),
            (None, _) => {
                Err("the client certificate names no node (urn:kiam:node:<name>) and no token was sent"
                    .into())
            }
        }
    }
}
