//! `kiam certs inspect`: what a certificate file holds, in the terms kiam-rs cares about.
//!
//! For each certificate: subject, issuer, validity (and whether it holds now), the key, key
//! usages, SANs and the node it is bound to. With a CA bundle, the first certificate of each
//! file that is not a CA is verified against the bundle (the rest of the file is its chain),
//! once as a server and once as a client, with rustls-webpki, the verifier rustls runs.

use std::fmt;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::{Error, pem_certificates, read};
use crate::tls::x509::NODE_URI_PREFIX;

/// One certificate, read.
#[derive(Clone, Debug)]
pub struct CertInfo {
    /// The subject, as `CN=...`.
    pub subject: String,
    /// The issuer.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// Start of validity.
    pub not_before: SystemTime,
    /// End of validity.
    pub not_after: SystemTime,
    /// Whether it is a CA (basicConstraints CA:TRUE).
    pub is_ca: bool,
    /// The public key algorithm, e.g. `EC P-256`.
    pub key: String,
    /// Key usages, e.g. `Digital Signature`.
    pub key_usage: Vec<String>,
    /// Extended key usages: `serverAuth`, `clientAuth`, ...
    pub ext_key_usage: Vec<String>,
    /// SANs, as `DNS:name`, `IP:addr`, `URI:uri`.
    pub sans: Vec<String>,
    /// The node named by a `urn:kiam:node:` URI SAN.
    pub node: Option<String>,
    /// The verdict of the CA bundle, when one was given and this is a leaf.
    pub verification: Option<Verification>,
}

/// Whether a bundle verifies a leaf, for each role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verification {
    /// Verified as a TLS server (serverAuth).
    pub as_server: Result<(), String>,
    /// Verified as a TLS client (clientAuth).
    pub as_client: Result<(), String>,
}

impl Verification {
    /// True when the bundle verifies the leaf for at least one role.
    pub fn ok(&self) -> bool {
        self.as_server.is_ok() || self.as_client.is_ok()
    }
}

/// Every certificate of one file.
#[derive(Clone, Debug)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// Its certificates, in order.
    pub certs: Vec<CertInfo>,
    /// The moment validity was judged at.
    pub now: SystemTime,
}

impl FileReport {
    /// True when every certificate is valid now and every verification passed.
    pub fn ok(&self) -> bool {
        self.certs.iter().all(|c| {
            c.not_before <= self.now
                && self.now < c.not_after
                && c.verification.as_ref().is_none_or(|v| v.ok())
        })
    }
}

/// Reads `files`, and verifies their leaves against the CAs in `bundle` if given.
pub fn inspect(files: &[PathBuf], bundle: Option<&Path>, now: SystemTime) -> Result<Vec<FileReport>, Error> {
    let anchors = match bundle {
        Some(path) => Some(pem_certificates(path, &read(path)?)?),
        None => None,
    };
    if anchors.as_ref().is_some_and(Vec::is_empty) {
        let path = bundle.map(Path::to_path_buf).unwrap_or_default();
        return Err(Error::Parse { path, reason: "no certificate in the CA bundle".into() });
    }
    let mut reports = Vec::new();
    for path in files {
        let ders = pem_certificates(path, &read(path)?)?;
        if ders.is_empty() {
            return Err(Error::Parse { path: path.clone(), reason: "no PEM certificate".into() });
        }
        let mut certs = Vec::new();
        for der in &ders {
            let info = describe(der).map_err(|reason| Error::Parse { path: path.clone(), reason })?;
            certs.push(info);
        }
        if let (Some(anchors), Some(index)) = (&anchors, certs.iter().position(|c| !c.is_ca)) {
            certs[index].verification = Some(verify(&ders[index], &ders[index + 1..], anchors, now));
        }
        reports.push(FileReport { path: path.clone(), certs, now });
    }
    Ok(reports)
}

fn describe(der: &[u8]) -> Result<CertInfo, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let time = |t: i64| UNIX_EPOCH + Duration::from_secs(u64::try_from(t).unwrap_or(0));
    let mut sans = Vec::new();
    let mut node = None;
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            sans.push(match name {
                GeneralName::DNSName(d) => format!("DNS:{d}"),
                GeneralName::URI(u) => {
                    if let Some(n) = u.strip_prefix(NODE_URI_PREFIX) {
                        node = Some(n.to_string());
                    }
                    format!("URI:{u}")
                }
                GeneralName::IPAddress(b) => match <[u8; 4]>::try_from(*b) {
                    Ok(v4) => format!("IP:{}", IpAddr::from(v4)),
                    Err(_) => <[u8; 16]>::try_from(*b)
                        .map(|v6| format!("IP:{}", IpAddr::from(v6)))
                        .unwrap_or_else(|_| "IP:?".into()),
                },
                other => other.to_string(),
            });
        }
    }
    let mut ext_key_usage = Vec::new();
    if let Ok(Some(eku)) = cert.extended_key_usage() {
        let eku = eku.value;
        for (on, name) in [(eku.server_auth, "serverAuth"), (eku.client_auth, "clientAuth"), (eku.any, "any")]
        {
            if on {
                ext_key_usage.push(name.to_string());
            }
        }
        ext_key_usage.extend(eku.other.iter().map(|oid| oid.to_id_string()));
    }
    let key_usage = match cert.key_usage() {
        Ok(Some(ku)) => ku.value.to_string().split(", ").map(str::to_string).collect(),
        _ => Vec::new(),
    };
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        serial: cert.raw_serial_as_string(),
        not_before: time(cert.validity().not_before.timestamp()),
        not_after: time(cert.validity().not_after.timestamp()),
        is_ca: cert.is_ca(),
        key: key_name(&cert),
        key_usage,
        ext_key_usage,
        sans,
        node,
        verification: None,
    })
}

