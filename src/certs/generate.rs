//! `kiam certs generate`: a CA and the leaves signed by it, written as PEM files.
//!
//! Layout of the output directory (the names the README and the guides use):
//! `ca.pem`/`ca-key.pem`, `server.pem`/`server-key.pem` (serverAuth and clientAuth: the
//! server's probes run `kiam health` with it), `agent.pem`/`agent-key.pem` (clientAuth), and per
//! node `agent-<node>.pem`/`agent-<node>-key.pem` with the URI SAN `urn:kiam:node:<node>`.
//! An existing CA is reused, so nodes can be added later; existing leaves are kept; `force`
//! replaces everything this run would write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use super::{Error, read, write};
use crate::tls::x509::NODE_URI_PREFIX;

/// Private keys: owner read/write only.
pub(super) const KEY_MODE: u32 = 0o600;
/// Certificates are public.
pub(super) const CERT_MODE: u32 = 0o644;
/// Clocks on nodes may lag the machine that signs: leaves are valid from a little earlier.
const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// What to generate.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The output directory (created with mode 0700 if missing).
    pub out: PathBuf,
    /// The server certificate's SANs: DNS names or IP addresses.
    pub server_sans: Vec<String>,
    /// Nodes that get an agent certificate bound to them.
    pub nodes: Vec<String>,
    /// How long the CA is valid.
    pub ca_lifetime: Duration,
    /// How long the server and agent certificates are valid.
    pub leaf_lifetime: Duration,
    /// Replace existing files.
    pub force: bool,
}

impl Plan {
    /// The server SANs for a Service `service` in `namespace`, plus the loopback names the
    /// server's own probes connect to.
    pub fn default_server_sans(service: &str, namespace: &str) -> Vec<String> {
        vec![
            service.to_string(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
            "localhost".into(),
            "127.0.0.1".into(),
        ]
    }
}

/// What a run wrote and what it left alone.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Files written.
    pub written: Vec<PathBuf>,
    /// Existing certificates kept (with their keys).
    pub kept: Vec<PathBuf>,
    /// Whether the CA already existed and signed the new leaves.
    pub reused_ca: bool,
}

/// The role a leaf plays.
enum Leaf {
    Server(Vec<String>),
    Agent,
    Node(String),
}

/// Writes the CA and every leaf the plan asks for.
pub fn generate(plan: &Plan) -> Result<Outcome, Error> {
    validate(plan)?;
    let mut leaves =
        vec![("server".to_string(), Leaf::Server(plan.server_sans.clone())), ("agent".into(), Leaf::Agent)];
    leaves.extend(plan.nodes.iter().map(|n| (format!("agent-{n}"), Leaf::Node(n.clone()))));
    ensure_dir(&plan.out)?;
    let path = |name: &str| plan.out.join(name);
    let (ca_cert, ca_key) = (path("ca.pem"), path("ca-key.pem"));
    let mut outcome = Outcome::default();
    let reuse_ca = !plan.force && ca_cert.exists() && ca_key.exists();
    if !plan.force && !reuse_ca {
        // Leaves without their CA cannot be extended or trusted anew: refuse, do not orphan them.
        let mut existing: Vec<PathBuf> =
            [&ca_cert, &ca_key].into_iter().filter(|p| p.exists()).cloned().collect();
        for (stem, _) in &leaves {
            existing.extend([path(&format!("{stem}-key.pem"))].into_iter().filter(|p| p.exists()));
        }
        if !existing.is_empty() {
            return Err(Error::Exists(existing));
        }
    }
    let issuer = if reuse_ca {
        outcome.reused_ca = true;
        let key = KeyPair::from_pem(&read(&ca_key)?)?;
        Issuer::from_ca_cert_pem(&read(&ca_cert)?, key)?
    } else {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = ca_params(plan.ca_lifetime)?.self_signed(&key)?;
        write(&ca_key, &key.serialize_pem(), KEY_MODE)?;
        write(&ca_cert, &cert.pem(), CERT_MODE)?;
        outcome.written.extend([ca_cert.clone(), ca_key.clone()]);
        Issuer::from_ca_cert_der(cert.der(), key)?
    };
    for (stem, leaf) in leaves {
        let (cert_path, key_path) = (path(&format!("{stem}.pem")), path(&format!("{stem}-key.pem")));
        if !plan.force && (cert_path.exists() || key_path.exists()) {
            if !(cert_path.exists() && key_path.exists()) {
                return Err(Error::Invalid(format!(
                    "{} and {} must both exist or neither; pass --force to replace them",
                    cert_path.display(),
                    key_path.display()
                )));
            }
            outcome.kept.push(cert_path);
            continue;
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = leaf_params(&leaf, plan.leaf_lifetime)?.signed_by(&key, &issuer)?;
        write(&key_path, &key.serialize_pem(), KEY_MODE)?;
        write(&cert_path, &cert.pem(), CERT_MODE)?;
        outcome.written.extend([cert_path, key_path]);
    }
    Ok(outcome)
}

fn validate(plan: &Plan) -> Result<(), Error> {
    if plan.server_sans.is_empty() {
        return Err(Error::Invalid("the server certificate needs at least one SAN".into()));
    }
    if plan.leaf_lifetime.is_zero() || plan.leaf_lifetime > plan.ca_lifetime {
        return Err(Error::Invalid(
            "certificates must be valid for a while, and no longer than their CA".into(),
        ));
    }
    for node in &plan.nodes {
        if !is_node_name(node) {
            return Err(Error::Invalid(format!(
                "--node {node:?} is not a Kubernetes node name (lower-case letters, digits, '-' and '.')"
            )));
        }
    }
    Ok(())
}

/// A DNS-1123 subdomain, which every Kubernetes node name is (and which is safe in a file name).
fn is_node_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    name.len() <= 253 && name.split('.').all(label_ok)
}

