//! One entry of the node view: the pod at an IP as the server described it, and the
//! credentials held for it.
//!
//! Laid out for a busy node (BENCHMARKS.md, figure 6): the strings the node's pods repeat
//! (namespace, role, role ARN) are shared through [`Strings`], the pod's own strings are boxed,
//! and credentials are held once, as the JSON body the legacy path serves (the document is
//! decoded from it on the rare path that needs the fields).
//!
//! Credentials are held per identity ([`Slot`]): the entries whose server-sent identity digest
//! is the same (128 bits of a SHA-256 of every field STS is asked with) share one slot, so a
//! node's pods of one identity cost one fetch and one copy of the credentials, which the
//! server's cache would have answered alike for each. An entry without a digest (not allowed) has a slot of its own.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use axum::body::Bytes;

use crate::creds::ImdsDocument;
use crate::creds::lifetimes::SDK_REFRESH_WINDOW;
use crate::pb::node as pb;

/// The pod at one IP, as the server's [`pb::Entry`] described it, without its IP (the view's
/// key).
#[derive(Debug)]
pub struct ViewPod {
    pub uid: Box<str>,
    pub namespace: Arc<str>,
    pub name: Box<str>,
    /// The role annotation as written ("" when none).
    pub role: Arc<str>,
    /// Whether the pod may have that role, and why not.
    pub allowed: bool,
    pub denial: Box<str>,
    /// The resolved role ARN when allowed.
    pub role_arn: Arc<str>,
    pub terminating: bool,
    /// The identity's key for ranking its owner among the servers (0 without `--peers`).
    pub affinity: u64,
}

impl ViewPod {
    /// Whether `entry` describes this very pod, field for field (its credentials then stay).
    pub fn same_as(&self, entry: &pb::Entry) -> bool {
        *self.uid == *entry.uid
            && *self.namespace == *entry.namespace
            && *self.name == *entry.name
            && *self.role == *entry.role
            && self.allowed == entry.allowed
            && *self.denial == *entry.denial
            && *self.role_arn == *entry.role_arn
            && self.terminating == entry.terminating
            && self.affinity == entry.affinity
    }
}

/// An identity's digest, as the server sent it (high and low halves; never both 0).
type Digest = (u64, u64);

/// The strings that a node's pods repeat, and the identities they share, each kept once. The
/// sets are rebuilt from the entries on every snapshot, and swept when they have doubled, so
/// they never outgrow the view by much.
#[derive(Default)]
pub struct Strings {
    kept: HashSet<Arc<str>>,
    slots: HashMap<Digest, Weak<Slot>>,
    swept_at: usize,
}

impl Strings {
    fn share(&mut self, s: String) -> Arc<str> {
        if let Some(kept) = self.kept.get(s.as_str()) {
            return Arc::clone(kept);
        }
        let s: Arc<str> = s.into();
        self.kept.insert(Arc::clone(&s));
        s
    }

    /// `entry` as the view holds it: its repeated strings shared, and its credentials' slot
    /// shared with the entries of the same identity.
    pub fn entry(&mut self, entry: pb::Entry) -> ViewEntry {
        let identity =
            Some((entry.identity_high, entry.identity_low)).filter(|d| entry.allowed && *d != (0, 0));
        let slot = match identity {
            Some(digest) => match self.slots.get(&digest).and_then(Weak::upgrade) {
                Some(slot) => slot,
                None => {
                    let slot = Arc::new(Slot::new(Some(digest)));
                    self.slots.insert(digest, Arc::downgrade(&slot));
                    slot
                }
            },
            None => Arc::new(Slot::new(None)),
        };
        ViewEntry { pod: self.pod(entry), slot }
    }

    /// The compact form of `entry`, its repeated strings shared.
    fn pod(&mut self, entry: pb::Entry) -> ViewPod {
        ViewPod {
            uid: entry.uid.into(),
            namespace: self.share(entry.namespace),
            name: entry.name.into(),
            role: self.share(entry.role),
            allowed: entry.allowed,
            denial: entry.denial.into(),
            role_arn: self.share(entry.role_arn),
            terminating: entry.terminating,
            affinity: entry.affinity,
        }
    }

    /// Drops every string no entry holds (after a snapshot), or does so once the set has
    /// doubled since the last sweep.
    pub fn sweep(&mut self, now: bool) {
        if now || self.kept.len() + self.slots.len() > 2 * self.swept_at + 64 {
            self.kept.retain(|s| Arc::strong_count(s) > 1);
            self.slots.retain(|_, slot| slot.strong_count() > 0);
            self.swept_at = self.kept.len() + self.slots.len();
        }
    }
}

/// One pod IP of the node.
pub struct ViewEntry {
    /// What the server sent.
    pub pod: ViewPod,
    /// The credentials of the pod's identity.
    slot: Arc<Slot>,
}

