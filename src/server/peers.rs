//! `--peers`: the servers share the identities instead of each keeping every one warm. The name
//! (the servers' headless Service) is resolved every `--peers-interval`; each address that
//! accepts a connection on the port is a live peer, and this server is always one. Each identity
//! is owned by one live peer, by rendezvous hashing ([`crate::policy::rendezvous`]) of its key
//! over their IPs; only the owner prefetches and refreshes it. Any server still answers any
//! request (a miss fetches), so a wrong or stale view of the peers costs an STS call, never a
//! failed request.
//!
//! When a peer leaves, the survivors compute the new owners at once, count the identities in use
//! they took over (`kiam_server_handoffs_total`), and wake the refresher, which fetches those of
//! them it holds nothing for; identities a survivor already owned are not fetched again.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use super::config::Peers;
use crate::client::Resolve;
use crate::core::{Core, Ownership};
use crate::creds::{AssumeRole, Identity};
use crate::policy::rendezvous;

/// The longest a peer may take to accept a connection before it counts as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The live peers, as this server sees them.
pub struct Membership {
    me: IpAddr,
    /// Sorted, this server included.
    live: ArcSwap<Vec<IpAddr>>,
}

impl Membership {
    /// This server alone, until the first resolution.
    pub fn new(me: IpAddr) -> Membership {
        Membership { me, live: ArcSwap::from_pointee(vec![me]) }
    }

    /// This server's address among the peers.
    pub fn me(&self) -> IpAddr {
        self.me
    }

    /// The live peers, sorted, this server included.
    pub fn live(&self) -> Arc<Vec<IpAddr>> {
        self.live.load_full()
    }
}

impl Ownership for Membership {
    fn owns(&self, identity: &Identity) -> bool {
        rendezvous::owner(identity.affinity_key(), &self.live.load()) == Some(self.me)
    }
}

/// Which address this server is known by among its peers: `--bind`'s, unless that names every
/// address, then `POD_IP`.
pub fn own_address(bound: SocketAddr, pod_ip: Option<IpAddr>) -> Option<IpAddr> {
    if bound.ip().is_unspecified() { pod_ip } else { Some(bound.ip()) }
}

/// The live peers behind `config`'s name: this server, and every other resolved address that
/// accepts a connection on the port. When resolution fails, the peers seen before are checked.
async fn discover(config: &Peers, resolver: &dyn Resolve, me: IpAddr, before: &[IpAddr]) -> Vec<IpAddr> {
    let candidates: Vec<IpAddr> = match resolver.resolve(&config.host, config.port).await {
        Ok(found) => found.into_iter().map(|a| a.ip()).collect(),
        Err(error) => {
            tracing::warn!(host = %config.host, %error, "cannot resolve --peers; checking the peers seen before");
            before.to_vec()
        }
    };
    let others: HashSet<IpAddr> = candidates.into_iter().filter(|ip| *ip != me).collect();
    let probes = others.into_iter().map(|ip| async move {
        let addr = SocketAddr::new(ip, config.port);
        let up = tokio::time::timeout(PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await;
        matches!(up, Ok(Ok(_))).then_some(ip)
    });
    let mut live: Vec<IpAddr> = futures::future::join_all(probes).await.into_iter().flatten().collect();
    live.push(me);
    live.sort_unstable();
    live
}

/// Keeps `membership` current until `shutdown`, counting into the core's metrics. The first
/// resolution has been made by the caller ([`first`]).
pub fn spawn<A: AssumeRole>(
    membership: Arc<Membership>,
    config: Peers,
    resolver: Arc<dyn Resolve>,
    core: Arc<Core<A>>,
    shutdown: &CancellationToken,
) {
    let stop = shutdown.clone();
    crate::task::spawn_until(shutdown, async move {
        let mut tick = tokio::time::interval(config.every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let before = membership.live();
            let live = discover(&config, resolver.as_ref(), membership.me, &before).await;
            let active = core.active_identities();
            let metrics = &core.metrics().scale;
            if *live != **before {
                let me = Some(membership.me);
                let taken = active
                    .iter()
                    .map(Identity::affinity_key)
                    .filter(|key| {
                        let old = rendezvous::owner(*key, &before);
                        old != me
                            && old.is_some_and(|o| !live.contains(&o))
                            && rendezvous::owner(*key, &live) == me
                    })
                    .count();
                tracing::info!(peers = ?live, taken, "peers changed");
                membership.live.store(Arc::new(live));
                metrics.handoffs.inc_by(taken as u64);
                // What this server now owns and holds nothing for is fetched now, not at the
                // next refresh pass.
                core.rescan();
            }
            let owned = active.iter().filter(|identity| membership.owns(identity)).count();
            metrics.identities_owned.set(owned as i64);
            metrics.peers.set(membership.live().len() as i64);
        }
    });
}

/// The first view of the peers, before the prefetcher starts, so that a server joining running
/// peers does not fetch every identity first.
pub async fn first(config: &Peers, resolver: &dyn Resolve, me: IpAddr) -> Arc<Membership> {
    let membership = Membership::new(me);
    let live = discover(config, resolver, me, &[]).await;
    tracing::info!(peers = ?live, "sharing identities with peers");
    membership.live.store(Arc::new(live));
    Arc::new(membership)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_is_known_by_its_bind_address_or_its_pod_ip() {
        let pod: IpAddr = "10.1.2.3".parse().expect("ip");
        let bound: SocketAddr = "127.0.0.2:443".parse().expect("addr");
        assert_eq!(own_address(bound, Some(pod)), Some(bound.ip()));
        let any: SocketAddr = "0.0.0.0:443".parse().expect("addr");
        assert_eq!(own_address(any, Some(pod)), Some(pod));
        assert_eq!(own_address(any, None), None);
    }
}
