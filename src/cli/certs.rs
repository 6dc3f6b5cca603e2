//! `kiam certs` flags: `generate` writes the mutual-TLS material, `inspect` reads it back,
//! `renew` signs new leaves for old with the same CA.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};

use super::{LogArgs, go_duration};
use crate::certs::{self, Plan};

/// Flags of `kiam certs`.
#[derive(Clone, Debug, Args)]
pub struct CertsArgs {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `kiam certs` subcommands.
#[derive(Clone, Debug, Subcommand)]
pub enum CertsCommand {
    /// Write a CA, a server certificate and agent certificates (ECDSA P-256) to a directory. An
    /// existing CA there is reused and existing certificates are kept, so nodes can be added
    /// later; --force replaces them.
    Generate(GenerateArgs),
    /// Show what certificate files hold: subject, SANs, node binding, validity, usages, and with
    /// --ca whether that bundle verifies each leaf. Exit 1 when one is expired or unverified.
    Inspect(InspectArgs),
    /// Sign new leaf certificates (new keys) for existing ones with the CA that signed them,
    /// keeping their subjects, SANs (per-node URI SANs included) and usages; see docs/tls.md.
    /// Nothing is written unless every leaf can be renewed.
    Renew(RenewArgs),
}

/// Flags of `kiam certs generate`.
#[derive(Clone, Debug, Args)]
pub struct GenerateArgs {
    /// The directory to write to (created, mode 0700, if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write agent-<NODE>.pem bound to this node (URI SAN urn:kiam:node:<NODE>), for
    /// `kiam server --agent-node-binding`. Repeatable, or comma-separated.
    #[arg(long = "node", value_name = "NODE", value_delimiter = ',')]
    pub nodes: Vec<String>,
    /// The server certificate's SANs (DNS names or IPs), replacing the defaults derived from
    /// --service and --namespace plus localhost and 127.0.0.1. Repeatable, or comma-separated.
    #[arg(long = "san", value_name = "NAME_OR_IP", value_delimiter = ',')]
    pub sans: Vec<String>,
    /// The server's Service name, for the default SANs.
    #[arg(long, default_value = "kiam-server")]
    pub service: String,
    /// The server's namespace, for the default SANs.
    #[arg(long, default_value = "kube-system")]
    pub namespace: String,
    /// How long the CA is valid.
    #[arg(long, default_value = "87600h", value_parser = go_duration)]
    pub ca_validity: Duration,
    /// How long server and agent certificates are valid (rotate them before; see docs/tls.md).
    #[arg(long, default_value = "8760h", value_parser = go_duration)]
    pub validity: Duration,
    /// Replace existing files, the CA included.
    #[arg(long)]
    pub force: bool,
}

/// Flags of `kiam certs inspect`.
#[derive(Clone, Debug, Args)]
pub struct InspectArgs {
    /// PEM files; a file may hold a chain (leaf first).
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
    /// A CA bundle: verify each file's leaf against it, as a server and as a client.
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

/// Flags of `kiam certs renew`.
#[derive(Clone, Debug, Args)]
#[command(group(clap::ArgGroup::new("what").required(true).multiple(true).args(["dir", "files"])))]
pub struct RenewArgs {
    /// A `kiam certs generate` directory: its CA (ca.pem, ca-key.pem) renews every other
    /// <name>.pem there (server, agent, agent-<node>), each key in <name>-key.pem.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leaf certificates to renew; the key of <name>.pem is <name>-key.pem, of cert (or tls.crt)
    /// the key (or tls.key) beside it.
    #[arg(value_name = "CERT")]
    pub files: Vec<PathBuf>,
    /// The CA certificate that signed them (default: ca.pem in --dir).
    #[arg(long)]
    pub ca: Option<PathBuf>,
    /// The CA's private key (default: ca-key.pem in --dir).
    #[arg(long)]
    pub ca_key: Option<PathBuf>,
    /// How long the new certificates are valid (no longer than the CA).
    #[arg(long, default_value = "8760h", value_parser = go_duration)]
    pub validity: Duration,
}

impl CertsArgs {
    /// Runs the subcommand: output on stdout, errors on stderr; exit 0, 1 (inspect found a
    /// problem) or 2 (nothing could be done).
    pub fn run(&self) -> ExitCode {
        let result = match &self.command {
            CertsCommand::Generate(args) => args.run(),
            CertsCommand::Inspect(args) => args.run(),
            CertsCommand::Renew(args) => args.run(),
        };
        match result {
            Ok(code) => code,
            Err(error) => {
                eprintln!("kiam certs: {error}");
                ExitCode::from(2)
            }
        }
    }
}

impl GenerateArgs {
    /// The plan these flags describe.
    pub fn plan(&self) -> Plan {
        let server_sans = if self.sans.is_empty() {
            Plan::default_server_sans(&self.service, &self.namespace)
        } else {
            self.sans.clone()
        };
        Plan {
            out: self.out.clone(),
            server_sans,
            nodes: self.nodes.clone(),
            ca_lifetime: self.ca_validity,
            leaf_lifetime: self.validity,
            force: self.force,
        }
    }

    fn run(&self) -> Result<ExitCode, certs::Error> {
        let outcome = certs::generate(&self.plan())?;
        if outcome.reused_ca {
            println!("using the existing CA in {}", self.out.display());
        }
        for path in &outcome.written {
            println!("wrote {}", path.display());
        }
        for path in &outcome.kept {
            println!("kept  {} (exists; --force replaces it)", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl InspectArgs {
    fn run(&self) -> Result<ExitCode, certs::Error> {
        let reports = certs::inspect(&self.files, self.ca.as_deref(), SystemTime::now())?;
        for report in &reports {
            print!("{report}");
        }
        Ok(if reports.iter().all(|r| r.ok()) { ExitCode::SUCCESS } else { ExitCode::FAILURE })
    }
}

impl RenewArgs {
    /// The plan these flags describe.
    pub fn plan(&self) -> Result<certs::RenewPlan, certs::Error> {
        let in_dir = |name: &str| self.dir.as_ref().map(|d| d.join(name));
        let missing = |flag: &str| certs::Error::Invalid(format!("{flag} is required without --dir"));
        let ca_cert = self.ca.clone().or_else(|| in_dir("ca.pem")).ok_or_else(|| missing("--ca"))?;
        let ca_key =
            self.ca_key.clone().or_else(|| in_dir("ca-key.pem")).ok_or_else(|| missing("--ca-key"))?;
        let mut leaves = self.files.clone();
        if let Some(dir) = &self.dir {
            leaves.extend(certs::leaves_in(dir)?);
        }
        leaves.sort();
        leaves.dedup();
        Ok(certs::RenewPlan { ca_cert, ca_key, leaves, lifetime: self.validity })
    }

    fn run(&self) -> Result<ExitCode, certs::Error> {
        let fmt = crate::creds::time::format;
        for renewed in certs::renew(&self.plan()?, SystemTime::now())? {
            let cap = if renewed.capped { " (cut to the CA's end: renew the CA soon)" } else { "" };
            println!(
                "renewed {} and {}: valid until {}{cap} (was {})",
                renewed.cert.display(),
                renewed.key.display(),
                fmt(renewed.not_after),
                fmt(renewed.old_not_after)
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
