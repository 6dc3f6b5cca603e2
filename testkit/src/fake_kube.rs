//! An in-process fake Kubernetes API server that speaks the real list/watch protocol.
//!
//! kube-rs's `watcher`/`reflector`, its events `Recorder` and kubectl all run against it unchanged
//! (the protocol kube-rs, kubectl and the Python client rely on). It serves Pods, Namespaces and Events
//! (core v1 and `events.k8s.io/v1`) over plain HTTP/1 on `127.0.0.1:0`, keeps one global
//! resourceVersion counter and a change log that watches replay from, and lets the test force the
//! awkward paths: [`FakeKube::compact`] makes the next resumed watch fail with 410 Expired.
//!
//! This file holds the test-facing API and the object store. `fake_kube_http.rs` routes requests and
//! does reads, writes and discovery; `fake_kube_watch.rs` holds selectors and watch streams.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::serve::ListenerExt;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::apart::Apart;
use crate::fake_kube_auth::TokenIdentity;
use crate::fake_kube_http;
use crate::objects;

/// The first resourceVersion handed out; non-zero because "0" means "any version" to a client.
const FIRST_RV: u64 = 100;

/// A fake API server; the server and every open watch stop when this is dropped.
pub struct FakeKube {
    addr: SocketAddr,
    shared: Arc<Shared>,
    /// The runtime of its own it serves on ([`FakeKube::start_apart`]), if any.
    apart: Option<Apart>,
}

impl FakeKube {
    /// Binds `127.0.0.1:0` and starts serving on the current tokio runtime.
    pub async fn start() -> FakeKube {
        let listener =
            tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the fake API server on loopback");
        let addr = listener.local_addr().expect("a bound listener has an address");
        let shutdown = CancellationToken::new();
        let store = Store {
            rv: FIRST_RV,
            compacted: 0,
            objects: BTreeMap::new(),
            log: Vec::new(),
            requests: Vec::new(),
            watch_stop: shutdown.child_token(),
            watch_stall: CancellationToken::new(),
            next_uid: 0,
            tokens: std::collections::HashMap::new(),
        };
        let shared = Arc::new(Shared {
            store: Mutex::new(store),
            changed: tokio::sync::watch::channel(FIRST_RV).0,
            shutdown: shutdown.clone(),
            open_watches: AtomicUsize::new(0),
            down: std::sync::atomic::AtomicBool::new(false),
            keys_withheld: std::sync::atomic::AtomicBool::new(false),
        });
        let app = axum::Router::new().fallback(fake_kube_http::handle).with_state(shared.clone());
        // As a real API server does (Go sets TCP_NODELAY on every connection): without it, watch
        // events a few milliseconds apart wait behind Nagle's algorithm for the client's delayed
        // ACK, up to 40 ms each.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        tokio::spawn(async move {
            let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
            if let Err(error) = server.await {
                eprintln!("fake API server stopped: {error}");
            }
        });
        FakeKube { addr, shared, apart: None }
    }

    /// Starts serving on a runtime of its own ([`Apart`]), as a real API server runs apart from
    /// its clients: its watch streams then do not wait in the caller's task queues behind
    /// whatever the caller started. Callable from inside or outside a runtime.
    pub fn start_apart() -> FakeKube {
        let apart = Apart::new("fake-kube");
        let mut kube = apart.run(FakeKube::start());
        kube.apart = Some(apart);
        kube
    }

    /// The server's base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` (one cluster, a static-token user) and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\n\
             clusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user:\n    token: fake-token\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n",
            self.url()
        );
        std::fs::write(&path, text).expect("write the fake kubeconfig");
        path
    }

    /// The stored object, if any (`kind` is a core v1 kind).
    pub fn get(&self, kind: &str, namespace: Option<&str>, name: &str) -> Option<Value> {
        let resource = Resource::from_kind("v1", kind)?;
        let key = Key::new(resource, namespace.unwrap_or_default(), name);
        self.shared.lock().objects.get(&key).map(|stored| stored.object.clone())
    }

    /// Makes TokenReview accept `token` as `identity`.
    pub fn issue_token(&self, token: &str, identity: TokenIdentity) {
        self.shared.lock().tokens.insert(token.to_string(), identity);
    }

    /// Makes issuer discovery and the JWKS unavailable (503), as an API server whose
    /// `--service-account-jwks-uri` is unreachable: clients must fall back to TokenReview.
    pub fn withhold_keys(&self, withheld: bool) {
        self.shared.keys_withheld.store(withheld, std::sync::atomic::Ordering::SeqCst);
    }

    /// A kube client pointed at this server (must be called inside a tokio runtime).
    pub fn kube_client(&self) -> kube::Client {
        let url = self.url().parse().expect("the fake's URL is a valid URI");
        kube::Client::try_from(kube::Config::new(url)).expect("build a kube client for the fake")
    }

    /// Creates or replaces a Pod, Namespace or Event (by kind, namespace and name), as a controller
    /// would; watches see ADDED or MODIFIED. Returns the new resourceVersion.
    pub fn apply(&self, object: Value) -> String {
        let api_version = object["apiVersion"].as_str().unwrap_or("v1");
        let kind = object["kind"].as_str().expect("apply() needs an object with a kind");
        let resource = Resource::from_kind(api_version, kind)
            .unwrap_or_else(|| panic!("the fake does not store {api_version} {kind}"));
        let name = object["metadata"]["name"].as_str().expect("apply() needs metadata.name");
        let namespace = match resource.namespaced() {
            true => object["metadata"]["namespace"].as_str().unwrap_or("default"),
            false => "",
        };
        let key = Key::new(resource, namespace, name);
        let stored = self.shared.commit(|store| store.write(key, object));
        stored["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_owned()
    }

    /// Deletes a core v1 object by kind ("Pod", "Namespace", "Event"); watches see DELETED.
    /// Returns false if there was no such object.
    pub fn delete(&self, kind: &str, namespace: Option<&str>, name: &str) -> bool {
        let resource =
            Resource::from_kind("v1", kind).unwrap_or_else(|| panic!("the fake does not store v1 {kind}"));
        let key = Key::new(resource, namespace.unwrap_or_default(), name);
        self.shared.commit(|store| store.remove(&key)).is_some()
    }

    /// Compacts history: every resourceVersion handed out so far becomes too old to watch from, and
    /// every open watch is closed, so each watcher's resumed watch gets 410 Expired and it re-lists.
    ///
    /// The counter first advances by one (as unrelated writes do in a real cluster); otherwise a
    /// watcher whose last bookmark carried the current version could resume without noticing.
    pub fn compact(&self) {
        self.shared.commit(|store| {
            store.rv += 1;
            store.compacted = store.rv;
            store.log.clear();
            let fresh = self.shared.shutdown.child_token();
            std::mem::replace(&mut store.watch_stop, fresh).cancel();
        });
    }

    /// Takes the API server down (`true`: every request gets 503 and every open watch ends) or
    /// brings it back, with everything stored meanwhile.
    pub fn set_down(&self, down: bool) {
        self.shared.down.store(down, Ordering::SeqCst);
        if down {
            self.shared.commit(|store| {
                let fresh = self.shared.shutdown.child_token();
                std::mem::replace(&mut store.watch_stop, fresh).cancel();
            });
        }
    }

    /// Every open watch stops sending, and stays open: no event, no bookmark, no close, not
    /// even at its timeout. Watches opened later work.
    pub fn stall_watches(&self) {
        self.shared.commit(|store| std::mem::take(&mut store.watch_stall).cancel());
    }

    /// Every Event stored (`events.k8s.io/v1` and core v1) in creation order, patches merged in.
    pub fn events(&self) -> Vec<Value> {
        let store = self.shared.lock();
        let mut events: Vec<&Stored> = (store.objects.iter())
            .filter(|(key, _)| matches!(key.resource, Resource::Event | Resource::CoreEvent))
            .map(|(_, stored)| stored)
            .collect();
        events.sort_by_key(|stored| stored.created);
        events.into_iter().map(|stored| stored.object.clone()).collect()
    }

    /// Every request received so far, as `METHOD path?query` with the query as sent (percent-encoded).
    pub fn requests(&self) -> Vec<String> {
        self.shared.lock().requests.clone()
    }

    /// How many watch streams are open right now.
    pub fn watch_count(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
        drop(self.apart.take());
    }
}