fn key_name(cert: &X509Certificate<'_>) -> String {
    use x509_parser::public_key::PublicKey;
    match cert.public_key().parsed() {
        Ok(PublicKey::EC(point)) => format!("EC ({} bits)", point.key_size()),
        Ok(PublicKey::RSA(rsa)) => format!("RSA ({} bits)", rsa.key_size()),
        Ok(_) => cert.public_key().algorithm.algorithm.to_id_string(),
        Err(_) => "unknown".into(),
    }
}

pub(super) fn verify(
    leaf: &CertificateDer<'_>,
    chain: &[CertificateDer<'static>],
    bundle: &[CertificateDer<'static>],
    now: SystemTime,
) -> Verification {
    let failed =
        |e: &dyn fmt::Display| Verification { as_server: Err(e.to_string()), as_client: Err(e.to_string()) };
    let anchors: Result<Vec<_>, _> = bundle.iter().map(webpki::anchor_from_trusted_cert).collect();
    let anchors = match anchors {
        Ok(a) => a,
        Err(e) => return failed(&format!("bad CA in the bundle: {e}")),
    };
    let cert = match EndEntityCert::try_from(leaf) {
        Ok(c) => c,
        Err(e) => return failed(&e),
    };
    let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.all;
    let at = UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default());
    let check = |usage, name: &str| {
        cert.verify_for_usage(algs, &anchors, chain, at, usage, None, None).map(|_| ()).map_err(|e| match e {
            webpki::Error::RequiredEkuNotFoundContext(_) => format!("its extended key usage lacks {name}"),
            webpki::Error::UnknownIssuer => "not signed by a CA in the bundle".into(),
            other => format!("{other:?}"),
        })
    };
    Verification {
        as_server: check(KeyUsage::server_auth(), "serverAuth"),
        as_client: check(KeyUsage::client_auth(), "clientAuth"),
    }
}

impl fmt::Display for FileReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{}:", self.path.display())?;
        for (i, c) in self.certs.iter().enumerate() {
            let role = if c.is_ca { "CA" } else { "leaf" };
            writeln!(f, "  certificate {} ({role})", i + 1)?;
            writeln!(f, "    subject:      {}", c.subject)?;
            writeln!(f, "    issuer:       {}", c.issuer)?;
            writeln!(f, "    serial:       {}", c.serial)?;
            let fmt_time = crate::creds::time::format;
            let state = if self.now < c.not_before {
                "NOT YET VALID".to_string()
            } else if self.now >= c.not_after {
                "EXPIRED".to_string()
            } else {
                let left = c.not_after.duration_since(self.now).unwrap_or_default().as_secs();
                format!("{} days left", left / 86_400)
            };
            writeln!(
                f,
                "    valid:        {} to {} ({state})",
                fmt_time(c.not_before),
                fmt_time(c.not_after)
            )?;
            writeln!(f, "    key:          {}", c.key)?;
            writeln!(f, "    key usage:    {}", join(&c.key_usage))?;
            writeln!(f, "    ext. usage:   {}", join(&c.ext_key_usage))?;
            writeln!(f, "    SANs:         {}", join(&c.sans))?;
            let node =
                c.node.as_deref().map_or("none (the agent may ask about any node's pods)".into(), |n| {
                    format!("{n} (with --agent-node-binding: only pods on {n})")
                });
            if !c.is_ca {
                writeln!(f, "    node binding: {node}")?;
            }
            if let Some(v) = &c.verification {
                let say = |r: &Result<(), String>| match r {
                    Ok(()) => "verified".to_string(),
                    Err(e) => format!("NOT verified ({e})"),
                };
                writeln!(f, "    as server:    {}", say(&v.as_server))?;
                writeln!(f, "    as client:    {}", say(&v.as_client))?;
            }
        }
        Ok(())
    }
}

fn join(items: &[String]) -> String {
    if items.is_empty() { "-".into() } else { items.join(", ") }
}
