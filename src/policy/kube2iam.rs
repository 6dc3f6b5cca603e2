//! kube2iam's rules, for kube2iam mode: the pod's role annotation (or `--default-role`) must be
//! the role asked for, and with `--namespace-restrictions` the namespace's allowed-roles
//! annotation (a JSON array of patterns) must match it. Without restrictions any annotated role
//! is assumed, as in kube2iam.
//!
//! Where kube2iam had holes, these rules differ (see the README's "Coming from kube2iam"):
//! regular-expression patterns are anchored on the whole role ARN (kube2iam searched anywhere in
//! it), and a pattern or annotation that does not parse denies with a reason instead of
//! silently matching nothing.

use regex::Regex;

use super::Denial;
use crate::model::{BaseArn, NamespaceFacts, PodFacts, RoleArn};

/// How namespace patterns are written (`--namespace-restriction-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternFormat {
    /// `*` matches any run of characters; everything else is literal; the whole ARN must match.
    Glob,
    /// A regular expression, anchored on the whole ARN.
    Regexp,
}

/// `--default-role` and `--namespace-restrictions`.
#[derive(Clone, Debug, Default)]
pub struct Rules {
    /// The role of pods without the role annotation (name or ARN).
    pub default_role: Option<String>,
    /// Enforce namespaces' allowed-roles annotations, written in this format.
    pub restrictions: Option<PatternFormat>,
}

impl Rules {
    /// The role a pod uses: its annotation, or the default role; and whether it is the default.
    pub fn effective_role<'a>(&'a self, pod: &'a PodFacts) -> Option<(&'a str, bool)> {
        match pod.role.as_deref().map(str::trim).filter(|r| !r.is_empty()) {
            Some(role) => Some((role, false)),
            None => self.default_role.as_deref().map(|r| (r, true)),
        }
    }

    /// Decides as kube2iam does (less its holes). The default role bypasses namespace
    /// restrictions, as in kube2iam.
    pub fn decide(
        &self,
        base: Option<&BaseArn>,
        pod: &PodFacts,
        namespace: Option<&NamespaceFacts>,
        requested: &str,
    ) -> Result<RoleArn, Denial> {
        let (role, is_default) = self.effective_role(pod).ok_or(Denial::NoRoleAnnotation)?;
        let arn = RoleArn::resolve(role, base).map_err(Denial::Unresolvable)?;
        let asked = RoleArn::resolve(requested, base).map_err(Denial::Unresolvable)?;
        if asked != arn {
            return Err(Denial::RoleMismatch {
                requested: requested.to_string(),
                annotated: role.to_string(),
            });
        }
        // kube2iam exempts the default role whenever it is the role used, also when a pod
        // names it itself (by name or full ARN).
        let default_arn = self.default_role.as_deref().and_then(|r| RoleArn::resolve(r, base).ok());
        let exempt = is_default || default_arn.as_ref() == Some(&arn);
        let Some(format) = self.restrictions.filter(|_| !exempt) else { return Ok(arn) };
        let namespace = namespace.ok_or_else(|| Denial::NamespaceUnknown(pod.namespace.to_string()))?;
        let patterns = match &namespace.allowed_roles {
            None => return Err(Denial::NamespaceUnset(arn.to_string())),
            Some(Err(error)) => {
                return Err(Denial::NamespaceInvalid { expr: "allowed-roles".into(), error: error.clone() });
            }
            Some(Ok(patterns)) => patterns,
        };
        for pattern in patterns {
            let full = match pattern.trim() {
                p if p.starts_with("arn:") => p.to_string(),
                p => format!("{}{}", base.map_or("", BaseArn::as_str), p.trim_start_matches('/')),
            };
            let matched = match format {
                PatternFormat::Glob => glob_matches(&full, arn.as_str()),
                PatternFormat::Regexp => match Regex::new(&format!("^(?:{full})$")) {
                    Ok(re) => re.is_match(arn.as_str()),
                    Err(e) => {
                        return Err(Denial::NamespaceInvalid { expr: pattern.clone(), error: e.to_string() });
                    }
                },
            };
            if matched {
                return Ok(arn);
            }
        }
        Err(Denial::NamespaceForbids { expr: patterns.join(", "), arn: arn.to_string(), hint: None })
    }
}

