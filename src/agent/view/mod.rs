//! The agent's node view: the pods of its own node, by IP, as the server streams them
//! ([`sync`]), each with the policy's verdict and, once fetched, its credentials. A hit is
//! answered from here with no network call.
//!
//! Credentials live inside their entry, so an entry that is fenced, removed or replaced (an IP
//! given to another pod, a role or policy change) takes its credentials with it: a new pod on a
//! reused IP can never be answered with the old pod's. While no server answers, entries and
//! credentials already held keep being served until the credentials near expiry (static
//! stability); a pod not in the view is never answered from a guess.

pub mod confirm;
pub mod sync;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::body::Bytes;
use tokio::sync::watch;

use crate::creds::ImdsDocument;
use crate::creds::lifetimes::SDK_REFRESH_WINDOW;
use crate::metrics::Metrics;
use crate::pb::node as pb;

/// One pod IP of the node.
pub struct ViewEntry {
    /// What the server sent.
    pub pod: pb::Entry,
    /// Read by every hit, so without a lock: a lock's word is written by each reader, and its
    /// cache line then moves between the cores that answer hits (figure 1).
    creds: ArcSwapOption<Held>,
    /// When to ask the server again (half-life, or later after a fetch that changed nothing or
    /// failed); `None` until credentials are held.
    renew_at: Mutex<Option<SystemTime>>,
    /// One fetch at a time per entry.
    pub fetching: tokio::sync::Mutex<()>,
}

/// Credentials held for an entry.
struct Held {
    document: ImdsDocument,
    /// `document` as the legacy credentials path serves it, encoded once when stored: a hit then
    /// copies no strings and encodes nothing. `None` if it could not be encoded (the hit path
    /// then encodes `document` itself, as before).
    body: Option<Bytes>,
    issued: SystemTime,
    expiration: SystemTime,
}

impl ViewEntry {
    fn new(pod: pb::Entry) -> ViewEntry {
        ViewEntry {
            pod,
            creds: ArcSwapOption::empty(),
            renew_at: Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }

    /// The pod's role annotation, `None` when it has none.
    pub fn role(&self) -> Option<&str> {
        Some(self.pod.role.as_str()).filter(|r| !r.is_empty())
    }

    /// Credentials fit to serve at `now`: with more left than the floor the server serves with
    /// (the SDKs' 15-minute window, or half the session when it is shorter).
    pub fn credentials(&self, now: SystemTime) -> Option<ImdsDocument> {
        self.creds.load().as_ref().filter(|h| h.fresh(now)).map(|h| h.document.clone())
    }

    /// The same credentials as [`credentials`](Self::credentials), under the same rule, as the
    /// JSON body the legacy credentials path serves (`serde_json::to_vec` of the document).
    /// Copied, not shared: a shared `Bytes` has a reference count that every hit would write.
    pub fn credentials_body(&self, now: SystemTime) -> Option<Bytes> {
        let held = self.creds.load();
        held.as_ref().filter(|h| h.fresh(now)).and_then(|h| h.body.as_deref()).map(Bytes::copy_from_slice)
    }

    /// Whether the background fetcher should ask for (new) credentials at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.pod.allowed && self.renew_at().is_none_or(|renew_at| now >= renew_at)
    }

