//! Fuzz targets: each takes arbitrary bytes, drives one parser or decision that sees untrusted
//! input, and asserts what must hold whatever the input (no panic, and a property of the
//! answer). The same functions run as property tests in the normal test run (a bounded smoke,
//! with the corpus under `fuzz/corpus/` replayed first) and under libFuzzer for long runs
//! (`scripts/fuzz`, with cargo-fuzz on a nightly toolchain). SECURITY.md records the runs.
//!
//! Not part of the normal library: `lib.rs` compiles this module only for the unit tests and
//! under cargo-fuzz, which builds every crate with `--cfg fuzzing`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::agent::token::{Tokens, parse_ttl};
use crate::model::Permitted;
use crate::policy::paths::{Route, classify};

#[path = "fuzz_request.rs"]
mod request;
pub use request::request;

/// One target: it panics on an input that breaks what it checks.
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus directory and libFuzzer binary have.
pub const TARGETS: [(&str, Target); 7] = [
    ("paths", paths),
    ("request", request),
    ("token", token),
    ("duration", duration),
    ("permitted", permitted),
    ("pod", pod),
    ("certificate", certificate),
];

/// The agent's path classification: no path it would forward to the node's metadata service
/// names credentials or the signed identity documents, or could be rewritten upstream.
pub fn paths(data: &[u8]) {
    let path = String::from_utf8_lossy(data);
    let route = classify(&path);
    if let Route::Credentials(role) | Route::ExtendedCredentials(role) = route {
        assert!(!role.is_empty() && !role.starts_with('/'), "{path:?} -> {role:?}");
    }
    if route != Route::Other {
        return;
    }
    // Judged by path segments, as a metadata service routes (`ccccmeta-data` is not `meta-data`).
    let lower = path.to_ascii_lowercase();
    let segments: Vec<&str> = lower.split('/').collect();
    let credential = segments.windows(2).any(|w| w[0] == "meta-data" && w[1].starts_with("iam"));
    let signed = segments
        .windows(2)
        .any(|w| w[0] == "instance-identity" && ["pkcs7", "signature", "rsa2048"].contains(&w[1]));
    let rewritable = lower.contains(['%', '\\'])
        || lower.contains("//")
        || segments.iter().any(|s| matches!(*s, "." | ".."));
    assert!(!credential && !signed && !rewritable, "forwardable: {path:?}");
    assert!(!lower.contains("identity-credentials"), "forwardable: {path:?}");
    assert!(path.bytes().all(|b| b.is_ascii_graphic()), "forwardable: {path:?}");
}

/// IMDSv2 tokens and TTLs: only the very token minted for the caller verifies (not a variant
/// of it), and only TTLs from 1 to 21600 s are taken. A first byte 0 makes the rest edits of a
/// minted token, which random bytes would never reach.
pub fn token(data: &[u8]) {
    let Ok(tokens) = Tokens::new() else { return };
    let ip: IpAddr = IpAddr::from([10, 0, 0, 1]);
    let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    let minted = tokens.mint(ip, Duration::from_secs(60), now);
    let candidate = match data.split_first() {
        Some((0, edits)) => edit(&minted, edits),
        _ => String::from_utf8_lossy(data).into_owned(),
    };
    if tokens.verify(&candidate, ip, now).is_ok() {
        assert_eq!(candidate.trim(), minted, "a variant of the token verifies");
    }
    if let Ok(ttl) = parse_ttl(Some(&candidate)) {
        assert!((1..=21_600).contains(&ttl), "{candidate:?} -> {ttl}");
    }
}

/// Applies `edits` (triples of position, operation and character) to `text`.
fn edit(text: &str, edits: &[u8]) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefABCDEF+-. v";
    let mut bytes = text.as_bytes().to_vec();
    for triple in edits.chunks_exact(3) {
        let at = usize::from(triple[0]) % (bytes.len() + 1);
        let c = ALPHABET[usize::from(triple[2]) % ALPHABET.len()];
        match triple[1] % 3 {
            0 => bytes.insert(at, c),
            1 if at < bytes.len() => bytes[at] = c,
            _ if at < bytes.len() => drop(bytes.remove(at)),
            _ => {}
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Go durations (every flag's `15m`, `1h30m`): never a panic, never a negative or empty one.
pub fn duration(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    if let Ok(d) = crate::cli::duration::parse(&text) {
        let trimmed = text.trim();
        assert!(!trimmed.is_empty() && !trimmed.starts_with('-'), "{text:?} -> {d:?}");
    }
}

/// A namespace's `permitted` expression (bytes before the first NUL) against an ARN (the
/// rest): an expression refused alone is refused anchored, and an anchored match is a match of
/// the whole ARN.
pub fn permitted(data: &[u8]) {
    let (expr, arn) = match data.iter().position(|b| *b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &b"arn:aws:iam::123456789012:role/app"[..]),
    };
    let (expr, arn) = (String::from_utf8_lossy(expr), String::from_utf8_lossy(arn));
    let permitted = Permitted::new(&expr);
    let alone = regex::Regex::new(&expr).is_ok();
    assert_eq!(permitted.regex(false).is_ok(), alone, "{expr:?}");
    if !alone {
        assert!(permitted.regex(true).is_err(), "{expr:?} compiles only anchored");
    }
    if let Ok(strict) = permitted.regex(true)
        && let Some(found) = strict.find(&arn)
    {
        assert_eq!((found.start(), found.end()), (0, arn.len()), "{expr:?} on {arn:?}");
    }
}

/// A Pod from arbitrary JSON: projecting never panics, blank annotations are absent, and the
/// primary IP leads a list of distinct addresses.
pub fn pod(data: &[u8]) {
    let Ok(pod) = serde_json::from_slice::<k8s_openapi::api::core::v1::Pod>(data) else { return };
    let Some(facts) = crate::cluster::project::pod_facts(&pod) else { return };
    let values = [facts.role.as_deref(), facts.session_name(), facts.external_id()];
    for value in values.into_iter().flatten() {
        assert!(!value.trim().is_empty(), "a blank annotation was kept");
    }
    let all = facts.addresses();
    if let Some(ip) = facts.ip {
        assert_eq!(all.first(), Some(&ip));
    }
    let mut seen = all.clone();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), all.len(), "duplicate addresses: {all:?}");
}

/// The certificate reader (expiry, URI SANs, node binding, debug role): never a panic on any
/// DER, and a node binding names a node.
pub fn certificate(data: &[u8]) {
    let _ = crate::tls::x509::not_after(data).map(|t| t.duration_since(SystemTime::UNIX_EPOCH));
    let _ = crate::tls::x509::uri_sans(data);
    let _ = crate::tls::x509::is_debug(data);
    if let Some(node) = crate::tls::x509::node_name(data) {
        assert!(!node.is_empty());
    }
}

#[cfg(test)]
#[path = "fuzz_tests.rs"]
mod tests;
