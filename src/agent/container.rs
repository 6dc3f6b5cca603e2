//! `GET /v1/credentials`: the container credentials endpoint that EKS Pod Identity serves on
//! 169.254.170.23 and `[fd00:ec2::23]`, and that every AWS SDK calls when
//! `AWS_CONTAINER_CREDENTIALS_FULL_URI` and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE` are set.
//! The pod is identified by the projected ServiceAccount token it sends raw in `Authorization`,
//! never by its address, so hostNetwork pods are served too. The agent holds no API access:
//! the server checks the token ([`Backend::token_credentials`]). The token is never logged.

use std::net::IpAddr;

use axum::body::Body;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::documents::role_account;
use super::error::{AgentError, Endpoint, answer};
use super::{Agent, Backend, BackendError, ContainerCredentials};
use crate::metrics::Handler;

/// What a pod is told when this process does not serve the endpoint.
pub const NOT_SERVED: &str =
    "/v1/credentials is not served in kube2iam mode: run kiam's agent and server for identity by token";

/// The container credentials document, in EKS Pod Identity's shape.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerDocument<'a> {
    pub access_key_id: &'a str,
    pub secret_access_key: &'a str,
    pub token: &'a str,
    /// Omitted when the role ARN names no account (it always does once resolved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub account_id: Option<&'a str>,
    pub expiration: &'a str,
}

impl<'a> ContainerDocument<'a> {
    /// The document for `creds`.
    pub fn new(creds: &'a ContainerCredentials) -> ContainerDocument<'a> {
        ContainerDocument {
            access_key_id: &creds.access_key_id,
            secret_access_key: &creds.secret_access_key,
            token: &creds.token,
            account_id: role_account(&creds.role_arn).map(|r| r.account),
            expiration: &creds.expiration,
        }
    }
}

/// The token in `Authorization`: the raw value SDKs send, or `Bearer <token>`.
pub fn bearer(headers: &HeaderMap) -> Result<&str, AgentError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| AgentError::Unauthorized("no token in the Authorization header".into()))?;
    let value = value.to_str().map_err(|_| AgentError::Unauthorized("the token is malformed".into()))?;
    let token = value.strip_prefix("Bearer ").unwrap_or(value).trim();
    if token.is_empty() {
        return Err(AgentError::Unauthorized("no token in the Authorization header".into()));
    }
    Ok(token)
}

/// Answers `GET /v1/credentials`.
pub async fn credentials<B: Backend>(
    agent: &Agent<B>,
    source: IpAddr,
    headers: &HeaderMap,
) -> Result<Response, AgentError> {
    if !agent.backend.serves_pod_tokens() {
        // kube2iam mode: the pod is identified by its address only, as in kube2iam.
        return Err(answer(BackendError::NotServed(NOT_SERVED.into()), Endpoint::Container));
    }
    let token = bearer(headers)?;
    let label = Handler { handler: "containerCredentials" };
    let creds = agent.backend.token_credentials(token, source).await.map_err(|e| {
        agent.metrics.agent.credential_fetch_errors.get_or_create(&label).inc();
        answer(e, Endpoint::Container)
    })?;
    let body = serde_json::to_vec(&ContainerDocument::new(&creds)).map_err(|e| {
        agent.metrics.agent.credential_encode_errors.get_or_create(&label).inc();
        AgentError::Internal(e.to_string())
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response())
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    #[test]
    fn the_token_is_taken_raw_or_as_bearer() {
        let mut headers = HeaderMap::new();
        assert!(bearer(&headers).is_err());
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("eyJ.x.y"));
        assert_eq!(bearer(&headers).ok(), Some("eyJ.x.y"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer eyJ.x.y"));
        assert_eq!(bearer(&headers).ok(), Some("eyJ.x.y"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert!(bearer(&headers).is_err());
    }

    #[test]
    fn the_document_has_eks_pod_identitys_shape() {
        let creds = ContainerCredentials {
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            token: "session".into(),
            expiration: "2026-11-27T12:00:00Z".into(),
            role_arn: "arn:aws:iam::123456789012:role/app".into(),
        };
        let json = serde_json::to_value(ContainerDocument::new(&creds)).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"AccessKeyId": "AKID", "SecretAccessKey": "secret", "Token": "session",
                "AccountId": "123456789012", "Expiration": "2026-11-27T12:00:00Z"})
        );
        assert!(!format!("{creds:?}").contains("secret"));
    }
}
