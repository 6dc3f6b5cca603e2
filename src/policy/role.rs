//! Role names and ARNs: resolving a pod's annotation to the ARN that STS is asked for, and the
//! session name the assumed role carries.

use std::fmt;

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
}

impl BaseArn {
    /// Validates a `--role-base-arn` value. kiam concatenated the prefix as is, so a value without
    /// the trailing `/` silently produced wrong ARNs; here the `/` is added instead.
    pub fn parse(s: &str) -> Result<BaseArn, RoleError> {
        let fields: Vec<&str> = s.splitn(6, ':').collect();
        let ok = fields.len() == 6
            && fields[0] == "arn"
            && !fields[1].is_empty()
            && fields[2] == "iam"
            && fields[5].starts_with("role");
        if !ok {
            return Err(RoleError::BadBase(s.to_string()));
        }
        let mut base = s.to_string();
        if !base.ends_with('/') {
            base.push('/');
        }
        Ok(BaseArn(base))
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
        let resource = self.0.splitn(6, ':').nth(5).unwrap_or("");
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
    let resource = if a.starts_with("arn:") {
        let r = a.splitn(6, ':').nth(5).unwrap_or("");
        r.strip_prefix("role/").unwrap_or(r)
    } else {
        a
    };
    resource.trim_end_matches('/').rsplit('/').next().unwrap_or(resource)
}

/// The STS session name for a pod: `kiam-` followed by the pod's session-name annotation or the
/// server's default, with characters STS rejects replaced by `-`. Like kiam, a name longer than
/// 64 characters is cut to 63, so that CloudTrail shows the same names after a migration.
pub fn session_name(annotation: Option<&str>, default: &str) -> String {
    let suffix = annotation.map(str::trim).filter(|s| !s.is_empty()).unwrap_or(default);
    let mut name: String = format!("kiam-{suffix}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' })
        .collect();
    if name.len() > 64 {
        name.truncate(63);
    }
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").expect("valid base")
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
    fn session_names() {
        assert_eq!(session_name(None, "kiam"), "kiam-kiam");
        assert_eq!(session_name(Some("my app!"), "kiam"), "kiam-my-app-");
        assert_eq!(session_name(Some(""), "svc"), "kiam-svc");
        let long = "x".repeat(70);
        assert_eq!(session_name(Some(&long), "kiam").len(), 63);
        let exact = "y".repeat(59);
        assert_eq!(session_name(Some(&exact), "kiam").len(), 64);
    }
}
