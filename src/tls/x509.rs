//! The two facts kiam-rs reads from certificates: the node name an agent's certificate is bound
//! to (a `urn:kiam:node:<name>` URI SAN, for node binding), read by rustls-webpki; and when a
//! certificate expires (for the `…_tls_certificate_expiry_seconds` gauges), read by a minimal DER
//! walker, because nothing in the dependency tree exposes `notAfter` (webpki keeps its validity
//! field private). Anything that does not parse yields `None`; rustls does the real validation.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;

/// The URI SAN prefix that binds an agent certificate to a node.
pub const NODE_URI_PREFIX: &str = "urn:kiam:node:";
/// The URI SAN of an operator's certificate for the `Debug` service (`kiam explain
/// --server-address`). The server answers such a certificate only there, and refuses it on
/// `KiamService`'s pod RPCs; agents' certificates, without it, may not use `Debug`.
pub const DEBUG_ROLE_URI: &str = "urn:kiam:role:debug";
/// The URI SAN prefix of every role; a role other than [`DEBUG_ROLE_URI`] is refused everywhere.
pub const ROLE_URI_PREFIX: &str = "urn:kiam:role:";

/// One DER element: tag, contents, and what follows it.
fn element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// The fields of TBSCertificate, in order, with the optional `[0]` version skipped.
fn tbs_fields(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let (_, certificate, _) = element(cert)?;
    let (_, tbs, _) = element(certificate)?;
    let mut fields = Vec::new();
    let mut rest = tbs;
    while !rest.is_empty() {
        let (tag, contents, next) = element(rest)?;
        fields.push((tag, contents));
        rest = next;
    }
    if fields.first().is_some_and(|(tag, _)| *tag == 0xa0) {
        fields.remove(0);
    }
    Some(fields)
}

/// When the certificate stops being valid (`notAfter`).
pub fn not_after(cert: &[u8]) -> Option<SystemTime> {
    let fields = tbs_fields(cert)?;
    // serialNumber, signature, issuer, validity, ...
    let (_, validity) = fields.get(3)?;
    let (_, _not_before, rest) = element(validity)?;
    let (tag, time, _) = element(rest)?;
    let text = std::str::from_utf8(time).ok()?;
    let (year, rest) = match tag {
        0x17 => {
            let yy: i64 = text.get(0..2)?.parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, text.get(2..)?)
        }
        0x18 => (text.get(0..4)?.parse().ok()?, text.get(4..)?),
        _ => return None,
    };
    let n = |r: std::ops::Range<usize>| rest.get(r)?.parse::<u64>().ok();
    let (month, day, h, m, s) = (n(0..2)?, n(2..4)?, n(4..6)?, n(6..8)?, n(8..10)?);
    let stamp = format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}Z");
    crate::creds::time::parse(&stamp)
}

/// The URI subject alternative names, as rustls-webpki (the verifier rustls itself uses) reads
/// them; none when the certificate does not parse.
pub fn uri_sans(cert: &[u8]) -> Vec<String> {
    let der = CertificateDer::from(cert);
    let Ok(parsed) = webpki::EndEntityCert::try_from(&der) else { return Vec::new() };
    parsed.valid_uri_names().map(str::to_string).collect()
}

/// The node an agent certificate is bound to, if it names exactly one.
pub fn node_name(cert: &[u8]) -> Option<String> {
    let nodes: Vec<String> = uri_sans(cert)
        .into_iter()
        .filter_map(|u| u.strip_prefix(NODE_URI_PREFIX).map(str::to_string))
        .collect();
    match nodes.as_slice() {
        [one] if !one.is_empty() => Some(one.clone()),
        _ => None,
    }
}

/// Whether the certificate carries the debug role ([`DEBUG_ROLE_URI`]).
pub fn is_debug(cert: &[u8]) -> bool {
    uri_sans(cert).iter().any(|u| u == DEBUG_ROLE_URI)
}

/// Whether the certificate carries a role other than the debug one: the server knows no other,
/// and gives such a certificate nothing rather than guess what it was meant for.
pub fn has_unknown_role(cert: &[u8]) -> bool {
    uri_sans(cert).iter().any(|u| u.starts_with(ROLE_URI_PREFIX) && u != DEBUG_ROLE_URI)
}

/// Seconds since the epoch, for gauges.
pub fn epoch_seconds(t: SystemTime) -> i64 {
    i64::try_from(t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, KeyPair, SanType};

    fn cert(sans: Vec<SanType>, not_after: (i32, u8, u8)) -> Vec<u8> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params.not_after = rcgen::date_time_ymd(not_after.0, not_after.1, not_after.2);
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn reads_expiry() {
        for (date, want) in [
            ((2030, 1, 2), "2030-01-02T00:00:00Z"),
            ((2049, 12, 31), "2049-12-31T00:00:00Z"),
            ((2051, 6, 1), "2051-06-01T00:00:00Z"),
        ] {
            let der = cert(vec![], date);
            assert_eq!(not_after(&der).map(crate::creds::time::format).as_deref(), Some(want));
        }
        assert_eq!(not_after(b"garbage"), None);
    }

    #[test]
    fn reads_the_node_binding() {
        let uri = |s: &str| SanType::URI(s.try_into().expect("ia5"));
        let dns = SanType::DnsName("kiam-agent".try_into().expect("ia5"));
        let bound = cert(vec![dns.clone(), uri("urn:kiam:node:ip-10-0-0-1.ec2.internal")], (2030, 1, 1));
        assert_eq!(node_name(&bound).as_deref(), Some("ip-10-0-0-1.ec2.internal"));
        assert_eq!(node_name(&cert(vec![dns], (2030, 1, 1))), None);
        let two = cert(vec![uri("urn:kiam:node:a"), uri("urn:kiam:node:b")], (2030, 1, 1));
        assert_eq!(node_name(&two), None, "a certificate naming two nodes binds to none");
        assert_eq!(uri_sans(&two).len(), 2);
        assert!(!is_debug(&two));
        let debug = cert(vec![uri(DEBUG_ROLE_URI), uri("urn:kiam:node:a")], (2030, 1, 1));
        assert!(is_debug(&debug));
        assert!(!is_debug(&cert(vec![uri("urn:kiam:role:debugger")], (2030, 1, 1))));
    }
}