// === Store ===

/// The kinds of object the fake stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Resource {
    Pod,
    Namespace,
    ServiceAccount,
    Node,
    /// Core v1 Event (`/api/v1/namespaces/{ns}/events`).
    CoreEvent,
    /// `events.k8s.io/v1` Event, which kube's `Recorder` writes.
    Event,
}

impl Resource {
    pub(crate) fn from_kind(api_version: &str, kind: &str) -> Option<Resource> {
        match (api_version, kind) {
            ("v1", "Pod") => Some(Resource::Pod),
            ("v1", "Namespace") => Some(Resource::Namespace),
            ("v1", "ServiceAccount") => Some(Resource::ServiceAccount),
            ("v1", "Node") => Some(Resource::Node),
            ("v1", "Event") => Some(Resource::CoreEvent),
            ("events.k8s.io/v1", "Event") => Some(Resource::Event),
            _ => None,
        }
    }

    pub(crate) fn kind(self) -> &'static str {
        match self {
            Resource::Pod => "Pod",
            Resource::Namespace => "Namespace",
            Resource::ServiceAccount => "ServiceAccount",
            Resource::Node => "Node",
            Resource::CoreEvent | Resource::Event => "Event",
        }
    }

    pub(crate) fn api_version(self) -> &'static str {
        match self {
            Resource::Event => "events.k8s.io/v1",
            _ => "v1",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        !matches!(self, Resource::Namespace | Resource::Node)
    }
}

/// Where an object lives: resource, namespace ("" when cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Key {
    pub(crate) resource: Resource,
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl Key {
    pub(crate) fn new(resource: Resource, namespace: &str, name: &str) -> Key {
        let namespace = if resource.namespaced() { namespace } else { "" };
        Key { resource, namespace: namespace.to_owned(), name: name.to_owned() }
    }
}

