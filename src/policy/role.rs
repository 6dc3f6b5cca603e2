//! The session name and the source identity an assumed role carries. Role names and ARNs
//! themselves live in [`crate::model::arn`].

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

/// The longest source identity STS accepts.
const MAX_SOURCE_IDENTITY: usize = 64;

/// The STS `SourceIdentity` for a pod (`--source-identity`): `<name>@<namespace>`, which
/// CloudTrail records on every call made with the credentials and which survives role chaining.
/// Characters outside STS's alphabet (`[\w+=,.@-]`) become `-` (Kubernetes names have none).
/// A longer result keeps its first 47 characters and ends in `-` and 16 hex digits of a hash of
/// the whole, so that two long names stay apart and the same pod always gets the same identity.
pub fn source_identity(namespace: &str, name: &str) -> String {
    let full: String = format!("{name}@{namespace}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) { c } else { '-' })
        .collect();
    if full.len() <= MAX_SOURCE_IDENTITY {
        return full;
    }
    let suffix = format!("-{:016x}", fnv1a(full.as_bytes()));
    let keep = MAX_SOURCE_IDENTITY - suffix.len();
    format!("{}{suffix}", &full[..keep])
}

/// FNV-1a, 64 bits: a stable, dependency-free hash to tell long names apart (not a secret, and
/// nothing an attacker gains by colliding: STS does not trust it, the trust policy does).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
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

    #[test]
    fn source_identities_fit_sts_and_stay_apart() {
        assert_eq!(source_identity("team-a", "web-7d9f"), "web-7d9f@team-a");
        let allowed = |s: &str| s.chars().all(|c| c.is_ascii_alphanumeric() || "_+=,.@-".contains(c));
        let long_ns = "n".repeat(63);
        let (a, b) =
            (source_identity(&long_ns, &"p".repeat(200)), source_identity(&long_ns, &"p".repeat(201)));
        assert_eq!((a.len(), b.len()), (64, 64));
        assert!(allowed(&a) && allowed(&b));
        assert_ne!(a, b, "long names are told apart");
        assert_eq!(a, source_identity(&long_ns, &"p".repeat(200)), "deterministic");
        assert!(a.starts_with("ppp"), "{a}");
        assert!(source_identity("a", "b").len() >= 2);
    }
}
