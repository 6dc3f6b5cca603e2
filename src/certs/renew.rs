//! `kiam certs renew`: new leaves for old, signed by the CA that signed them.
//!
//! Each leaf keeps what its holder is known by: the subject, every SAN (DNS names, IP addresses,
//! and the `urn:kiam:node:<name>` URI SAN of a per-node agent certificate), its key usages and
//! extended key usages. It gets a new ECDSA P-256 key, a new serial and a new validity. A leaf
//! the CA did not sign is refused (a renewal must not move trust), as is a CA among the leaves,
//! and nothing is written unless every leaf can be renewed. The key of `<stem>.pem` is
//! `<stem>-key.pem` (`kiam certs generate`'s layout); of a file named `cert` or `tls.crt`, `key`
//! or `tls.key` beside it (a Kubernetes secret's layout).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, DnValue, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SanType,
};
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use super::generate::{CERT_MODE, KEY_MODE, base_params};
use super::{Error, inspect, pem_certificates, read, write};

/// What to renew.
#[derive(Clone, Debug)]
pub struct RenewPlan {
    /// The CA certificate (PEM) that signed the leaves.
    pub ca_cert: PathBuf,
    /// Its private key (PEM).
    pub ca_key: PathBuf,
    /// The leaf certificates to replace, each with its key beside it ([`key_path`]).
    pub leaves: Vec<PathBuf>,
    /// How long the new leaves are valid (never past the CA's end).
    pub lifetime: Duration,
}

/// One renewed leaf.
#[derive(Clone, Debug)]
pub struct Renewed {
    /// The certificate file, rewritten.
    pub cert: PathBuf,
    /// Its key file, rewritten.
    pub key: PathBuf,
    /// The old certificate's end.
    pub old_not_after: SystemTime,
    /// The new certificate's end.
    pub not_after: SystemTime,
    /// Whether the CA's end cut the requested lifetime short.
    pub capped: bool,
}

/// The key file of the certificate at `cert`.
pub fn key_path(cert: &Path) -> PathBuf {
    let name = cert.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    match name.as_str() {
        "cert" => cert.with_file_name("key"),
        "tls.crt" => cert.with_file_name("tls.key"),
        _ => {
            let stem = name.strip_suffix(".pem").unwrap_or(&name);
            cert.with_file_name(format!("{stem}-key.pem"))
        }
    }
}

/// The leaves of a `kiam certs generate` directory: every `*.pem` but `ca.pem` and the keys.
pub fn leaves_in(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let io = |source| Error::Io { path: dir.to_path_buf(), source };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let path = entry.map_err(io)?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name.ends_with(".pem") && !name.ends_with("-key.pem") && name != "ca.pem" && !name.starts_with('.')
        {
            out.push(path);
        }
    }
    out.sort();
    Ok(out)
}

