//! Which metadata paths the agent answers itself, which it may forward to the node's real
//! metadata service, and which it refuses. Pure functions over the raw request path.
//!
//! The classification is deliberately strict: a path that could be normalised into something
//! else upstream (`.` or `..` segments, `//`, percent-escapes) is refused before any allow-list
//! is consulted, and nothing under `meta-data/iam/` or `identity-credentials/` is ever
//! forwarded, whatever `--allow-route-regexp` says, because those paths carry the node's
//! credentials. Nor are the signed instance-identity documents (`dynamic/instance-identity/`
//! `pkcs7`, `signature`, `rsa2048`): with them a pod could log in as the node wherever the node's
//! identity is trusted (Vault's EC2 auth method, say). Paths with anything but printable ASCII
//! are malformed: the metadata service has none, and a proxy could fold them into some.

use regex::Regex;

/// What a request path is, for the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    /// `/ping`.
    Ping,
    /// `/health`.
    Health,
    /// `/healthz`: kube2iam's health answer (kube2iam mode only).
    Healthz,
    /// `/v1/credentials`: the container credentials endpoint (EKS Pod Identity's), which
    /// identifies the pod by the token in `Authorization`, not by its address.
    ContainerCredentials,
    /// `/{version}/api/token`: IMDSv2 token issue.
    Token,
    /// `/{version}/meta-data/iam/security-credentials`: redirected to the listing.
    CredentialsRedirect,
    /// `/{version}/meta-data/iam/security-credentials/`: the pod's role name.
    RoleList,
    /// `/{version}/meta-data/iam/security-credentials/{role}`.
    Credentials(&'a str),
    /// `/{version}/meta-data/iam/security-credentials-extended/`: the pod's role name, for SDKs
    /// that try the extended API first.
    ExtendedRoleList,
    /// `/{version}/meta-data/iam/security-credentials-extended/{role}`: credentials plus
    /// `AccountId`.
    ExtendedCredentials(&'a str),
    /// `/{version}/meta-data/iam/info`: the instance profile, answered for the pod's role.
    IamInfo,
    /// A credential-bearing path the agent does not serve and never forwards.
    Guarded,
    /// A path that could be rewritten upstream (dot segments, `//`, escapes).
    Malformed,
    /// Anything else: forwarded only if the allow-list matches.
    Other,
}

/// Classifies a request path (without its query string).
pub fn classify(path: &str) -> Route<'_> {
    match path {
        "/ping" => return Route::Ping,
        "/health" => return Route::Health,
        "/healthz" => return Route::Healthz,
        "/v1/credentials" => return Route::ContainerCredentials,
        _ => {}
    }
    if is_malformed(path) {
        return Route::Malformed;
    }
    let Some(rest) = path.strip_prefix('/') else {
        return Route::Malformed;
    };
    let (version, rest) = rest.split_once('/').unwrap_or((rest, ""));
    if version.is_empty() {
        return Route::Other;
    }
    if rest == "api/token" {
        return Route::Token;
    }
    if let Some(iam) = rest.strip_prefix("meta-data/iam/") {
        match iam {
            "security-credentials" => return Route::CredentialsRedirect,
            "security-credentials/" => return Route::RoleList,
            "security-credentials-extended/" => return Route::ExtendedRoleList,
            "info" => return Route::IamInfo,
            _ => {}
        }
        if let Some(role) = iam.strip_prefix("security-credentials/") {
            return Route::Credentials(role);
        }
        if let Some(role) = iam.strip_prefix("security-credentials-extended/") {
            return Route::ExtendedCredentials(role);
        }
    }
    if is_guarded(path) {
        return Route::Guarded;
    }
    Route::Other
}

fn is_malformed(path: &str) -> bool {
    !path.bytes().all(|b| b.is_ascii_graphic())
        || path.contains('%')
        || path.contains("//")
        || path.contains('\\')
        || path.split('/').any(|seg| seg == "." || seg == "..")
}

/// Whether a path that is not served could reach credentials upstream: anything under
/// `meta-data/iam` or mentioning `identity-credentials`, under any version segment or none, in
/// any letter case (in case a metadata service, or a proxy in front of it, folds case).
fn is_guarded(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    lower.contains("identity-credentials")
        || signed_identity(&lower)
        || lower
            .split('/')
            .collect::<Vec<_>>()
            .windows(2)
            .any(|w| w[0] == "meta-data" && w[1].starts_with("iam"))
}

