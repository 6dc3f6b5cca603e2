//! The session name an assumed role carries. Role names and ARNs themselves live in
//! [`crate::model::arn`].

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
