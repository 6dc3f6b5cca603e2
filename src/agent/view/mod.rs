//! The agent's node view: the pods of its own node, by IP, as the server streams them
//! ([`sync`]), each with the policy's verdict and, once fetched, its credentials. A hit is
//! answered from here with no network call.
//!
//! Credentials are reached only through their entry, which holds them in the slot of its
//! identity (the server's 128-bit digest of every field STS is asked with; entries of one identity
//! share a slot, so one fetch serves them all). An entry that is fenced, removed or replaced
//! (an IP given to another pod, a role or policy change) lets go of its slot: a new pod on a
//! reused IP is answered with the old pod's credentials only if the server gave it the very same
//! identity, for which it would answer with the same. While no server answers, entries and
//! credentials already held keep being served until the credentials near expiry (static
//! stability); a pod not in the view is never answered from a guess.

pub mod confirm;
mod entry;
pub mod sync;

pub use entry::{ViewEntry, ViewPod};

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::{Notify, watch};

use crate::metrics::Metrics;
use crate::pb::node as pb;

/// The view's state, replaced whole on every change (see [`NodeView`]).
#[derive(Clone, Default)]
struct State {
    entries: HashMap<IpAddr, Arc<ViewEntry>>,
    /// A snapshot has arrived on the current stream, and the stream is still open.
    live: bool,
    /// The node the server says this is.
    node: String,
    /// Since when the view has not been known current (the stream went down); `None` while live.
    down_since: Option<Instant>,
    /// Whether any snapshot ever arrived (the agent then answers from the view).
    ever_synced: bool,
}

/// What the view says about one IP.
pub enum Lookup {
    /// The pod's entry.
    Entry(Arc<ViewEntry>),
    /// The view is live and has no pod at this IP (after waiting for one).
    NoPod,
    /// The view cannot say: not synced yet, or stale and without this IP. Ask the server.
    Unknown,
}

/// A lookup, and for how long the view had not been live when it was made (`None`: live).
struct Found {
    lookup: Lookup,
    down_for: Option<Duration>,
}

/// How long a terminating pod's entry is held back, in case a new pod has its IP already: the
/// wait the servers make before answering for a terminating pod's IP (`server::core`).
pub const TERMINATING_GRACE: Duration = Duration::from_millis(500);

/// The node's pods, as far as the agent knows. Every hit reads the state, so it is read without
/// a lock (arc-swap): a change, rare on one node, copies it and swaps the copy in, one writer
/// at a time. A reader that loads the state after a swap sees the change.
pub struct NodeView {
    state: ArcSwap<State>,
    /// Held by the one writer at a time.
    writer: Mutex<()>,
    /// Bumped when the whole view changes (a snapshot): wakes every waiting lookup.
    changes: watch::Sender<u64>,
    /// The lookups waiting for a pod, by IP: a change to one IP wakes only its own. With one
    /// signal for all, each of a burst's upserts woke every lookup waiting on the node (64 pods
    /// arriving together made 64 × 64 wake-ups, BENCHMARKS.md, figure 2). Bounded by the
    /// connections waiting; an IP's signal goes with its last waiter.
    waiting: Mutex<HashMap<IpAddr, Arc<Notify>>>,
    metrics: Arc<Metrics>,
    /// What confirms an entry while the view is not live.
    confirm: confirm::Confirm,
    /// The strings the entries share; used under `writer`'s turn.
    strings: Mutex<entry::Strings>,
}

/// Health of the view, for `/health?deep` and metrics.
#[derive(Clone, Debug)]
pub struct ViewHealth {
    /// A snapshot arrived on the current stream and it is still open.
    pub live: bool,
    /// Entries held.
    pub entries: usize,
    /// How long the view has not been known current (zero while live; `None` before any sync).
    pub age: Option<Duration>,
    /// The node the server says this is.
    pub node: String,
}

