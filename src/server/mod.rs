//! `kiam server`: watches pods and namespaces, decides by policy, and serves credentials to
//! agents over mutually authenticated gRPC.
//!
//! [`main`] wires the process (STS client, cluster source, TLS) from a validated [`Config`];
//! [`run`] serves an already-bound listener until shutdown, so tests can bind `127.0.0.1:0`.

pub mod core;
pub mod debug;
pub mod idle;
pub mod prefetch;
pub mod service;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::cluster::events::{EventSink, KubeEvents, NoEvents};
use crate::metrics::{Kind, Metrics};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use self::idle::IdleStream;

pub use self::core::{Core, Error};
use crate::aws::{Sts, StsConfig};
use crate::cluster::file::FileSource;
use crate::cluster::kube::KubeSource;
use crate::cluster::{Cluster, Source};
use crate::creds::{AssumeRole, CredentialCache, Lifetimes};
use crate::pb::kiam_service_server::KiamServiceServer;
use crate::policy::Policy;
use crate::tls::reload::{Reloading, Side};
use crate::tls::{self, TlsFiles};

/// How often the certificate files are checked for rotation.
pub const TLS_POLL: Duration = Duration::from_secs(2);
/// How long a client gets to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the server learns about pods and namespaces.
#[derive(Clone, Debug)]
pub enum Inventory {
    /// The Kubernetes API: a kubeconfig file, or in-cluster configuration when `None`.
    Kube(Option<PathBuf>),
    /// A manifest file, re-read when it changes (`--manifest`, for local development).
    File(PathBuf),
}

/// How the server decides and caches: everything but its listener, TLS and sources.
#[derive(Clone, Debug)]
pub struct Settings {
    pub policy: Policy,
    pub lifetimes: Lifetimes,
    /// `--session`: the session-name suffix for pods without the annotation.
    pub session: String,
    /// `--fetchers`: prefetch workers, and the bound on STS calls in flight.
    pub fetchers: usize,
    /// `--prefetch-buffer-size`: announcements waiting for a worker.
    pub prefetch_buffer: usize,
    /// `--agent-node-binding`: answer an agent only about pods on the node its certificate names.
    pub node_binding: bool,
}

/// gRPC connection management (`--grpc-keepalive-*`, `--grpc-max-connection-*`).
#[derive(Clone, Debug)]
pub struct GrpcSettings {
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub max_connection_idle: Duration,
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
}