    fn renew_at(&self) -> std::sync::MutexGuard<'_, Option<SystemTime>> {
        self.renew_at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores what the server answered. A document that changed nothing (the server has not
    /// renewed yet) is asked for again a minute later rather than at once.
    pub fn store(&self, document: ImdsDocument, now: SystemTime) {
        let parse = |t: &str| crate::creds::time::parse(t);
        let (Some(expiration), issued) = (parse(&document.expiration), parse(&document.last_updated)) else {
            return;
        };
        let issued = issued.unwrap_or(now).min(now);
        let mut renew_at = self.renew_at();
        let same = self.creds.load().as_ref().is_some_and(|h| h.expiration == expiration);
        let half_life = issued + expiration.duration_since(issued).unwrap_or_default() / 2;
        *renew_at = Some(if same {
            now + Duration::from_secs(60)
        } else {
            half_life.max(now + Duration::from_secs(1))
        });
        let body = serde_json::to_vec(&document).ok().map(Bytes::from);
        self.creds.store(Some(Arc::new(Held { document, body, issued, expiration })));
    }

    /// After a failed fetch, when to try again.
    pub fn backoff(&self, now: SystemTime, pause: Duration) {
        let mut renew_at = self.renew_at();
        if renew_at.is_some() {
            *renew_at = Some(now + pause);
        }
    }
}

impl Held {
    /// Whether these credentials may be served at `now`: with more left than the floor the
    /// server serves with (the SDKs' 15-minute window, or half the session when it is shorter).
    fn fresh(&self, now: SystemTime) -> bool {
        let lifetime = self.expiration.duration_since(self.issued).unwrap_or_default();
        let floor = SDK_REFRESH_WINDOW.min(lifetime / 2);
        self.expiration.duration_since(now).unwrap_or_default() > floor
    }
}

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
    changes: watch::Sender<u64>,
    metrics: Arc<Metrics>,
    /// What confirms an entry while the view is not live.
    confirm: confirm::Confirm,
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
            metrics,
            confirm: confirm::Confirm::new(None, confirm::UNCONFIRMED_BOUND),
        }
    }

    /// Confirms entries from the kubelet's PodResources socket while the view is not live
    /// (`None`: from nothing, so only for [`confirm::UNCONFIRMED_BOUND`]).
    #[must_use]
    pub fn confirming_from(mut self, socket: Option<std::path::PathBuf>, bound: Duration) -> NodeView {
        self.confirm = confirm::Confirm::new(socket, bound);
        self
    }

    /// Changes the state with `f`, swaps the result in, and wakes the lookups waiting for a pod.
    fn update(&self, f: impl FnOnce(&mut State)) {
        self.modify(|state| {
            f(state);
            let m = &self.metrics.agent;
            m.view_entries.set(state.entries.len() as i64);
            m.view_live.set(i64::from(state.live));
        });
        self.changes.send_modify(|g| *g += 1);
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
            for entry in snapshot.entries {
                let Ok(ip) = entry.ip.parse() else { continue };
                // An identical entry keeps its credentials across a resync.
                let kept = old.get(&ip).filter(|e| e.pod == entry).cloned();
                state.entries.insert(ip, kept.unwrap_or_else(|| Arc::new(ViewEntry::new(entry))));
            }
            state.node = snapshot.node;
            state.live = true;
            state.ever_synced = true;
            state.down_since = None;
            self.metrics.agent.view_down_since.set(0);
        });
    }

    /// Adds or replaces one entry (a changed entry starts without credentials).
    pub fn upsert(&self, entry: pb::Entry) {
        let Ok(ip) = entry.ip.parse::<IpAddr>() else { return };
        self.update(|state| {
            if state.entries.get(&ip).is_none_or(|e| e.pod != entry) {
                state.entries.insert(ip, Arc::new(ViewEntry::new(entry)));
            }
        });
    }

    /// Drops the entries of `ips` (a Remove, or a Fence before the server changes them).
    pub fn remove(&self, ips: &[String]) {
        self.metrics.agent.view_invalidations.inc_by(ips.len() as u64);
        self.update(|state| {
            for ip in ips.iter().filter_map(|ip| ip.parse::<IpAddr>().ok()) {
                state.entries.remove(&ip);
            }
        });
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
        loop {
            match self.find(ip) {
                Some(Found { lookup: Lookup::Entry(e), .. }) if old.is_some_and(|o| Arc::ptr_eq(o, &e)) => {}
                Some(found) => return found,
                None => {}
            }
            if !matches!(tokio::time::timeout_at(deadline, changes.changed()).await, Ok(Ok(()))) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_body_is_the_held_document_encoded_under_the_same_freshness_rule() {
        let entry = ViewEntry::new(pb::Entry { allowed: true, ..pb::Entry::default() });
        let now = SystemTime::now();
        assert!(entry.credentials_body(now).is_none(), "nothing held yet");
        let document = ImdsDocument {
            code: "Success".into(),
            last_updated: crate::creds::time::format(now),
            kind: "AWS-HMAC".into(),
            access_key_id: "AKIDVIEW".into(),
            secret_access_key: "secret".into(),
            token: "token with \"quotes\" and \\ to escape".into(),
            expiration: crate::creds::time::format(now + Duration::from_secs(3600)),
        };
        entry.store(document.clone(), now);
        let encoded = serde_json::to_vec(&document).expect("the document encodes");
        assert_eq!(entry.credentials_body(now).as_deref(), Some(encoded.as_slice()));
        // Ten minutes left is under the SDKs' refresh window: neither form is served.
        let late = now + Duration::from_secs(50 * 60);
        assert!(entry.credentials(late).is_none());
        assert!(entry.credentials_body(late).is_none());
    }
}