pub(crate) struct Stored {
    pub(crate) object: Value,
    /// The resourceVersion of the create, kept across replaces, to order `events()`.
    created: u64,
}

/// What a change did, as a watch event type before selectors are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeKind {
    Added,
    Modified,
    Deleted,
}

/// One entry of the change log that watches replay from.
pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) resource: Resource,
    pub(crate) kind: ChangeKind,
    /// The new state; for a delete, the last state with the delete's resourceVersion.
    pub(crate) object: Value,
    /// The state before a modify, so a selector watch can tell "stopped matching" from "changed".
    pub(crate) previous: Option<Value>,
}

pub(crate) struct Store {
    pub(crate) rv: u64,
    /// Watches from a resourceVersion below this mark get 410 Expired.
    pub(crate) compacted: u64,
    pub(crate) objects: BTreeMap<Key, Stored>,
    /// Changes after `compacted`, in resourceVersion order.
    pub(crate) log: Vec<Change>,
    pub(crate) requests: Vec<String>,
    /// Cancelled (and replaced) by `compact()`; every watch holds a clone.
    pub(crate) watch_stop: CancellationToken,
    /// Cancelled (and replaced) by `stall_watches()`: the watches holding it go silent.
    pub(crate) watch_stall: CancellationToken,
    next_uid: u64,
    /// Tokens TokenReview knows.
    pub(crate) tokens: std::collections::HashMap<String, TokenIdentity>,
}

impl Store {
    /// Creates or replaces `key`, stamping resourceVersion (and uid/creationTimestamp on create).
    pub(crate) fn write(&mut self, key: Key, mut object: Value) -> Value {
        self.rv += 1;
        let previous = self.objects.get(&key);
        let meta = &mut object["metadata"];
        meta["name"] = json!(key.name);
        if key.resource.namespaced() {
            meta["namespace"] = json!(key.namespace);
        } else if let Some(fields) = meta.as_object_mut() {
            fields.remove("namespace");
        }
        meta["resourceVersion"] = json!(self.rv.to_string());
        // kubectl sends `"creationTimestamp": null`, so replace nulls rather than only filling gaps.
        for (field, fresh) in [("uid", None), ("creationTimestamp", Some(objects::now()))] {
            let kept = previous.map(|stored| stored.object["metadata"][field].clone());
            meta[field] = match (kept, meta[field].as_str()) {
                (Some(kept), _) if !kept.is_null() => kept,
                (_, Some(given)) if !given.is_empty() => json!(given),
                _ => json!(fresh.unwrap_or_else(|| {
                    self.next_uid += 1;
                    format!("fa4e0000-0000-4000-8000-{:012x}", self.next_uid)
                })),
            };
        }
        object["apiVersion"] = json!(key.resource.api_version());
        object["kind"] = json!(key.resource.kind());
        let created = previous.map_or(self.rv, |stored| stored.created);
        let previous = previous.map(|stored| stored.object.clone());
        self.log.push(Change {
            rv: self.rv,
            resource: key.resource,
            kind: if previous.is_some() { ChangeKind::Modified } else { ChangeKind::Added },
            object: object.clone(),
            previous,
        });
        self.objects.insert(key, Stored { object: object.clone(), created });
        object
    }

    /// Deletes `key`, returning its last state (with the delete's resourceVersion).
    pub(crate) fn remove(&mut self, key: &Key) -> Option<Value> {
        let mut object = self.objects.remove(key)?.object;
        self.rv += 1;
        object["metadata"]["resourceVersion"] = json!(self.rv.to_string());
        self.log.push(Change {
            rv: self.rv,
            resource: key.resource,
            kind: ChangeKind::Deleted,
            object: object.clone(),
            previous: None,
        });
        Some(object)
    }
}

/// State shared by the test handle, the request handlers and the watch streams.
pub(crate) struct Shared {
    store: Mutex<Store>,
    /// Carries the latest resourceVersion; watch streams wait on it for new changes.
    pub(crate) changed: tokio::sync::watch::Sender<u64>,
    /// Stops the server and every watch (on drop of `FakeKube`).
    shutdown: CancellationToken,
    pub(crate) open_watches: AtomicUsize,
    /// Set by [`FakeKube::set_down`]: every request fails with 503.
    pub(crate) down: std::sync::atomic::AtomicBool,
    /// Set by [`FakeKube::withhold_keys`]: issuer discovery and the JWKS answer 503.
    pub(crate) keys_withheld: std::sync::atomic::AtomicBool,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Store> {
        // A panicking test thread must not turn every later request into a second panic.
        self.store.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a write under the lock, then wakes the watch streams.
    pub(crate) fn commit<T>(&self, write: impl FnOnce(&mut Store) -> T) -> T {
        let (result, rv) = {
            let mut store = self.lock();
            let result = write(&mut store);
            (result, store.rv)
        };
        self.changed.send_replace(rv);
        result
    }
}