/// Renews every leaf of the plan, or none.
pub fn renew(plan: &RenewPlan, now: SystemTime) -> Result<Vec<Renewed>, Error> {
    if plan.leaves.is_empty() {
        return Err(Error::Invalid("no certificate to renew".into()));
    }
    if plan.lifetime.is_zero() {
        return Err(Error::Invalid("--validity must be longer than zero".into()));
    }
    let ca_pem = read(&plan.ca_cert)?;
    let ca_der = pem_certificates(&plan.ca_cert, &ca_pem)?
        .into_iter()
        .next()
        .ok_or_else(|| parse_error(&plan.ca_cert, "no PEM certificate"))?;
    let (_, ca) =
        X509Certificate::from_der(&ca_der).map_err(|e| parse_error(&plan.ca_cert, &e.to_string()))?;
    if !ca.is_ca() {
        return Err(parse_error(&plan.ca_cert, "not a CA certificate"));
    }
    let ca_end = epoch(ca.validity().not_after.timestamp());
    if ca_end <= now {
        return Err(Error::Invalid(format!(
            "the CA in {} has expired: make a new CA (kiam certs generate --force) instead",
            plan.ca_cert.display()
        )));
    }
    let ca_key = KeyPair::from_pem(&read(&plan.ca_key)?)?;
    if ca_key.subject_public_key_info() != ca.public_key().raw {
        return Err(Error::Invalid(format!(
            "{} is not the key of the CA in {}",
            plan.ca_key.display(),
            plan.ca_cert.display()
        )));
    }
    let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)?;
    let wanted_end = now + plan.lifetime;
    let (not_after, capped) = if wanted_end > ca_end { (ca_end, true) } else { (wanted_end, false) };

    // Read and check everything first: a renewal stops before writing anything.
    let mut prepared = Vec::new();
    for cert_path in &plan.leaves {
        let key = key_path(cert_path);
        if !key.exists() {
            return Err(Error::Invalid(format!(
                "{}: no key beside it at {}",
                cert_path.display(),
                key.display()
            )));
        }
        let der = pem_certificates(cert_path, &read(cert_path)?)?
            .into_iter()
            .next()
            .ok_or_else(|| parse_error(cert_path, "no PEM certificate"))?;
        let (params, old_not_after) = leaf_params(cert_path, &der, &ca_der, now, not_after)?;
        prepared.push((cert_path.clone(), key, params, old_not_after));
    }
    let mut out = Vec::new();
    for (cert, key, params, old_not_after) in prepared {
        let new_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let signed = params.signed_by(&new_key, &issuer)?;
        if !inspect::verify(signed.der(), &[], std::slice::from_ref(&ca_der), now).ok() {
            return Err(parse_error(&cert, "the renewed certificate does not verify against the CA"));
        }
        write(&key, &new_key.serialize_pem(), KEY_MODE)?;
        write(&cert, &signed.pem(), CERT_MODE)?;
        out.push(Renewed { cert, key, old_not_after, not_after, capped });
    }
    Ok(out)
}

fn parse_error(path: &Path, reason: &str) -> Error {
    Error::Parse { path: path.to_path_buf(), reason: reason.to_string() }
}

fn epoch(seconds: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(u64::try_from(seconds).unwrap_or(0))
}

/// The new leaf's parameters: the old one's names and usages, a new serial and validity. The
/// old leaf must be signed by the CA (checked at a moment inside its validity, so an expired
/// leaf can be renewed).
fn leaf_params(
    path: &Path,
    der: &CertificateDer<'static>,
    ca_der: &CertificateDer<'static>,
    now: SystemTime,
    not_after: SystemTime,
) -> Result<(CertificateParams, SystemTime), Error> {
    let (_, old) = X509Certificate::from_der(der).map_err(|e| parse_error(path, &e.to_string()))?;
    if old.is_ca() {
        return Err(parse_error(path, "a CA certificate: renew leaves only"));
    }
    let (start, end) =
        (epoch(old.validity().not_before.timestamp()), epoch(old.validity().not_after.timestamp()));
    let at = now.clamp(start, end.checked_sub(Duration::from_secs(1)).unwrap_or(start));
    let verdict = inspect::verify(der, &[], std::slice::from_ref(ca_der), at);
    if !verdict.ok() {
        let reason = verdict.as_client.err().or(verdict.as_server.err()).unwrap_or_default();
        return Err(parse_error(
            path,
            &format!("not issued by this CA ({reason}): renewal keeps trust where it was"),
        ));
    }
    let lifetime = not_after.duration_since(now).unwrap_or_default();
    let mut params = base_params("", lifetime)?;
    params.not_after = OffsetDateTime::from(not_after);
    params.distinguished_name = subject(path, &old)?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.use_authority_key_identifier_extension = true;
    if let Ok(Some(ku)) = old.key_usage() {
        let ku = ku.value;
        for (on, purpose) in [
            (ku.digital_signature(), KeyUsagePurpose::DigitalSignature),
            (ku.non_repudiation(), KeyUsagePurpose::ContentCommitment),
            (ku.key_encipherment(), KeyUsagePurpose::KeyEncipherment),
            (ku.data_encipherment(), KeyUsagePurpose::DataEncipherment),
            (ku.key_agreement(), KeyUsagePurpose::KeyAgreement),
        ] {
            if on {
                params.key_usages.push(purpose);
            }
        }
    }
    if let Ok(Some(eku)) = old.extended_key_usage() {
        let eku = eku.value;
        for (on, purpose) in [
            (eku.any, ExtendedKeyUsagePurpose::Any),
            (eku.server_auth, ExtendedKeyUsagePurpose::ServerAuth),
            (eku.client_auth, ExtendedKeyUsagePurpose::ClientAuth),
            (eku.code_signing, ExtendedKeyUsagePurpose::CodeSigning),
            (eku.email_protection, ExtendedKeyUsagePurpose::EmailProtection),
            (eku.time_stamping, ExtendedKeyUsagePurpose::TimeStamping),
            (eku.ocsp_signing, ExtendedKeyUsagePurpose::OcspSigning),
        ] {
            if on {
                params.extended_key_usages.push(purpose);
            }
        }
        for oid in &eku.other {
            let arcs = oid.iter().map(Iterator::collect).unwrap_or_default();
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::Other(arcs));
        }
    }
    if let Ok(Some(ext)) = old.subject_alternative_name() {
        for name in &ext.value.general_names {
            params.subject_alt_names.push(san(path, name)?);
        }
    }
    Ok((params, end))
}

