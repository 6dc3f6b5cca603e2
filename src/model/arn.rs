//! Amazon Resource Names: one parser ([`Arn::parse`]) for every place that reads an ARN, and the
//! role ARN types the policy resolves pod annotations into.

use std::fmt;

/// An ARN split into its fields: `arn:<partition>:<service>:<region>:<account>:<resource>`.
/// Borrowed from the text it was parsed from, so parsing allocates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arn<'a> {
    /// `aws`, `aws-cn`, `aws-us-gov`, ...
    pub partition: &'a str,
    /// `iam`, `sts`, ...
    pub service: &'a str,
    /// Empty for IAM, a global service.
    pub region: &'a str,
    /// The account ID (12 digits for IAM).
    pub account: &'a str,
    /// Everything after the fifth colon, e.g. `role/path/name` (it may contain colons).
    pub resource: &'a str,
}

impl<'a> Arn<'a> {
    /// Splits `text` (surrounding white space ignored) into its six fields; `None` when it does
    /// not start with `arn:`, has fewer than six fields, or names no partition.
    pub fn parse(text: &'a str) -> Option<Arn<'a>> {
        let mut fields = text.trim().splitn(6, ':');
        let (prefix, partition, service, region, account, resource) =
            (fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?, fields.next()?);
        (prefix == "arn" && !partition.is_empty()).then_some(Arn {
            partition,
            service,
            region,
            account,
            resource,
        })
    }

    /// The path and name of an IAM role (what follows `role/`), when this is an IAM role ARN
    /// with a 12-digit account: what the metadata service's `iam/info` and `AccountId` need.
    pub fn iam_role(&self) -> Option<&'a str> {
        let path_and_name = self.resource.strip_prefix("role/")?;
        let ok = self.service == "iam"
            && self.region.is_empty()
            && self.account.len() == 12
            && self.account.bytes().all(|b| b.is_ascii_digit())
            && !path_and_name.is_empty()
            && !path_and_name.ends_with('/');
        ok.then_some(path_and_name)
    }
}

/// A fully qualified IAM role ARN, e.g. `arn:aws:iam::123456789012:role/path/name`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoleArn(String);

/// The prefix that turns a short role name into an ARN (`--role-base-arn`), always ending in `/`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseArn(String);

/// Why a role could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoleError {
    /// The annotation or request named no role at all.
    #[error("role can't be empty")]
    Empty,
    /// A short name was given but no base ARN is configured to complete it.
    #[error("role {0:?} is not an ARN and no --role-base-arn is configured")]
    NoBase(String),
    /// The base ARN is not of the form `arn:<partition>:iam::<account>:role/[path/]`.
    #[error("invalid base ARN {0:?}: expected arn:<partition>:iam::<account>:role/")]
    BadBase(String),
    /// An ARN whose `arn:` prefix is in another case (`ARN:aws:iam::...`): not a role name, and
    /// not an ARN STS would take either (kube2iam passed it on as it was).
    #[error("role {0:?} starts like an ARN but not with a lowercase \"arn:\": write \"arn:\" in lowercase")]
    MiscasedArn(String),
}

impl BaseArn {
    /// Validates a `--role-base-arn` value. kiam concatenated the prefix as is, so a value without
    /// the trailing `/` silently produced wrong ARNs; here the `/` is added instead.
    pub fn parse(s: &str) -> Result<BaseArn, RoleError> {
        let ok = Arn::parse(s).is_some_and(|arn| arn.service == "iam" && arn.resource.starts_with("role"));
        if !ok || s.trim() != s {
            return Err(RoleError::BadBase(s.to_string()));
        }
        let mut base = s.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Ok(BaseArn(base))
    }

    /// The base ARN of the account and partition of an instance profile ARN
    /// (`arn:<partition>:iam::<account>:instance-profile/<name>`), for
    /// `--role-base-arn-autodetect`.
    pub fn of_instance_profile(profile: &str) -> Result<BaseArn, RoleError> {
        let bad = || RoleError::BadBase(profile.to_string());
        let arn =
            Arn::parse(profile).filter(|a| a.service == "iam" && !a.account.is_empty()).ok_or_else(bad)?;
        BaseArn::parse(&format!("arn:{}:iam::{}:role/", arn.partition, arn.account))
    }

    /// The prefix text, ending in `/`.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl RoleArn {
    /// Resolves a role as kiam v4 does: a value starting with `arn:` is used as is; anything else
    /// is appended to the base ARN after trimming leading `/`, so `path/name` keeps its path.
    pub fn resolve(role: &str, base: Option<&BaseArn>) -> Result<RoleArn, RoleError> {
        let role = role.trim();
        if role.starts_with("arn:") {
            return Ok(RoleArn(role.to_string()));
        }
        if role.get(..4).is_some_and(|prefix| prefix.eq_ignore_ascii_case("arn:")) {
            return Err(RoleError::MiscasedArn(role.to_string()));
        }
        let short = role.trim_start_matches('/');
        if short.is_empty() {
            return Err(RoleError::Empty);
        }
        match base {
            Some(base) => Ok(RoleArn(format!("{}{short}", base.0))),
            None => Err(RoleError::NoBase(short.to_string())),
        }
    }

