//! The `kiam` binary: parse flags, start logging, run one subcommand until SIGINT or SIGTERM.

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use kiam::cli::{Cli, Command};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> ExitCode {
    kiam::install_crypto_provider();
    // kube2iam's image runs the binary by that name with kube2iam's flags only.
    let invoked_as = std::env::args_os().next().map(std::path::PathBuf::from);
    if invoked_as.as_deref().and_then(std::path::Path::file_name).is_some_and(|name| name == "kube2iam") {
        return kube2iam(kiam::kube2iam::Kube2iamCli::parse().args).await;
    }
    let cli = Cli::parse();
    let log = match &cli.command {
        Command::Kube2iam(args) => return kube2iam(args.clone()).await,
        Command::Agent(a) => &a.log,
        Command::Server(s) => &s.log,
        Command::Health(h) => &h.log,
        Command::Explain(e) => &e.log,
        Command::Certs(c) => &c.log,
        Command::Webhook(w) => &w.log,
    };
    kiam::telemetry::init(log.json_log, log.level);
    match kiam::rlimit::raise_open_files() {
        Ok(raised) if raised.before != raised.after => {
            tracing::debug!(before = ?raised.before, after = ?raised.after, "raised the open-file limit")
        }
        Ok(_) => {}
        Err(error) => tracing::warn!(%error, "cannot raise the open-file limit"),
    }
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    let result = match cli.command {
        Command::Server(args) => match args.config() {
            Ok(config) => kiam::server::main(config, shutdown).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
        Command::Agent(args) => match args.config() {
            Ok(config) => kiam::agent::main(config, shutdown).await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        },
        Command::Health(args) => health(args).await,
        Command::Explain(args) => return explain(args).await,
        Command::Certs(args) => return args.run(),
        Command::Webhook(args) => webhook(args, shutdown).await,
        Command::Kube2iam(_) => unreachable_kube2iam(),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "exiting");
            ExitCode::FAILURE
        }
    }
}

/// `kiam webhook`: HTTPS until shutdown.
async fn webhook(args: kiam::cli::WebhookArgs, shutdown: CancellationToken) -> Result<(), String> {
    let injection = args.injection()?;
    let tls = kiam::webhook::serve::tls_config(&args.cert, &args.key).map_err(|e| e.to_string())?;
    let listener = kiam::net::listen_on(&args.listen).await.map_err(|e| format!("{}: {e}", args.listen))?;
    tracing::info!(listen = %args.listen, "webhook listening");
    kiam::webhook::serve::serve(listener, tls, injection, shutdown).await;
    Ok(())
}

/// Dispatched before logging starts, above; kept so the match stays exhaustive.
fn unreachable_kube2iam() -> Result<(), String> {
    Err("kube2iam mode is dispatched before the other commands".into())
}

/// kube2iam mode, with kube2iam's logging flags.
async fn kube2iam(args: kiam::kube2iam::Kube2iamArgs) -> ExitCode {
    let (json, level) = match args.logging() {
        Ok(logging) => logging,
        Err(error) => {
            eprintln!("kube2iam: {error}");
            return ExitCode::from(2);
        }
    };
    kiam::telemetry::init(json, level);
    let config = match args.config() {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(%error, "invalid flags");
            return ExitCode::from(2);
        }
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    match kiam::kube2iam::main(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn health(args: kiam::cli::HealthArgs) -> Result<(), String> {
    let (config, transport, timeout) = args.config()?;
    let client =
        kiam::client::GrpcClient::connect_with(&config, &transport, std::sync::Arc::new(kiam::client::Dns))
            .map_err(|e| e.to_string())?;
    let message = kiam::health::check(&client, timeout).await?;
    tracing::info!("healthy: {message}");
    Ok(())
}

/// `kiam explain`: the answer on stdout; exit 0 allowed, 1 denied, 2 bad flags, 3 unreadable.
async fn explain(args: kiam::cli::ExplainArgs) -> ExitCode {
    let config = match args.config() {
        Ok(config) => config,
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "kiam explain: {error}");
            return ExitCode::from(2);
        }
    };
    match kiam::explain::run(config).await {
        Ok(report) => {
            // A closed stdout (`kiam explain ... | head -1`) is not worth a panic.
            let _ = std::io::stdout().write_all(report.render().as_bytes());
            ExitCode::from(report.exit_code())
        }
        Err(error) => {
            let _ = writeln!(std::io::stderr(), "kiam explain: {error}");
            ExitCode::from(3)
        }
    }
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(error) => {
            tracing::warn!(%error, "cannot watch SIGTERM");
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    shutdown.cancel();
}