/// The validated server configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub bind: String,
    pub tls: TlsFiles,
    pub inventory: Inventory,
    /// `--role-base-arn-autodetect`: take the base ARN from the instance profile at start-up.
    pub autodetect_base_arn: bool,
    pub settings: Settings,
    pub grpc: GrpcSettings,
    pub sts: StsConfig,
    /// `--prometheus-listen-addr`: where `/metrics` is served.
    pub prometheus_listen_addr: Option<String>,
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Source(#[from] crate::cluster::SourceError),
    #[error("{0}")]
    Autodetect(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// Runs the server process until `shutdown`.
pub async fn main(mut config: Config, shutdown: CancellationToken) -> Result<(), ServeError> {
    let tls_gauges = crate::metrics::TlsGauges::default();
    let tls = Reloading::load(&config.tls, Side::Server, tls_gauges.clone(), tls::server_config)?;
    tls.spawn_watch(TLS_POLL, shutdown.clone());
    if config.autodetect_base_arn {
        let base = crate::aws::detect_base_arn()
            .await
            .map_err(|e| ServeError::Autodetect(format!("--role-base-arn-autodetect: {e}")))?;
        tracing::info!(base_arn = base.as_str(), "role base ARN detected from the instance profile");
        config.settings.policy.base_arn = Some(base);
    }
    if let Some(role) = config.sts.assume_role_arn.take() {
        let arn = crate::policy::RoleArn::resolve(&role, config.settings.policy.base_arn.as_ref())
            .map_err(|e| ServeError::Autodetect(format!("--assume-role-arn: {e}")))?;
        if config.settings.lifetimes.session > Duration::from_secs(3600) {
            tracing::warn!(
                session = ?config.settings.lifetimes.session,
                "--assume-role-arn chains roles, and AWS caps chained sessions at 1h: STS will refuse longer ones"
            );
        }
        config.sts.assume_role_arn = Some(arn.to_string());
    }
    let sts = Sts::from_env(&config.sts).await;
    let core = match &config.inventory {
        Inventory::Kube(path) => {
            let source = KubeSource::connect(path.clone()).await?;
            let events = Arc::new(KubeEvents::new(source.client(), std::env::var("POD_NAME").ok()));
            start(&config.settings, sts, events, source, &shutdown)
        }
        Inventory::File(path) => {
            let source = FileSource::open(path, Duration::from_secs(1))?;
            start(&config.settings, sts, Arc::new(NoEvents), source, &shutdown)
        }
    };
    let metrics = Arc::clone(core.metrics());
    for (gauge, value) in [
        (&metrics.tls_server.update_error, &tls_gauges.update_error),
        (&metrics.tls_server.verify_error, &tls_gauges.verify_error),
        (&metrics.tls_server.expiry_seconds, &tls_gauges.expiry_seconds),
    ] {
        let (gauge, value) = (gauge.clone(), value.clone());
        metrics.on_scrape(move || {
            gauge.set(value.get());
        });
    }
    if let Some(addr) = &config.prometheus_listen_addr {
        crate::metrics::spawn(addr, Arc::clone(&metrics), shutdown.clone())
            .await
            .map_err(|source| ServeError::Bind { addr: addr.clone(), source })?;
    }
    let listener = crate::net::listen_on(&config.bind)
        .await
        .map_err(|source| ServeError::Bind { addr: config.bind.clone(), source })?;
    tracing::info!(bind = %config.bind, "waiting for the pod and namespace caches to sync");
    tokio::select! {
        () = core.cluster().wait_synced() => {}
        () = shutdown.cancelled() => return Ok(()),
    }
    tracing::info!(pods = core.cluster().pod_count(), "caches synced; serving");
    let debug = debug::DebugService::new(Arc::clone(&core));
    let service = service::KiamService::new(core, config.settings.node_binding);
    run(listener, tls, service, debug, &config.grpc, shutdown).await
}

/// Assembles the server's core and starts its background work: the pod/namespace source and
/// the prefetcher. The caller serves the core once `core.cluster()` has synced.
pub fn start<A: AssumeRole>(
    settings: &Settings,
    sts: A,
    events: Arc<dyn EventSink>,
    source: impl Source,
    shutdown: &CancellationToken,
) -> Arc<Core<A>> {
    let (announce, announcements) = mpsc::channel(settings.prefetch_buffer.max(1));
    let cluster = Arc::new(Cluster::new(Some(announce)));
    let metrics = Arc::new(Metrics::default());
    let cache =
        CredentialCache::new(sts, settings.lifetimes, settings.fetchers).with_metrics(Arc::clone(&metrics));
    let core =
        Core::new(Arc::clone(&cluster), settings.policy.clone(), cache, settings.session.clone(), events);
    let core = Arc::new(core.with_metrics(Arc::clone(&metrics)));
    metrics.on_scrape(scrape(Arc::downgrade(&core)));
    spawn_source(source, &cluster, shutdown);
    prefetch::spawn(Arc::clone(&core), announcements, settings.fetchers, shutdown.clone());
    core
}

/// Copies what the core keeps as plain counters into the metrics, at scrape time.
fn scrape<A: AssumeRole>(core: std::sync::Weak<Core<A>>) -> impl Fn() + Send + Sync + 'static {
    use std::sync::atomic::Ordering::Relaxed;
    move || {
        let Some(core) = core.upgrade() else { return };
        let (m, stats, cluster) = (&core.metrics().server, core.cache().stats(), core.cluster());
        m.cache_size.set(core.cache().len() as i64);
        m.cache_hits.inner().store(stats.hits.load(Relaxed), Relaxed);
        m.cache_misses.inner().store(stats.misses.load(Relaxed), Relaxed);
        m.issuing_errors.inner().store(stats.sts_errors.load(Relaxed), Relaxed);
        m.dropped_pods.inner().store(cluster.dropped_announcements(), Relaxed);
        m.ambiguous_ips.inner().store(core.ambiguous_lookups(), Relaxed);
        let (w, synced) = (cluster.watch_stats(), cluster.synced());
        for (kind, relists, errors, done) in [
            ("pods", w.pod_relists, w.pod_watch_errors, synced.pods),
            ("namespaces", w.namespace_relists, w.namespace_watch_errors, synced.namespaces),
        ] {
            let kind = Kind { kind };
            m.relists.get_or_create(&kind).inner().store(relists, Relaxed);
            m.watch_restarts.get_or_create(&kind).inner().store(errors, Relaxed);
            m.cache_synced.get_or_create(&kind).set(i64::from(done));
        }
    }
}

/// Runs `source` in the background until `shutdown`.
pub fn spawn_source(source: impl Source, cluster: &Arc<Cluster>, shutdown: &CancellationToken) {
    let (cluster, shutdown) = (Arc::clone(cluster), shutdown.clone());
    tokio::spawn(async move {
        if let Err(error) = source.run(cluster, shutdown).await {
            tracing::error!(%error, "pod/namespace source stopped");
        }
    });
}

/// Serves `core` over mutual TLS on `listener` until `shutdown`: kiam's `KiamService` and,
/// behind the same client CA, kiam-rs's `Debug` service (cache state for `kiam explain`).
pub async fn run<A: AssumeRole>(
    listener: TcpListener,
    tls: Arc<Reloading<Arc<rustls::ServerConfig>>>,
    service: service::KiamService<A>,
    debug: debug::DebugService<A>,
    grpc: &GrpcSettings,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let idle = Some(grpc.max_connection_idle).filter(|d| !d.is_zero());
    let closed = service.metrics().server.idle_connections_closed.clone();
    let incoming = accept_tls(listener, tls, idle, closed, shutdown.clone());
    let service = KiamServiceServer::new(service);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(grpc.keepalive_time).filter(|d| !d.is_zero()))
        .http2_keepalive_timeout(Some(grpc.keepalive_timeout).filter(|d| !d.is_zero()))
        .max_connection_age(grpc.max_connection_age)
        .max_connection_age_grace(grpc.max_connection_age_grace)
        .add_service(service)
        .add_service(debug::server(debug))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// Accepts connections and completes TLS handshakes off the accept loop, so one slow client
/// cannot hold up the others. Failed handshakes (no client certificate, wrong CA) are logged
/// and dropped.
fn accept_tls(
    listener: TcpListener,
    tls: Arc<Reloading<Arc<rustls::ServerConfig>>>,
    idle: Option<Duration>,
    idle_closed: prometheus_client::metrics::counter::Counter,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<IdleStream<TlsStream<TcpStream>>, std::io::Error>> {
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(conn) => conn,
                    Err(error) => {
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            // Each handshake uses the material current at accept time.
            let (acceptor, tx) = (TlsAcceptor::from(Arc::clone(&*tls.current())), tx.clone());
            let idle_closed = idle_closed.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        // With no idle limit the watchdog never fires before the connection ends.
                        let limit = idle.unwrap_or(Duration::from_secs(u64::from(u32::MAX)));
                        let stream = IdleStream::new(stream, limit, move || {
                            idle_closed.inc();
                        });
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::info!(%peer, %error, "TLS handshake refused"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