/// Whether `text` matches `pattern` whole, `*` standing for any run of characters.
pub fn glob_matches(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    let [first, middle @ .., last] = parts.as_slice() else { return pattern == text };
    if parts.len() == 1 {
        return pattern == text;
    }
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// Parses a namespace's allowed-roles annotation: a JSON array of strings.
pub fn parse_allowed_roles(text: &str) -> Result<Vec<String>, String> {
    serde_json::from_str::<Vec<String>>(text).map_err(|e| format!("not a JSON array of strings: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "arn:aws:iam::123456789012:role/";

    fn pod(role: Option<&str>) -> PodFacts {
        PodFacts::test("team-a", "web", "10.0.0.5", role)
    }

    fn ns(allowed: Option<&str>) -> NamespaceFacts {
        NamespaceFacts {
            name: "team-a".into(),
            permitted: None,
            allowed_roles: allowed.map(parse_allowed_roles),
            session_policy: None,
        }
    }

    #[test]
    fn globs_match_whole_strings() {
        for (pattern, text, want) in [
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "abc", true),
            ("a*b*c", "aXbYc", true),
            ("abc", "abc", true),
            ("ab", "abc", false),
            ("*b", "abc", false),
            ("a*c", "ab", false),
            ("*", "", true),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob_matches(pattern, text), want, "{pattern} ~ {text}");
        }
    }

    #[test]
    fn the_restriction_matrix() {
        let base = BaseArn::parse(BASE).expect("base");
        let glob = Rules { default_role: Some("fallback".into()), restrictions: Some(PatternFormat::Glob) };
        let regexp = Rules { restrictions: Some(PatternFormat::Regexp), ..glob.clone() };
        let open = Rules::default();
        type Case<'a> = (&'a Rules, Option<&'a str>, Option<&'a str>, &'a str, Result<&'a str, &'a str>);
        let app = "arn:aws:iam::123456789012:role/app";
        let cases: Vec<Case> = vec![
            (&open, Some("app"), None, "app", Ok(app)),
            (&glob, Some("app"), Some(r#"["app"]"#), "app", Ok(app)),
            (&glob, Some("app"), Some(r#"["ap*"]"#), "app", Ok(app)),
            (&glob, Some("app"), Some(r#"["other"]"#), "app", Err("forbids")),
            (&glob, Some("app"), None, "app", Err("'(empty)'")),
            (&glob, Some("app"), Some("not json"), "app", Err("invalid")),
            (&glob, Some("app"), Some(r#"["arn:aws:iam::123456789012:role/*"]"#), "app", Ok(app)),
            (&regexp, Some("app"), Some(r#"["a.p"]"#), "app", Ok(app)),
            (&regexp, Some("app"), Some(r#"["pp"]"#), "app", Err("forbids")),
            (&regexp, Some("app"), Some(r#"["("]"#), "app", Err("invalid")),
            (&glob, None, Some(r#"["other"]"#), "fallback", Ok("arn:aws:iam::123456789012:role/fallback")),
            (&open, None, None, "app", Err("no iam.amazonaws.com/role")),
            // The default role is exempt however the pod names it, as in kube2iam.
            (
                &glob,
                Some("fallback"),
                Some(r#"["other"]"#),
                "fallback",
                Ok("arn:aws:iam::123456789012:role/fallback"),
            ),
            (
                &glob,
                Some("arn:aws:iam::123456789012:role/fallback"),
                None,
                "fallback",
                Ok("arn:aws:iam::123456789012:role/fallback"),
            ),
            (&glob, Some("ARN:aws:iam::123456789012:role/app"), None, "app", Err("lowercase")),
            (&glob, Some("app"), Some(r#"["app"]"#), "other", Err("requested 'other'")),
            (
                &glob,
                Some("arn:aws:iam::999999999999:role/x"),
                Some(r#"["arn:aws:iam::999999999999:role/*"]"#),
                "arn:aws:iam::999999999999:role/x",
                Ok("arn:aws:iam::999999999999:role/x"),
            ),
        ];
        for (rules, role, allowed, requested, want) in cases {
            let got = rules.decide(Some(&base), &pod(role), Some(&ns(allowed)), requested);
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_str(), w),
                (Err(w), Err(g)) => assert!(g.to_string().contains(w), "{g} should contain {w}"),
                (w, g) => panic!("{role:?} {allowed:?} {requested}: want {w:?}, got {g:?}"),
            }
        }
    }
}
