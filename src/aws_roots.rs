//! The roots of trust for HTTPS to AWS (STS, and the default credential chain's web-identity
//! and SSO calls), chosen once at start and logged with where they came from and how many.
//!
//! As OpenSSL and the SDK's own client look for them: `SSL_CERT_FILE` and `SSL_CERT_DIR` when
//! either is set, else the platform's usual places (the first bundle file found, such as
//! `/etc/ssl/certs/ca-certificates.crt`, or `/etc/ssl/cert.pem`, where the image keeps a copy,
//! and the certificate directories). kiam's Helm chart mounts the node's `/usr/share/ca-certificates`
//! over `/etc/ssl/certs`; on Debian and Ubuntu nodes that holds only `mozilla/*.crt` subfolders,
//! which nothing reads, so the image's copy outside that directory is what remains. When the
//! platform's places hold no usable root at all, Mozilla's roots built into the binary are used
//! instead, so STS still verifies, but only then, and never when the operator named a store with
//! `SSL_CERT_*`: an explicit store that is empty stays empty (and fails closed, loudly).

use std::path::PathBuf;

use aws_sdk_sts::config::SharedHttpClient;
use aws_smithy_http_client::proxy::ProxyConfig;
use aws_smithy_http_client::tls::{self, TlsContext, TrustStore, rustls_provider::CryptoMode};
use aws_smithy_http_client::{Builder, ConnectorBuilder};
use rustls_pki_types::CertificateDer;

/// The roots found, and where.
pub struct Roots {
    /// Where they came from, for the log: paths and variables, or the bundled set.
    pub source: String,
    /// Whether they are the bundled Mozilla roots (the platform had none).
    pub bundled: bool,
    /// The certificates, each usable as a trust anchor.
    pub certs: Vec<CertificateDer<'static>>,
}

fn usable(certs: impl IntoIterator<Item = CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    certs.into_iter().filter(|c| webpki::anchor_from_trusted_cert(c).is_ok()).collect()
}

fn var(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// Where the platform search looks, as `rustls-native-certs` does.
fn platform_source() -> (String, bool) {
    let (file, dir) = (var("SSL_CERT_FILE"), var("SSL_CERT_DIR"));
    if file.is_some() || dir.is_some() {
        let show = |p: Option<PathBuf>| p.map_or_else(|| "(unset)".to_string(), |p| p.display().to_string());
        return (format!("SSL_CERT_FILE={} SSL_CERT_DIR={}", show(file), show(dir)), true);
    }
    let probe = openssl_probe::probe();
    let mut places: Vec<String> = probe.cert_file.iter().map(|f| f.display().to_string()).collect();
    places.extend(probe.cert_dir.iter().map(|d| format!("{}/", d.display())));
    if places.is_empty() {
        places.push("no bundle file or certificate directory".into());
    }
    (places.join(", "), false)
}

/// Finds the roots: the platform's, else (unless `SSL_CERT_*` named a store) Mozilla's.
pub fn load() -> Roots {
    let (source, explicit) = platform_source();
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::debug!(%error, "a place for root certificates could not be read");
    }
    let certs = usable(found.certs);
    if !certs.is_empty() || explicit {
        return Roots { source, bundled: false, certs };
    }
    let bundled = usable(webpki_root_certs::TLS_SERVER_ROOT_CERTS.iter().cloned());
    Roots {
        source: format!("bundled Mozilla roots (none usable in {source})"),
        bundled: true,
        certs: bundled,
    }
}

/// The SDK's default HTTPS client (rustls with aws-lc, proxies from the environment), trusting
/// exactly `roots`.
pub fn https_client(roots: &Roots) -> SharedHttpClient {
    let mut store = TrustStore::empty().with_native_roots(false);
    for cert in &roots.certs {
        store.add_pem_certificate(pem::encode(&pem::Pem::new("CERTIFICATE", cert.to_vec())).into_bytes());
    }
    let context = TlsContext::builder().with_trust_store(store).build().unwrap_or_default();
    Builder::new().build_with_connector_fn(move |settings, components| {
        let mut connector = ConnectorBuilder::default()
            .tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc))
            .tls_context(context.clone());
        connector.set_connector_settings(settings.cloned());
        if let Some(components) = components {
            connector.set_sleep_impl(components.sleep_impl());
        }
        connector.set_proxy_config(Some(ProxyConfig::from_env()));
        connector.build()
    })
}

/// [`load`], logged (where from, how many), and the client trusting them.
pub fn logged_https_client() -> SharedHttpClient {
    let roots = load();
    let count = roots.certs.len();
    if roots.certs.is_empty() {
        tracing::error!(source = %roots.source, count, "roots of trust for HTTPS to AWS: none, STS calls will fail");
    } else if roots.bundled {
        tracing::warn!(source = %roots.source, count, "roots of trust for HTTPS to AWS");
    } else {
        tracing::info!(source = %roots.source, count, "roots of trust for HTTPS to AWS");
    }
    https_client(&roots)
}