fn san(path: &Path, name: &GeneralName<'_>) -> Result<SanType, Error> {
    let ascii =
        |s: &str| s.to_string().try_into().map_err(|_| parse_error(path, &format!("SAN {s:?} is not ASCII")));
    Ok(match name {
        GeneralName::DNSName(d) => SanType::DnsName(ascii(d)?),
        GeneralName::URI(u) => SanType::URI(ascii(u)?),
        GeneralName::RFC822Name(m) => SanType::Rfc822Name(ascii(m)?),
        GeneralName::IPAddress(bytes) => match (<[u8; 4]>::try_from(*bytes), <[u8; 16]>::try_from(*bytes)) {
            (Ok(v4), _) => SanType::IpAddress(v4.into()),
            (_, Ok(v6)) => SanType::IpAddress(v6.into()),
            _ => return Err(parse_error(path, "an IP address SAN of neither 4 nor 16 bytes")),
        },
        other => {
            return Err(parse_error(
                path,
                &format!("a SAN renew cannot copy ({other}): use kiam certs generate"),
            ));
        }
    })
}

/// The subject, attribute by attribute, in order.
fn subject(path: &Path, cert: &X509Certificate<'_>) -> Result<DistinguishedName, Error> {
    use x509_parser::oid_registry as oids;
    let mut dn = DistinguishedName::new();
    for attr in cert.subject().iter_attributes() {
        let oid = attr.attr_type();
        let value =
            attr.as_str().map_err(|_| parse_error(path, "a subject attribute that is not a string"))?;
        let kind = match oid {
            o if *o == oids::OID_X509_COMMON_NAME => DnType::CommonName,
            o if *o == oids::OID_X509_ORGANIZATION_NAME => DnType::OrganizationName,
            o if *o == oids::OID_X509_ORGANIZATIONAL_UNIT => DnType::OrganizationalUnitName,
            o if *o == oids::OID_X509_COUNTRY_NAME => DnType::CountryName,
            o if *o == oids::OID_X509_STATE_OR_PROVINCE_NAME => DnType::StateOrProvinceName,
            o if *o == oids::OID_X509_LOCALITY_NAME => DnType::LocalityName,
            other => DnType::CustomDnType(other.iter().map(Iterator::collect).unwrap_or_default()),
        };
        dn.push(kind, DnValue::Utf8String(value.to_string()));
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sit_beside_their_certificates() {
        assert_eq!(key_path(Path::new("pki/agent-n1.pem")), Path::new("pki/agent-n1-key.pem"));
        assert_eq!(key_path(Path::new("/etc/kiam/tls/cert")), Path::new("/etc/kiam/tls/key"));
        assert_eq!(key_path(Path::new("s/tls.crt")), Path::new("s/tls.key"));
        assert_eq!(key_path(Path::new("server")), Path::new("server-key.pem"));
    }
}
