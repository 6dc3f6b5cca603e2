//! The STS adapter: [`AssumeRole`] over `aws-sdk-sts`. The only module that touches the AWS SDK.
//! The server's own identity comes from the SDK's default credential chain (environment, web
//! identity for IRSA, profile, instance profile).

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};

use crate::creds::{AssumeRole, Credentials, Identity, StsError, StsErrorKind};

/// Where and how STS is called.
#[derive(Clone, Debug, Default)]
pub struct StsConfig {
    /// `--region`: sign for and call this region's STS endpoint.
    pub region: Option<String>,
    /// `--sts-endpoint`: an STS-compatible endpoint (a VPC endpoint, or an emulator in tests).
    pub endpoint: Option<String>,
}

/// STS through the AWS SDK.
#[derive(Clone, Debug)]
pub struct Sts {
    client: aws_sdk_sts::Client,
}

impl Sts {
    /// Builds a client from the default credential chain and the given settings.
    pub async fn from_env(config: &StsConfig) -> Sts {
        let mut loader = aws_config::defaults(BehaviorVersion::latest());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        let sdk = loader.load().await;
        Sts::from_sdk_config(&sdk, config)
    }

    /// Builds a client from an existing SDK configuration (tests pass static credentials).
    pub fn from_sdk_config(sdk: &aws_config::SdkConfig, config: &StsConfig) -> Sts {
        let mut builder = aws_sdk_sts::config::Builder::from(sdk);
        if sdk.region().is_none() && config.region.is_none() {
            // STS's global endpoint signs for us-east-1.
            builder = builder.region(aws_config::Region::from_static("us-east-1"));
        }
        if let Some(region) = &config.region {
            builder = builder.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            builder = builder.endpoint_url(endpoint.clone());
        }
        Sts { client: aws_sdk_sts::Client::from_conf(builder.build()) }
    }
}

impl AssumeRole for Sts {
    async fn assume_role(&self, identity: &Identity, duration: Duration) -> Result<Credentials, StsError> {
        let seconds = i32::try_from(duration.as_secs()).unwrap_or(i32::MAX);
        let out = self
            .client
            .assume_role()
            .role_arn(identity.role.as_str())
            .role_session_name(&identity.session_name)
            .set_external_id(identity.external_id.clone())
            .duration_seconds(seconds)
            .send()
            .await
            .map_err(map_error)?;
        let creds = out.credentials.ok_or_else(|| StsError {
            kind: StsErrorKind::Other,
            code: None,
            message: "AssumeRole returned no credentials".into(),
        })?;
        let expiration = SystemTime::try_from(creds.expiration).map_err(|e| StsError {
            kind: StsErrorKind::Other,
            code: None,
            message: format!("AssumeRole returned an unusable expiration: {e}"),
        })?;
        Ok(Credentials {
            access_key_id: creds.access_key_id,
            secret_access_key: creds.secret_access_key,
            session_token: creds.session_token,
            expiration,
            issued: SystemTime::now(),
        })
    }
}

/// Maps an SDK error once, into the kinds retries and Events branch on.
fn map_error<E: ProvideErrorMetadata + std::error::Error + 'static>(err: SdkError<E>) -> StsError {
    match &err {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => StsError {
            kind: StsErrorKind::Unavailable,
            code: None,
            message: format!("STS unreachable: {}", aws_smithy_error_text(&err)),
        },
        _ => {
            let code = err.code().map(str::to_string);
            let kind = match code.as_deref() {
                Some("Throttling" | "ThrottlingException" | "RequestLimitExceeded") => {
                    StsErrorKind::Throttled
                }
                Some(
                    "AccessDenied"
                    | "AccessDeniedException"
                    | "ExpiredToken"
                    | "InvalidClientTokenId"
                    | "SignatureDoesNotMatch",
                ) => StsErrorKind::Denied,
                Some(
                    "ValidationError"
                    | "MalformedPolicyDocument"
                    | "PackedPolicyTooLarge"
                    | "RegionDisabledException",
                ) => StsErrorKind::Invalid,
                _ => StsErrorKind::Other,
            };
            let message = err.message().map(str::to_string).unwrap_or_else(|| aws_smithy_error_text(&err));
            StsError { kind, code, message }
        }
    }
}

/// The whole error chain as text (the SDK's `Display` alone says only "dispatch failure").
fn aws_smithy_error_text(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