    /// The ARN text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The role's name with its path (`path/name`): what follows `role/` in the ARN.
    pub fn path_and_name(&self) -> &str {
        let resource = Arn::parse(&self.0).map_or("", |arn| arn.resource);
        resource.strip_prefix("role/").unwrap_or(resource)
    }

    /// The bare role name, the last path segment. This is what the metadata service lists under
    /// `security-credentials/`, because SDKs put it into a URL path.
    pub fn name(&self) -> &str {
        let p = self.path_and_name();
        p.rsplit('/').next().unwrap_or(p)
    }
}

impl fmt::Display for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RoleArn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RoleArn({})", self.0)
    }
}

/// The name a role is listed under for a pod whose annotation is `annotation`: the last path
/// segment, whether the annotation is a short name, `path/name` or a full ARN.
pub fn listed_name(annotation: &str) -> &str {
    let a = annotation.trim();
    let resource = match Arn::parse(a) {
        Some(arn) => arn.resource.strip_prefix("role/").unwrap_or(arn.resource),
        None if a.starts_with("arn:") => "",
        None => a,
    };
    resource.trim_end_matches('/').rsplit('/').next().unwrap_or(resource)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").expect("valid base")
    }

    #[test]
    fn an_arn_in_another_case_is_refused_not_prefixed() {
        for role in ["ARN:aws:iam::123456789012:role/app", "Arn:aws:iam::123456789012:role/app"] {
            assert_eq!(RoleArn::resolve(role, Some(&base())), Err(RoleError::MiscasedArn(role.to_string())));
        }
        let arn = RoleArn::resolve("arnold", Some(&base())).expect("a name that starts with arn");
        assert_eq!(arn.as_str(), "arn:aws:iam::123456789012:role/arnold");
    }

    #[test]
    fn parses_fields_once() {
        let arn = Arn::parse(" arn:aws-cn:iam::210987654321:role/team/app ").expect("ARN");
        assert_eq!(
            (arn.partition, arn.service, arn.region, arn.account, arn.resource),
            ("aws-cn", "iam", "", "210987654321", "role/team/app")
        );
        assert_eq!(arn.iam_role(), Some("team/app"));
        assert_eq!(Arn::parse("arn:aws:s3:::b/k:v").map(|a| a.resource), Some("b/k:v"));
        for not_iam_role in [
            "arn:aws:iam::123:role/app",
            "arn:aws:iam::123456789012:user/x",
            "arn:aws:iam::123456789012:role/",
        ] {
            assert_eq!(Arn::parse(not_iam_role).and_then(|a| a.iam_role()), None, "{not_iam_role}");
        }
        for bad in ["", "app", "arn:", "arn::iam::1:role/x", "arn:aws:iam::1"] {
            assert_eq!(Arn::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn resolves_like_kiam() {
        let b = base();
        let cases = [
            ("app", "arn:aws:iam::123456789012:role/app"),
            ("/app", "arn:aws:iam::123456789012:role/app"),
            ("team/app", "arn:aws:iam::123456789012:role/team/app"),
            ("arn:aws:iam::999:role/x/y", "arn:aws:iam::999:role/x/y"),
            ("arn:aws-cn:iam::1:role/z", "arn:aws-cn:iam::1:role/z"),
        ];
        for (input, want) in cases {
            assert_eq!(RoleArn::resolve(input, Some(&b)).expect(input).as_str(), want);
        }
        assert_eq!(RoleArn::resolve("", Some(&b)), Err(RoleError::Empty));
        assert_eq!(RoleArn::resolve("/", Some(&b)), Err(RoleError::Empty));
        assert!(matches!(RoleArn::resolve("app", None), Err(RoleError::NoBase(_))));
    }

    #[test]
    fn names_keep_paths() {
        let arn = RoleArn::resolve("team/app", Some(&base())).expect("resolves");
        assert_eq!(arn.path_and_name(), "team/app");
        assert_eq!(arn.name(), "app");
        assert_eq!(listed_name("arn:aws:iam::1:role/team/app"), "app");
        assert_eq!(listed_name("team/app"), "app");
        assert_eq!(listed_name("app"), "app");
    }

    #[test]
    fn base_arn_validation() {
        assert_eq!(
            BaseArn::parse("arn:aws:iam::123:role").expect("fixed up").as_str(),
            "arn:aws:iam::123:role/"
        );
        assert!(BaseArn::parse("arn:aws:iam::123:role/path/").is_ok());
        for bad in ["", "123", "arn:aws:s3:::bucket/", "arn:aws:iam::123:user/"] {
            assert!(BaseArn::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn base_arn_of_an_instance_profile() {
        for (profile, want) in [
            ("arn:aws:iam::123456789012:instance-profile/nodes", "arn:aws:iam::123456789012:role/"),
            ("arn:aws-cn:iam::210987654321:instance-profile/p/q", "arn:aws-cn:iam::210987654321:role/"),
        ] {
            assert_eq!(BaseArn::of_instance_profile(profile).expect(profile).as_str(), want);
        }
        assert!(BaseArn::of_instance_profile("not-an-arn").is_err());
    }
}
