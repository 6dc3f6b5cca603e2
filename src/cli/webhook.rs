//! `kiam webhook` flags.

use std::path::PathBuf;

use clap::Args;

use super::LogArgs;
use crate::webhook::Injection;

/// Flags of `kiam webhook`.
#[derive(Clone, Debug, Args)]
pub struct WebhookArgs {
    #[command(flatten)]
    pub log: LogArgs,
    /// Where to serve HTTPS (the Service's target port).
    #[arg(long, env = "KIAM_WEBHOOK_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// The serving certificate (PEM), for the name the API server calls.
    #[arg(long, env = "KIAM_WEBHOOK_CERT")]
    pub cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "KIAM_WEBHOOK_KEY")]
    pub key: PathBuf,
    /// The URI injected as AWS_CONTAINER_CREDENTIALS_FULL_URI.
    #[arg(long, env = "KIAM_WEBHOOK_FULL_URI", default_value = "http://169.254.170.23/v1/credentials")]
    pub full_uri: String,
    /// The audience of the injected token (the server's --pod-token-audience).
    #[arg(long, env = "KIAM_WEBHOOK_TOKEN_AUDIENCE", default_value = crate::server::DEFAULT_POD_TOKEN_AUDIENCE)]
    pub token_audience: String,
    /// The injected token's lifetime in seconds (at least 600, as the API server requires).
    #[arg(long, env = "KIAM_WEBHOOK_TOKEN_EXPIRATION", default_value_t = 86_400)]
    pub token_expiration: i64,
}

impl WebhookArgs {
    /// What the webhook injects.
    pub fn injection(&self) -> Result<Injection, String> {
        if self.token_expiration < 600 {
            return Err("--token-expiration must be at least 600 seconds".into());
        }
        if !self.full_uri.starts_with("http://") && !self.full_uri.starts_with("https://") {
            return Err(format!("--full-uri {:?} must be an http(s) URL", self.full_uri));
        }
        Ok(Injection {
            full_uri: self.full_uri.clone(),
            audience: self.token_audience.clone(),
            expiration_seconds: self.token_expiration,
        })
    }
}
