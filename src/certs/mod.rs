//! `kiam certs`: the mutual-TLS material kiam-rs needs, made and checked in one command.
//!
//! [`generate`] writes a CA, a server certificate, an agent certificate and, for node binding,
//! one agent certificate per node carrying the `urn:kiam:node:<name>` URI SAN the server reads
//! ([`crate::tls::x509::NODE_URI_PREFIX`]). Keys are ECDSA P-256, written with mode 0600, and an
//! existing key is never replaced without `force`. [`inspect`] reads certificates back: subject,
//! SANs, node binding, validity, usages, and whether a CA bundle verifies each leaf for the
//! role it plays (rustls-webpki, the verifier rustls itself uses). [`renew`] signs new leaves
//! for old with the same CA, keeping their subjects, SANs and usages.

mod generate;
mod inspect;
mod renew;

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use generate::{Outcome, Plan, generate};
pub use inspect::{CertInfo, FileReport, Verification, inspect};
pub use renew::{RenewPlan, Renewed, key_path, leaves_in, renew};

/// Why certificates could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing would replace existing keys; `--force` allows it.
    #[error("{} already exist; pass --force to replace them", list(.0))]
    Exists(Vec<PathBuf>),
    /// The request itself is wrong (a bad node name, SAN or lifetime).
    #[error("{0}")]
    Invalid(String),
    /// rcgen refused to build or sign a certificate.
    #[error("certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file holds no certificate, or one that does not parse.
    #[error("{path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Reads a whole file as text.
fn read(path: &Path) -> Result<String, Error> {
    fs::read_to_string(path).map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// Writes `contents` to `path` with `mode`, replacing the file only when it may. The file is
/// written beside its final name and renamed, so a reader never sees half a key, and a key file
/// never exists with a wider mode, not even for a moment.
fn write(path: &Path, contents: &str, mode: u32) -> Result<(), Error> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp).map_err(io)?;
    file.write_all(contents.as_bytes()).and_then(|()| file.sync_all()).map_err(io)?;
    fs::rename(&tmp, path).map_err(io)
}

/// Splits PEM text into its DER certificates (other blocks, such as keys, are skipped).
fn pem_certificates(path: &Path, text: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    CertificateDer::pem_slice_iter(text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Parse { path: path.to_path_buf(), reason: format!("bad PEM: {e}") })
}