/// The credentials of one identity on this node, shared by its entries.
pub struct Slot {
    /// The identity's digest (`None`: an entry's own slot).
    identity: Option<Digest>,
    /// Read by every hit, so without a lock: a lock's word is written by each reader, and its
    /// cache line then moves between the cores that answer hits (figure 1).
    creds: ArcSwapOption<Held>,
    /// When to ask the server again (half-life, or later after a fetch that changed nothing or
    /// failed); `None` until credentials are held.
    renew_at: Mutex<Option<SystemTime>>,
    /// One fetch at a time per identity.
    pub fetching: tokio::sync::Mutex<()>,
}

impl Slot {
    fn new(identity: Option<Digest>) -> Slot {
        Slot {
            identity,
            creds: ArcSwapOption::empty(),
            renew_at: Mutex::default(),
            fetching: tokio::sync::Mutex::default(),
        }
    }
}

/// Credentials held for an entry: the document as the legacy credentials path serves it,
/// encoded once when stored (a hit then copies no strings and encodes nothing), sized to fit.
struct Held {
    body: Bytes,
    issued: SystemTime,
    expiration: SystemTime,
}

impl ViewEntry {
    /// Whether `entry` describes this very pod with the same identity, field for field (its
    /// credentials then stay).
    pub fn same_as(&self, entry: &pb::Entry) -> bool {
        self.pod.same_as(entry)
            && self.slot.identity.unwrap_or_default() == (entry.identity_high, entry.identity_low)
    }

    /// The slot of this entry's credentials (shared with the entries of its identity).
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    /// The lock a fetch of this entry's credentials holds (one per identity).
    pub fn fetching(&self) -> &tokio::sync::Mutex<()> {
        &self.slot.fetching
    }

    /// The pod's role annotation, `None` when it has none.
    pub fn role(&self) -> Option<&str> {
        Some(&*self.pod.role).filter(|r| !r.is_empty())
    }

    /// Credentials fit to serve at `now`: with more left than the floor the server serves with
    /// (the SDKs' 15-minute window, or half the session when it is shorter).
    pub fn credentials(&self, now: SystemTime) -> Option<ImdsDocument> {
        let held = self.slot.creds.load();
        held.as_ref().filter(|h| h.fresh(now)).and_then(|h| serde_json::from_slice(&h.body).ok())
    }

    /// The same credentials as [`credentials`](Self::credentials), under the same rule, as the
    /// JSON body the legacy credentials path serves (`serde_json::to_vec` of the document).
    /// Copied, not shared: a shared `Bytes` has a reference count that every hit would write.
    pub fn credentials_body(&self, now: SystemTime) -> Option<Bytes> {
        let held = self.slot.creds.load();
        held.as_ref().filter(|h| h.fresh(now)).map(|h| Bytes::copy_from_slice(&h.body))
    }

    /// Whether the background fetcher should ask for (new) credentials at `now`.
    pub fn due(&self, now: SystemTime) -> bool {
        self.pod.allowed && self.renew_at().is_none_or(|renew_at| now >= renew_at)
    }

    fn renew_at(&self) -> std::sync::MutexGuard<'_, Option<SystemTime>> {
        self.slot.renew_at.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Stores what the server answered. A document that changed nothing (the server has not
    /// renewed yet) is asked for again a minute later rather than at once.
    pub fn store(&self, document: ImdsDocument, now: SystemTime) {
        let parse = |t: &str| crate::creds::time::parse(t);
        let (Some(expiration), issued) = (parse(&document.expiration), parse(&document.last_updated)) else {
            return;
        };
        // The document is only strings: encoding it cannot fail, and if it did, nothing is held
        // (the next request fetches).
        let Ok(body) = serde_json::to_vec(&document) else { return };
        let issued = issued.unwrap_or(now).min(now);
        let mut renew_at = self.renew_at();
        let same = self.slot.creds.load().as_ref().is_some_and(|h| h.expiration == expiration);
        let half_life = issued + expiration.duration_since(issued).unwrap_or_default() / 2;
        *renew_at = Some(if same {
            now + Duration::from_secs(60)
        } else {
            half_life.max(now + Duration::from_secs(1))
        });
        let body = Bytes::from(body.into_boxed_slice());
        self.slot.creds.store(Some(Arc::new(Held { body, issued, expiration })));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_held_body_is_the_held_document_encoded_under_the_same_freshness_rule() {
        let entry = Strings::default().entry(pb::Entry { allowed: true, ..pb::Entry::default() });
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

    #[test]
    fn a_nodes_pods_share_their_repeated_strings_and_a_sweep_drops_the_unused() {
        let mut strings = Strings::default();
        let entry = |name: &str, role: &str| pb::Entry {
            uid: format!("uid-{name}"),
            namespace: "payments".into(),
            name: name.into(),
            role: role.into(),
            role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
            allowed: true,
            ..pb::Entry::default()
        };
        let a = strings.pod(entry("a", "checkout"));
        let b = strings.pod(entry("b", "checkout"));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace) && Arc::ptr_eq(&a.role, &b.role));
        assert!(Arc::ptr_eq(&a.role_arn, &b.role_arn));
        assert!(a.same_as(&entry("a", "checkout")) && !a.same_as(&entry("a", "other")));
        let c = strings.pod(entry("c", "other"));
        drop(c);
        strings.sweep(true);
        assert!(!strings.kept.contains("other") && strings.kept.contains("checkout"));
    }
}
