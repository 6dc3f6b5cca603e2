//! The metadata documents the agent writes for a pod, beyond the credentials themselves (pure).
//!
//! `security-credentials-extended/{role}` and `iam/info` both need the AWS account of the pod's
//! role. The agent learns the role from the pod's annotation (GetPodRole); when that is a full
//! ARN, the account is in it. When it is a short name, only the server knows which
//! `--role-base-arn` completes it, so the agent answers those two paths with 404. That is safe:
//! SDKs that try the extended path first fall back to the legacy path on exactly 404, and a
//! guessed account (the node's, say) could send an SDK to the wrong account's endpoints.

use serde::Serialize;

use crate::creds::ImdsDocument;
use crate::model::Arn;

/// The account and partition of a role annotation that is a full IAM role ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoleAccount<'a> {
    /// `aws`, `aws-cn`, `aws-us-gov`, ...
    pub partition: &'a str,
    /// The 12-digit account ID.
    pub account: &'a str,
    /// What follows `role/`: the role's path and name.
    pub path_and_name: &'a str,
}

/// Reads the account out of `annotation` if it is an ARN of the form
/// `arn:<partition>:iam::<account>:role/[path/]name`; `None` for short names and anything else.
pub fn role_account(annotation: &str) -> Option<RoleAccount<'_>> {
    let arn = Arn::parse(annotation)?;
    let path_and_name = arn.iam_role()?;
    Some(RoleAccount { partition: arn.partition, account: arn.account, path_and_name })
}

/// The extended credentials document: the legacy one plus `AccountId`.
#[derive(Serialize)]
pub struct ExtendedDocument<'a> {
    #[serde(flatten)]
    pub credentials: &'a ImdsDocument,
    #[serde(rename = "AccountId")]
    pub account_id: &'a str,
}

/// `iam/info` for a pod: the instance profile a pod would have if its role were an instance
/// profile's. The profile ID is not knowable without IAM access, so it is empty.
#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct IamInfo {
    pub code: &'static str,
    pub last_updated: String,
    pub instance_profile_arn: String,
    pub instance_profile_id: &'static str,
}

impl IamInfo {
    /// The document for `role`, as of `now` (formatted as the metadata service does).
    pub fn new(role: &RoleAccount<'_>, now: String) -> IamInfo {
        IamInfo {
            code: "Success",
            last_updated: now,
            instance_profile_arn: format!(
                "arn:{}:iam::{}:instance-profile/{}",
                role.partition, role.account, role.path_and_name
            ),
            instance_profile_id: "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_come_only_from_full_role_arns() {
        let full = role_account("arn:aws:iam::123456789012:role/team/app").expect("ARN");
        assert_eq!((full.partition, full.account, full.path_and_name), ("aws", "123456789012", "team/app"));
        assert!(role_account(" arn:aws-cn:iam::210987654321:role/x ").is_some());
        for none in [
            "app",
            "team/app",
            "arn:aws:iam::123:role/app",
            "arn:aws:iam::123456789012:user/app",
            "arn:aws:iam::123456789012:role/",
            "arn:aws:sts::123456789012:role/app",
            "arn:aws:iam:us-east-1:123456789012:role/app",
        ] {
            assert_eq!(role_account(none), None, "{none}");
        }
    }

    #[test]
    fn extended_document_adds_the_account() {
        let doc = ImdsDocument {
            code: "Success".into(),
            last_updated: "2026-01-01T00:00:00Z".into(),
            kind: "AWS-HMAC".into(),
            access_key_id: "ASIAPOD".into(),
            secret_access_key: "secret".into(),
            token: "token".into(),
            expiration: "2026-01-01T01:00:00Z".into(),
        };
        let json = serde_json::to_value(ExtendedDocument { credentials: &doc, account_id: "123456789012" })
            .expect("serialises");
        assert_eq!(json["AccountId"], "123456789012");
        assert_eq!(json["AccessKeyId"], "ASIAPOD");
        assert_eq!(json["Type"], "AWS-HMAC");
        let role = role_account("arn:aws:iam::123456789012:role/app").expect("ARN");
        let info = serde_json::to_value(IamInfo::new(&role, "2026-01-01T00:00:00Z".into())).expect("info");
        assert_eq!(info["InstanceProfileArn"], "arn:aws:iam::123456789012:instance-profile/app");
        assert_eq!(info["Code"], "Success");
    }
}