fn ensure_dir(dir: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| Error::Io { path: dir.to_path_buf(), source })
}

pub(super) fn base_params(common_name: &str, lifetime: Duration) -> Result<CertificateParams, Error> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, common_name);
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + lifetime;
    let mut serial = [0u8; 16];
    aws_lc_rs::rand::fill(&mut serial)
        .map_err(|_| Error::Invalid("no randomness for a serial number".into()))?;
    serial[0] &= 0x7f; // a positive INTEGER
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    Ok(params)
}

fn ca_params(lifetime: Duration) -> Result<CertificateParams, Error> {
    let mut params = base_params("kiam-ca", lifetime)?;
    // Signs leaves only: no intermediate CAs below it.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

fn leaf_params(leaf: &Leaf, lifetime: Duration) -> Result<CertificateParams, Error> {
    let (name, ekus) = match leaf {
        Leaf::Server(_) => {
            ("kiam-server", vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth])
        }
        Leaf::Agent | Leaf::Node(_) => ("kiam-agent", vec![ExtendedKeyUsagePurpose::ClientAuth]),
    };
    let mut params = base_params(name, lifetime)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = ekus;
    params.use_authority_key_identifier_extension = true;
    match leaf {
        Leaf::Server(sans) => {
            for san in sans {
                params.subject_alt_names.push(san_of(san)?);
            }
        }
        Leaf::Agent => {}
        Leaf::Node(node) => {
            let uri = format!("{NODE_URI_PREFIX}{node}");
            let uri = uri.try_into().map_err(|_| Error::Invalid(format!("node {node:?}: not ASCII")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
    }
    Ok(params)
}

fn san_of(san: &str) -> Result<SanType, Error> {
    if let Ok(ip) = san.parse::<std::net::IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !san.is_empty()
        && san.len() <= 253
        && san.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'*')
        });
    if !valid {
        return Err(Error::Invalid(format!("--san {san:?} is neither an IP address nor a DNS name")));
    }
    let name = san.to_string().try_into().map_err(|_| Error::Invalid(format!("--san {san:?}: not ASCII")))?;
    Ok(SanType::DnsName(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_are_dns_subdomains() {
        for ok in ["ip-10-0-1-2.eu-west-1.compute.internal", "node-a", "n1"] {
            assert!(is_node_name(ok), "{ok}");
        }
        for bad in ["", "../etc", "Node", "a/b", "-a", "a..b", "a_b", &"x".repeat(64)] {
            assert!(!is_node_name(bad), "{bad}");
        }
    }

    #[test]
    fn sans_are_ips_or_dns_names() {
        assert!(matches!(san_of("127.0.0.1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san_of("::1"), Ok(SanType::IpAddress(_))));
        assert!(matches!(san_of("kiam-server.kube-system.svc"), Ok(SanType::DnsName(_))));
        for bad in ["", "a b", "a..b", "urn:x"] {
            assert!(san_of(bad).is_err(), "{bad}");
        }
    }
}
