//! The STS adapter: [`AssumeRole`] over `aws-sdk-sts`. The only module that touches the AWS SDK.
//! The server's own identity comes from the SDK's default credential chain (environment, web
//! identity for IRSA, profile, instance profile). HTTPS to AWS trusts the roots that
//! [`crate::aws_roots`] finds.

use std::time::{Duration, SystemTime};

use aws_config::BehaviorVersion;
use aws_sdk_sts::config::SharedCredentialsProvider;
use aws_sdk_sts::error::{ProvideErrorMetadata, SdkError};

use crate::creds::{AssumeRole, Credentials, Identity, StsError, StsErrorKind};
use crate::model::BaseArn;

/// Where and how STS is called.
#[derive(Clone, Debug, Default)]
pub struct StsConfig {
    /// `--region`: sign for and call this region's STS endpoint.
    pub region: Option<String>,
    /// `--sts-endpoint`: an STS-compatible endpoint (a VPC endpoint, or an emulator in tests).
    pub endpoint: Option<String>,
    /// `--assume-role-arn`, resolved to a full ARN: the role the server assumes first, whose
    /// credentials then assume the pods' roles (role chaining).
    pub assume_role_arn: Option<String>,
}

/// STS through the AWS SDK.
#[derive(Clone, Debug)]
pub struct Sts {
    client: aws_sdk_sts::Client,
}

impl Sts {
    /// Builds a client from the default credential chain (wrapped in an assume-role provider
    /// with `--assume-role-arn`) and the given settings.
    pub async fn from_env(config: &StsConfig) -> Sts {
        // Roots of trust chosen (and logged) here, not left to the SDK: see aws_roots.
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(crate::aws_roots::logged_https_client());
        if let Some(region) = &config.region {
            loader = loader.region(aws_config::Region::new(region.clone()));
        }
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint.clone());
        }
        let mut sdk = loader.load().await;
        if let Some(arn) = &config.assume_role_arn {
            let provider = aws_config::sts::AssumeRoleProvider::builder(arn.clone())
                .session_name("kiam-server")
                .configure(&sdk)
                .build()
                .await;
            sdk = sdk.into_builder().credentials_provider(SharedCredentialsProvider::new(provider)).build();
        }
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
            .set_tags(tags(identity))
            .set_transitive_tag_keys(
                Some(identity.tags.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>())
                    .filter(|k| !k.is_empty()),
            )
            .set_policy(identity.policy.clone())
            .set_source_identity(identity.source_identity.clone())
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

/// The identity's session tags in the SDK's shape (`None` without any).
fn tags(identity: &Identity) -> Option<Vec<aws_sdk_sts::types::Tag>> {
    let tags: Vec<_> = identity
        .tags
        .iter()
        .filter_map(|(key, value)| aws_sdk_sts::types::Tag::builder().key(key).value(value).build().ok())
        .collect();
    Some(tags).filter(|t| !t.is_empty())
}

/// The base ARN of the instance profile's account and partition, read from the metadata
/// service's `iam/info` over IMDSv2 (`--role-base-arn-autodetect`). `AWS_EC2_METADATA_SERVICE_ENDPOINT`
/// points it elsewhere, as for the SDKs.
pub async fn detect_base_arn() -> Result<BaseArn, String> {
    let client = aws_config::imds::Client::builder().build();
    let info = client.get("/latest/meta-data/iam/info").await.map_err(|e| aws_smithy_error_text(&e))?;
    let json: serde_json::Value =
        serde_json::from_str(info.as_ref()).map_err(|e| format!("iam/info is not JSON: {e}"))?;
    let profile = json
        .get("InstanceProfileArn")
        .and_then(serde_json::Value::as_str)
        .ok_or("iam/info has no InstanceProfileArn")?;
    BaseArn::of_instance_profile(profile).map_err(|e| e.to_string())
}

/// The name of the instance profile's own role, from the metadata service's credentials listing
/// over IMDSv2 (kube2iam's `--auto-discover-default-role`).
pub async fn detect_instance_role() -> Result<String, String> {
    let client = aws_config::imds::Client::builder().build();
    let listing = client
        .get("/latest/meta-data/iam/security-credentials/")
        .await
        .map_err(|e| aws_smithy_error_text(&e))?;
    let role = listing.as_ref().lines().next().map(str::trim).unwrap_or_default().to_string();
    if role.is_empty() { Err("the instance has no role".into()) } else { Ok(role) }
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

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_sts::config::endpoint::{Params, ResolveEndpoint};

    #[test]
    fn base_arn_keeps_the_partition() {
        let cases = [
            ("arn:aws:iam::123456789012:instance-profile/node", "arn:aws:iam::123456789012:role/"),
            ("arn:aws-cn:iam::123456789012:instance-profile/a/b", "arn:aws-cn:iam::123456789012:role/"),
            ("arn:aws-us-gov:iam::1:instance-profile/x", "arn:aws-us-gov:iam::1:role/"),
            ("arn:aws-iso:iam::1:instance-profile/x", "arn:aws-iso:iam::1:role/"),
        ];
        for (profile, want) in cases {
            assert_eq!(BaseArn::of_instance_profile(profile).expect(profile).as_str(), want);
        }
        assert!(BaseArn::of_instance_profile("not-an-arn").is_err());
    }

    /// `--region` selects the regional STS endpoint, in every partition (kiam hard-coded these).
    #[tokio::test]
    async fn regional_endpoints_are_partition_aware() {
        let resolver = aws_sdk_sts::config::endpoint::DefaultResolver::new();
        let cases = [
            ("eu-west-1", "https://sts.eu-west-1.amazonaws.com"),
            ("cn-north-1", "https://sts.cn-north-1.amazonaws.com.cn"),
            ("us-gov-west-1", "https://sts.us-gov-west-1.amazonaws.com"),
            ("us-iso-east-1", "https://sts.us-iso-east-1.c2s.ic.gov"),
            ("us-isob-east-1", "https://sts.us-isob-east-1.sc2s.sgov.gov"),
        ];
        for (region, want) in cases {
            let params = Params::builder().region(region).use_global_endpoint(false).build().expect("params");
            let endpoint = resolver.resolve_endpoint(&params).await.expect(region);
            assert_eq!(endpoint.url(), want, "{region}");
        }
    }
}