impl NodeView {
    /// An empty view counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> NodeView {
        NodeView {
            state: ArcSwap::default(),
            writer: Mutex::default(),
            changes: watch::Sender::new(0),
            waiting: Mutex::default(),
            metrics,
            confirm: confirm::Confirm::new(None, confirm::UNCONFIRMED_BOUND),
            strings: Mutex::default(),
        }
    }

    /// Confirms entries from the kubelet's PodResources socket while the view is not live
    /// (`None`: from nothing, so only for [`confirm::UNCONFIRMED_BOUND`]).
    #[must_use]
    pub fn confirming_from(mut self, socket: Option<std::path::PathBuf>, bound: Duration) -> NodeView {
        self.confirm = confirm::Confirm::new(socket, bound);
        self
    }

    fn strings(&self) -> std::sync::MutexGuard<'_, entry::Strings> {
        self.strings.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the state with `f` and swaps the result in; the caller wakes the lookups that
    /// the change concerns.
    fn update(&self, f: impl FnOnce(&mut State)) {
        self.modify(|state| {
            f(state);
            let m = &self.metrics.agent;
            m.view_entries.set(state.entries.len() as i64);
            m.view_live.set(i64::from(state.live));
        });
    }

    /// Wakes the lookups waiting on `ips`.
    fn wake(&self, ips: impl IntoIterator<Item = IpAddr>) {
        let waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        for ip in ips {
            if let Some(notify) = waiting.get(&ip) {
                notify.notify_waiters();
            }
        }
    }

    /// Changes a copy of the state with `f` and swaps it in.
    fn modify(&self, f: impl FnOnce(&mut State)) {
        let _writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
        let mut state = State::clone(&self.state.load());
        f(&mut state);
        self.state.store(Arc::new(state));
    }

    /// Replaces everything with a snapshot; the view is live from now on.
    pub fn replace(&self, snapshot: pb::Snapshot) {
        self.update(|state| {
            let old = std::mem::take(&mut state.entries);
            let mut strings = self.strings();
            state.entries.reserve(snapshot.entries.len());
            for entry in snapshot.entries {
                let Ok(ip) = entry.ip.parse() else { continue };
                // An identical entry keeps its credentials across a resync.
                let kept = old.get(&ip).filter(|e| e.same_as(&entry)).cloned();
                let entry = kept.unwrap_or_else(|| Arc::new(strings.entry(entry)));
                state.entries.insert(ip, entry);
            }
            drop(old);
            strings.sweep(true);
            state.node = snapshot.node;
            state.live = true;
            state.ever_synced = true;
            state.down_since = None;
            self.metrics.agent.view_down_since.set(0);
        });
        self.changes.send_modify(|g| *g += 1);
    }

    /// Adds or replaces one entry (a changed entry starts without credentials).
    pub fn upsert(&self, entry: pb::Entry) {
        let Ok(ip) = entry.ip.parse::<IpAddr>() else { return };
        self.update(|state| {
            if state.entries.get(&ip).is_none_or(|e| !e.same_as(&entry)) {
                let mut strings = self.strings();
                state.entries.insert(ip, Arc::new(strings.entry(entry)));
                strings.sweep(false);
            }
        });
        self.wake([ip]);
    }

    /// Drops the entries of `ips` (a Remove, or a Fence before the server changes them).
    pub fn remove(&self, ips: &[String]) {
        self.metrics.agent.view_invalidations.inc_by(ips.len() as u64);
        let ips: Vec<IpAddr> = ips.iter().filter_map(|ip| ip.parse().ok()).collect();
        self.update(|state| {
            for ip in &ips {
                state.entries.remove(ip);
            }
        });
        self.wake(ips);
    }

    /// Counts a stream the servers refused.
    pub fn refused(&self) {
        self.metrics.agent.view_refusals.inc();
    }

    /// Marks the stream down (entries are kept: static stability).
    pub fn set_down(&self) {
        self.modify(|state| {
            state.live = false;
            if state.down_since.is_none() && state.ever_synced {
                state.down_since = Some(Instant::now());
                let epoch = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
                self.metrics.agent.view_down_since.set(i64::try_from(epoch.as_secs()).unwrap_or(i64::MAX));
            }
        });
        self.metrics.agent.view_live.set(0);
    }

    /// Every entry, for the fetcher.
    pub fn entries(&self) -> Vec<(IpAddr, Arc<ViewEntry>)> {
        let state = self.state.load();
        state.entries.iter().map(|(ip, e)| (*ip, Arc::clone(e))).collect()
    }

    /// The entry for `ip`. While the view is live, a pod not in it yet is waited for until
    /// `deadline`, woken by the stream, and a terminating pod's entry only after
    /// [`TERMINATING_GRACE`] (a new owner of the IP wins). While it is not live, an entry is
    /// answered only if [`confirm`] vouches for its pod; otherwise the servers are asked.
    pub async fn lookup(&self, ip: IpAddr, deadline: tokio::time::Instant) -> Lookup {
        // A pod already in the view (every hit) costs one load and no subscription.
        let found = match self.find(ip) {
            Some(Found { lookup: Lookup::Entry(entry), down_for: None }) if !entry.pod.terminating => {
                return Lookup::Entry(entry);
            }
            Some(found) => Some(found),
            None => None,
        };
        let found = match found {
            Some(Found { lookup: Lookup::Entry(entry), down_for: None }) => {
                self.past_terminating(ip, entry, deadline).await
            }
            Some(found) => found,
            None => self.wait_for(ip, deadline, None).await,
        };
        match found {
            Found { lookup: Lookup::Entry(entry), down_for: Some(down_for) } => {
                if self.confirm.serves(&entry, down_for).await {
                    Lookup::Entry(entry)
                } else {
                    tracing::debug!(%ip, "node view entry not confirmed; asking the servers");
                    Lookup::Unknown
                }
            }
            found => found.lookup,
        }
    }

    /// A terminating pod's entry, once no new owner of `ip` appeared within the grace (or what
    /// the view says instead, if one did).
    async fn past_terminating(
        &self,
        ip: IpAddr,
        entry: Arc<ViewEntry>,
        deadline: tokio::time::Instant,
    ) -> Found {
        let grace = (tokio::time::Instant::now() + TERMINATING_GRACE).min(deadline);
        let found = self.wait_for(ip, grace, Some(&entry)).await;
        if !matches!(found.lookup, Lookup::NoPod) {
            return found;
        }
        // The grace passed: the terminating pod is still the IP's owner if its entry is still
        // there (as the view says now: removed, it is not answered).
        match self.find(ip) {
            Some(now) => now,
            None => Found { lookup: Lookup::NoPod, down_for: None },
        }
    }

    /// Waits until `deadline` for `ip` to have an entry other than `old`, woken by the stream;
    /// `NoPod` when none came.
    async fn wait_for(
        &self,
        ip: IpAddr,
        deadline: tokio::time::Instant,
        old: Option<&Arc<ViewEntry>>,
    ) -> Found {
        // Subscribe, then look again before waiting, so that no change is missed in between.
        let mut changes = self.changes.subscribe();
        let waiter = Waiter::new(self, ip);
        loop {
            let notified = waiter.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.find(ip) {
                Some(Found { lookup: Lookup::Entry(e), .. }) if old.is_some_and(|o| Arc::ptr_eq(o, &e)) => {}
                Some(found) => return found,
                None => {}
            }
            let woken = tokio::select! {
                () = notified => true,
                changed = changes.changed() => changed.is_ok(),
                () = tokio::time::sleep_until(deadline) => false,
            };
            if !woken {
                return Found { lookup: Lookup::NoPod, down_for: None };
            }
        }
    }

    /// What the view says about `ip` now; `None` while a live view has no entry for it.
    fn find(&self, ip: IpAddr) -> Option<Found> {
        let state = self.state.load();
        if !state.ever_synced {
            return Some(Found { lookup: Lookup::Unknown, down_for: None });
        }
        // Not live: for how long (unknown counts as too long).
        let down_for = (!state.live).then(|| state.down_since.map_or(Duration::MAX, |t| t.elapsed()));
        match state.entries.get(&ip) {
            Some(entry) => Some(Found { lookup: Lookup::Entry(Arc::clone(entry)), down_for }),
            None => (!state.live).then_some(Found { lookup: Lookup::Unknown, down_for }),
        }
    }

    /// Live, size and age.
    pub fn health(&self) -> ViewHealth {
        let state = self.state.load();
        ViewHealth {
            live: state.live,
            entries: state.entries.len(),
            age: match (state.live, state.down_since) {
                (true, _) => Some(Duration::ZERO),
                (false, since) => since.map(|t| t.elapsed()),
            },
            node: state.node.clone(),
        }
    }
}

/// A lookup's place among those waiting for its IP; the IP's signal goes with its last waiter.
struct Waiter<'a> {
    view: &'a NodeView,
    ip: IpAddr,
    notify: Arc<Notify>,
}

impl<'a> Waiter<'a> {
    fn new(view: &'a NodeView, ip: IpAddr) -> Waiter<'a> {
        let mut waiting = view.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        let notify = Arc::clone(waiting.entry(ip).or_default());
        Waiter { view, ip, notify }
    }
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        let mut waiting = self.view.waiting.lock().unwrap_or_else(PoisonError::into_inner);
        // Clones are made under this lock: two left (the map's and this one) means no other waiter.
        if Arc::strong_count(&self.notify) == 2 {
            waiting.remove(&self.ip);
        }
    }
}

#[cfg(test)]
mod tests;