/// Whether a lower-cased path is under `instance-identity/` and is not the plain, unsigned
/// `document` (which SDKs read for the region): the signatures (`pkcs7`, `signature`,
/// `rsa2048`, and whatever the service adds there) prove to third parties that the caller is
/// the node.
fn signed_identity(lower: &str) -> bool {
    let Some((_, rest)) = lower.split_once("instance-identity") else { return false };
    !matches!(rest, "" | "/" | "/document")
}

/// The `--allow-route-regexp` allow-list: paths it matches (unanchored, as in kiam) are forwarded
/// to the node's metadata service. The default `^$` matches nothing.
#[derive(Clone, Debug)]
pub struct AllowRoutes(Regex);

impl AllowRoutes {
    /// Compiles the expression; an empty expression means `^$`, as in kiam.
    pub fn new(expr: &str) -> Result<AllowRoutes, regex::Error> {
        let expr = if expr.is_empty() { "^$" } else { expr };
        Regex::new(expr).map(AllowRoutes)
    }

    /// Whether `path` may be forwarded.
    pub fn allows(&self, path: &str) -> bool {
        self.0.is_match(path)
    }

    /// The expression, for error messages.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let table = [
            ("/ping", Route::Ping),
            ("/health", Route::Health),
            ("/latest/api/token", Route::Token),
            ("/v1/credentials", Route::ContainerCredentials),
            ("/v1/credentials/", Route::Other),
            ("/latest/meta-data/iam/security-credentials", Route::CredentialsRedirect),
            ("/2016-09-02/meta-data/iam/security-credentials/", Route::RoleList),
            ("/latest/meta-data/iam/security-credentials/app", Route::Credentials("app")),
            ("/latest/meta-data/iam/security-credentials/team/app", Route::Credentials("team/app")),
            ("/latest/meta-data/iam/security-credentials-extended/", Route::ExtendedRoleList),
            ("/latest/meta-data/iam/security-credentials-extended/app", Route::ExtendedCredentials("app")),
            ("/latest/meta-data/iam/info", Route::IamInfo),
            ("/latest/meta-data/iam/info/", Route::Guarded),
            ("/latest/meta-data/iam", Route::Guarded),
            ("/latest/meta-data/iam/", Route::Guarded),
            ("/latest/meta-data/iam/security-credentials-extended", Route::Guarded),
            ("/latest/META-DATA/IAM/security-credentials/node-role", Route::Guarded),
            ("/meta-data/iam/security-credentials/node-role", Route::Guarded),
            ("/latest/identity-credentials/ec2/security-credentials/ec2-instance", Route::Guarded),
            ("/latest/dynamic/identity-credentials/x", Route::Guarded),
            ("/latest/meta-data/instance-id", Route::Other),
            ("/latest/user-data", Route::Other),
            ("/latest/dynamic/instance-identity/document", Route::Other),
            ("/latest/dynamic/instance-identity/", Route::Other),
            ("/latest/dynamic/instance-identity/pkcs7", Route::Guarded),
            ("/latest/dynamic/instance-identity/signature", Route::Guarded),
            ("/latest/dynamic/instance-identity/rsa2048", Route::Guarded),
            ("/latest/dynamic/Instance-Identity/PKCS7", Route::Guarded),
            ("/latest/dynamic/instance-identity/document/", Route::Guarded),
            ("/dynamic/instance-identity/pkcs7", Route::Guarded),
            ("/latest/meta-data/ınstance-id", Route::Malformed),
            ("/latest/meta-data/iam\u{200b}/info", Route::Malformed),
            ("/latest/meta-data/instance id", Route::Malformed),
            ("/latest/meta-data/instance-id\t", Route::Malformed),
            ("/latest/meta-data/../meta-data/iam/info", Route::Malformed),
            ("/latest/meta-data/iam/security-credentials/..%2fx", Route::Malformed),
            ("/latest/meta-data/%69am/info", Route::Malformed),
            ("/latest//meta-data/iam/info", Route::Malformed),
            ("/latest/meta-data/./iam", Route::Malformed),
            ("/latest/meta-data\\iam", Route::Malformed),
            ("*", Route::Malformed),
            ("/", Route::Other),
        ];
        for (path, want) in table {
            assert_eq!(classify(path), want, "{path}");
        }
    }

    #[test]
    fn allow_list_defaults_to_nothing() {
        let none = AllowRoutes::new("").expect("compiles");
        assert!(!none.allows("/latest/meta-data/instance-id"));
        let some = AllowRoutes::new("^/latest/meta-data/(instance-id|placement/.*)$").expect("ok");
        assert!(some.allows("/latest/meta-data/instance-id"));
        assert!(some.allows("/latest/meta-data/placement/region"));
        assert!(!some.allows("/latest/user-data"));
    }
}
