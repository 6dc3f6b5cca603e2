//! `--peers`: the servers share the identities instead of each keeping every one warm. The name
//! (the servers' headless Service) is resolved every `--peers-interval`; each address that
//! accepts a connection on the port is a live peer, and this server is always one. Each identity
//! is owned by one live peer, by rendezvous hashing ([`crate::policy::rendezvous`]) of its key
//! over their IPs; only the owner prefetches and refreshes it. Any server still answers any
//! request (a miss fetches), so a wrong or stale view of the peers costs an STS call, never a
//! failed request.
//!
//! When a peer leaves, the survivors compute the new owners at once and wake the refresher, which
//! fetches the identities they took over and hold nothing for; identities a survivor already
//! owned are not fetched again. Every identity in use that changes owner, as a peer leaves or
//! joins, counts once in `kiam_server_handoffs_total` ([`handoffs`]).

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
                let moved =
                    handoffs(active.iter().map(Identity::affinity_key), &before, &live, membership.me);
                tracing::info!(peers = ?live, handoffs = moved, "peers changed");
                membership.live.store(Arc::new(live));
                metrics.handoffs.inc_by(moved as u64);
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

/// How many of the identities with `keys` this server (`me`) counts as handed off when the live
/// peers go from `before` to `live`: those it takes over from a peer that left, and those it
/// gives up to a peer that joined. Rendezvous moves an identity only for one of these two reasons,
/// and each move is counted by the one server that sees it from both sides (the heir of a peer
/// that left; the old owner, when a peer joined: the newcomer's first view already has every
/// peer, so it sees no change). An identity whose owner left while its heir joined is counted
/// by no one.
pub fn handoffs(keys: impl Iterator<Item = u64>, before: &[IpAddr], live: &[IpAddr], me: IpAddr) -> usize {
    let me = Some(me);
    keys.filter(|key| {
        let (old, new) = (rendezvous::owner(*key, before), rendezvous::owner(*key, live));
        let taken = new == me && old != me && old.is_some_and(|o| !live.contains(&o));
        let given = old == me && new != me && new.is_some_and(|n| !before.contains(&n));
        taken || given
    })
    .count()
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

    fn ips(lasts: &[u8]) -> Vec<IpAddr> {
        lasts.iter().map(|l| IpAddr::from([10, 0, 0, *l])).collect()
    }

    /// Every identity whose owner changed, summed over the servers that run the loop (all of
    /// `before` that are still live): each counted once.
    fn moved_and_counted(keys: &[u64], before: &[IpAddr], live: &[IpAddr]) -> (usize, usize) {
        let moved = keys.iter().filter(|k| rendezvous::owner(**k, before) != rendezvous::owner(**k, live));
        let seen = before.iter().filter(|me| live.contains(me));
        let counted = seen.map(|me| handoffs(keys.iter().copied(), before, live, *me)).sum();
        (moved.count(), counted)
    }

    #[test]
    fn each_identity_that_changes_owner_is_counted_once_whether_a_peer_left_or_joined() {
        let keys: Vec<u64> = (0..3000u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let (three, two) = (ips(&[1, 2, 3]), ips(&[1, 3]));
        let (moved, counted) = moved_and_counted(&keys, &three, &two);
        assert!(moved > 500, "a third of the identities were the leaver's: {moved}");
        assert_eq!(counted, moved, "departures: each counted by its heir");
        let (moved, counted) = moved_and_counted(&keys, &two, &three);
        assert!(moved > 500, "a third of the identities go to the newcomer: {moved}");
        assert_eq!(counted, moved, "arrivals: each counted by the peer that gave it up");
        // The newcomer's own first view has every peer: it counts nothing.
        let newcomer = IpAddr::from([10, 0, 0, 2]);
        assert_eq!(handoffs(keys.iter().copied(), &three, &three, newcomer), 0);
    }
}
