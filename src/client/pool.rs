//! The set of servers behind `--server-address`, kept current. A background task re-resolves
//! the name every few seconds and adds or removes servers from a balanced gRPC channel, so a new
//! or replaced server gets traffic within seconds, not only after a reconnect (kiam #425). When
//! the client's certificate files change, the channel is rebuilt with the new material: new
//! connections present the new certificate while calls in flight finish on the old ones.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint};

use crate::pb::kiam_service_client::KiamServiceClient;
use crate::tls::ClientTls;
use crate::tls::reload::Reloading;

/// Name resolution, behind a trait so that tests can move a name between servers.
pub trait Resolve: Send + Sync + 'static {
    /// The addresses of `host:port`.
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>>;
}

/// The system resolver (a headless Service lists every server pod).
pub struct Dns;

impl Resolve for Dns {
    fn resolve(
        &self,
        host: &str,
        port: u16,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>> {
        let target = if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") };
        Box::pin(async move { Ok(tokio::net::lookup_host(target).await?.collect()) })
    }
}

/// HTTP/2 settings of every connection.
#[derive(Clone, Debug)]
pub struct Link {
    pub keepalive_time: Duration,
    pub keepalive_timeout: Duration,
    pub permit_without_stream: bool,
    pub connect_timeout: Duration,
}

/// The live channel and the sender that adds and removes its servers.
struct Live {
    channel: Channel,
    changes: Sender<Change<SocketAddr, Endpoint>>,
    servers: HashSet<SocketAddr>,
    /// A channel to each server alone, for calls sent to a chosen one.
    each: HashMap<SocketAddr, Channel>,
    tls_generation: u64,
}

/// Servers behind one name.
pub struct Pool {
    channel: ArcSwap<Channel>,
    /// Each server's own channel (connected on first use), for calls that go to an identity's
    /// owner first.
    each: ArcSwap<Vec<(SocketAddr, Channel)>>,
    /// Stops the maintenance task when the pool goes.
    _stop: tokio_util::sync::DropGuard,
}

impl Pool {
    /// Starts maintaining the pool; the first resolution happens at once, in the background.
    pub fn start(
        host: String,
        port: u16,
        tls: Arc<Reloading<ClientTls>>,
        link: Link,
        resolver: Arc<dyn Resolve>,
        every: Duration,
    ) -> Arc<Pool> {
        let stop = CancellationToken::new();
        let live = fresh(&tls, &link, &HashSet::new());
        let pool = Arc::new(Pool {
            channel: ArcSwap::from_pointee(live.channel.clone()),
            each: ArcSwap::from_pointee(Vec::new()),
            _stop: stop.clone().drop_guard(),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut live = live;
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(pool) = weak.upgrade() else { return };
                let checked = Arc::clone(&tls);
                let _ = tokio::task::spawn_blocking(move || checked.check()).await;
                let servers = match resolver.resolve(&host, port).await {
                    Ok(found) if !found.is_empty() => found.into_iter().collect(),
                    Ok(_) => live.servers.clone(),
                    Err(error) => {
                        tracing::warn!(%host, %error, "cannot resolve the server address; keeping the known servers");
                        live.servers.clone()
                    }
                };
                if tls.generation() != live.tls_generation {
                    live = fresh(&tls, &link, &servers);
                    pool.channel.store(Arc::new(live.channel.clone()));
                    tracing::info!("client certificate changed; new connections use it");
                } else {
                    update(&mut live, &tls, &link, servers).await;
                }
                pool.each.store(Arc::new(live.each.iter().map(|(a, c)| (*a, c.clone())).collect()));
            }
        });
        pool
    }

    /// A client on the current channel.
    pub fn client(&self) -> KiamServiceClient<Channel> {
        KiamServiceClient::new(self.channel())
    }

    /// The current channel, balanced over every server.
    pub fn channel(&self) -> Channel {
        (**self.channel.load()).clone()
    }

    /// Each known server's own channel, in rendezvous rank for `key` (the owner of an identity
    /// with that key first; [`crate::policy::rendezvous`]).
    pub fn ranked(&self, key: u64) -> Vec<Channel> {
        let each = self.each.load();
        let ips: Vec<std::net::IpAddr> = each.iter().map(|(a, _)| a.ip()).collect();
        let ranked = crate::policy::rendezvous::rank(key, &ips);
        ranked
            .into_iter()
            .filter_map(|ip| each.iter().find(|(a, _)| a.ip() == ip).map(|(_, c)| c.clone()))
            .collect()
    }
}

fn endpoint(addr: SocketAddr, tls: &ClientTls, link: &Link) -> Option<Endpoint> {
    let endpoint = tls.apply(Endpoint::from_shared(format!("https://{addr}")).ok()?).ok()?;
    Some(
        endpoint
            .connect_timeout(link.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(link.keepalive_time)
            .keep_alive_timeout(link.keepalive_timeout)
            .keep_alive_while_idle(link.permit_without_stream),
    )
}

/// A new balanced channel over `servers`.
fn fresh(tls: &Reloading<ClientTls>, link: &Link, servers: &HashSet<SocketAddr>) -> Live {
    let (channel, changes) = Channel::balance_channel(64);
    let config = tls.current();
    let mut each = HashMap::new();
    for addr in servers {
        if let Some(e) = endpoint(*addr, &config, link) {
            each.insert(*addr, e.connect_lazy());
            // A fresh channel has room for every server at once.
            let _ = changes.try_send(Change::Insert(*addr, e));
        }
    }
    Live { channel, changes, servers: servers.clone(), each, tls_generation: tls.generation() }
}

/// Adds new servers and removes gone ones.
async fn update(live: &mut Live, tls: &Reloading<ClientTls>, link: &Link, servers: HashSet<SocketAddr>) {
    let config = tls.current();
    for gone in live.servers.difference(&servers) {
        tracing::info!(server = %gone, "server left");
        live.each.remove(gone);
        let _ = live.changes.send(Change::Remove(*gone)).await;
    }
    for new in servers.difference(&live.servers) {
        tracing::info!(server = %new, "server joined");
        if let Some(e) = endpoint(*new, &config, link) {
            live.each.insert(*new, e.connect_lazy());
            let _ = live.changes.send(Change::Insert(*new, e)).await;
        }
    }
    live.servers = servers;
}
