//! Selectors and watch streams for the fake API server.
//!
//! A watch is a chunked `application/json` response with one event per line, sent with
//! `Connection: close` (hyper would otherwise reuse a socket the server is about to drop). It replays
//! the change log after the requested resourceVersion, then follows new changes, translating them
//! through the selectors the way the real watch cache does: an object that starts matching arrives
//! as ADDED and one that stops matching as DELETED.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::Response;
use serde_json::{Value, json};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};
use tokio_util::sync::CancellationToken;

use crate::fake_kube::{Change, ChangeKind, Resource, Shared};
use crate::fake_kube_http::{ApiError, expired};

/// kube's default watch timeout, used when the request names none.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(290);
/// How often a watch that allows bookmarks gets one (the first goes out right away).
const BOOKMARK_PERIOD: Duration = Duration::from_secs(1);

/// One requirement of a `fieldSelector` or `labelSelector`.
enum Requirement {
    /// A field (JSON pointer; missing reads as "") equals, or not, a value.
    Field { pointer: String, value: String, equal: bool },
    /// A label's value is, or is not, one of `values`; a missing label is never "in".
    Label { key: String, values: Vec<String>, within: bool },
    /// A label is present, or absent.
    LabelExists { key: String, present: bool },
}

/// The conjunction of a request's namespace, field selector and label selector.
pub(crate) struct Filter(Vec<Requirement>);

impl Filter {
    pub(crate) fn parse(
        resource: Resource,
        namespace: Option<&str>,
        query: &HashMap<String, String>,
    ) -> Result<Filter, ApiError> {
        let bad = |message: String| ApiError::new(400, "BadRequest", message);
        let mut requirements = Vec::new();
        if let Some(namespace) = namespace {
            let (pointer, value) = ("/metadata/namespace".to_owned(), namespace.to_owned());
            requirements.push(Requirement::Field { pointer, value, equal: true });
        }
        let fields = query.get("fieldSelector").map_or("", String::as_str);
        for term in fields.split(',').map(str::trim).filter(|term| !term.is_empty()) {
            let (field, value, equal) = if let Some((field, value)) = term.split_once("!=") {
                (field, value, false)
            } else if let Some((field, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (field, value, true)
            } else {
                return Err(bad(format!("invalid field selector term {term:?}")));
            };
            let field = field.trim();
            if !supported_field(resource, field) {
                return Err(bad(format!("field label not supported: {field}")));
            }
            let pointer = format!("/{}", field.replace('.', "/"));
            requirements.push(Requirement::Field { pointer, value: value.trim().to_owned(), equal });
        }
        let labels = query.get("labelSelector").map_or("", String::as_str);
        for term in split_outside_parens(labels) {
            requirements
                .push(parse_label_term(term).ok_or_else(|| bad(format!("invalid label selector {term:?}")))?);
        }
        Ok(Filter(requirements))
    }

    pub(crate) fn matches(&self, object: &Value) -> bool {
        let labels = &object["metadata"]["labels"];
        self.0.iter().all(|requirement| match requirement {
            Requirement::Field { pointer, value, equal } => {
                let actual = match object.pointer(pointer) {
                    Some(Value::String(text)) => text.clone(),
                    Some(Value::Null) | None => String::new(),
                    Some(other) => other.to_string(),
                };
                (actual == *value) == *equal
            }
            Requirement::Label { key, values, within } => {
                let actual = labels[key].as_str();
                actual.is_some_and(|actual| values.iter().any(|value| value == actual)) == *within
            }
            Requirement::LabelExists { key, present } => labels[key].is_string() == *present,
        })
    }

    /// How one logged change looks to a watch with this filter, if it sees it at all.
    fn translate(&self, change: &Change) -> Option<(&'static str, Value)> {
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|previous| self.matches(previous));
        match (change.kind, before, now) {
            (ChangeKind::Added, _, true) | (ChangeKind::Modified, false, true) => {
                Some(("ADDED", change.object.clone()))
            }
            (ChangeKind::Modified, true, true) => Some(("MODIFIED", change.object.clone())),
            (ChangeKind::Deleted, _, true) => Some(("DELETED", change.object.clone())),
            (ChangeKind::Modified, true, false) => {
                // As the real watch cache does: the old content, at the new resourceVersion.
                let mut gone = change.previous.clone()?;
                gone["metadata"]["resourceVersion"] = json!(change.rv.to_string());
                Some(("DELETED", gone))
            }
            _ => None,
        }
    }
}

/// The fields the real API server lets each resource be selected by.
fn supported_field(resource: Resource, field: &str) -> bool {
    matches!(field, "metadata.name" | "metadata.namespace")
        || match resource {
            Resource::Pod => matches!(field, "spec.nodeName" | "status.podIP" | "status.phase"),
            Resource::Namespace => field == "status.phase",
            Resource::ServiceAccount | Resource::Node => false,
            Resource::CoreEvent => {
                field == "reason" || field == "type" || field.starts_with("involvedObject.")
            }
            Resource::Event => field == "reason" || field == "type" || field.starts_with("regarding."),
        }
}

/// Splits a label selector at the commas that separate terms (not those inside `in (a,b)`).
fn split_outside_parens(selector: &str) -> Vec<&str> {
    let (mut terms, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (at, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms.into_iter().map(str::trim).filter(|term| !term.is_empty()).collect()
}

fn parse_label_term(term: &str) -> Option<Requirement> {
    let key = |key: &str| Some(key.trim().to_owned()).filter(|key| !key.is_empty() && !key.contains(' '));
    if let Some((name, set)) = term.split_once('(') {
        let (name, operator) = name.trim().rsplit_once(' ')?;
        let within = match operator {
            "in" => true,
            "notin" => false,
            _ => return None,
        };
        let values = set.strip_suffix(')')?.split(',').map(|value| value.trim().to_owned()).collect();
        return Some(Requirement::Label { key: key(name)?, values, within });
    }
    let (name, value, within) = if let Some((name, value)) = term.split_once("!=") {
        (name, value, false)
    } else if let Some((name, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        (name, value, true)
    } else if let Some(name) = term.strip_prefix('!') {
        return Some(Requirement::LabelExists { key: key(name)?, present: false });
    } else {
        return Some(Requirement::LabelExists { key: key(term)?, present: true });
    };
    Some(Requirement::Label { key: key(name)?, values: vec![value.trim().to_owned()], within })
}

/// Starts a watch stream; see the module docs for what it sends.
pub(crate) fn watch(
    shared: &Arc<Shared>,
    resource: Resource,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(resource, namespace.as_deref(), query)?;
    let bad = |message: String| ApiError::new(400, "BadRequest", message);
    let from = match query.get("resourceVersion").map(String::as_str) {
        None | Some("" | "0") => None,
        Some(rv) => Some(rv.parse::<u64>().map_err(|_| bad(format!("invalid resourceVersion {rv:?}")))?),
    };
    let seconds = match query.get("timeoutSeconds") {
        Some(seconds) => seconds.parse().map_err(|_| bad(format!("invalid timeoutSeconds {seconds:?}")))?,
        None => 0,
    };
    // As on the real server, no timeout (or 0) means the server's default.
    let timeout =
        Some(Duration::from_secs(seconds)).filter(|t| !t.is_zero()).unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let flag = |name: &str| matches!(query.get(name).map(String::as_str), Some("true" | "1"));
    let initial_events = flag("sendInitialEvents");
    let mut first = Vec::new();
    let mut done = false;
    let (cursor, stop) = {
        let store = shared.lock();
        match from {
            Some(wanted) if wanted < store.compacted => {
                let error = expired(wanted, store.compacted).status();
                push_line(&mut first, "ERROR", &error);
                done = true;
            }
            Some(_) if !initial_events => {}
            _ => {
                let current = store.objects.iter().filter(|(key, _)| key.resource == resource);
                for (_, stored) in current.filter(|(_, stored)| filter.matches(&stored.object)) {
                    push_line(&mut first, "ADDED", &stored.object);
                }
                if initial_events {
                    let annotations = json!({"k8s.io/initial-events-end": "true"});
                    push_line(&mut first, "BOOKMARK", &bookmark(resource, store.rv, annotations));
                }
            }
        }
        let cursor = from.filter(|_| !initial_events).unwrap_or(store.rv);
        (cursor, (store.watch_stop.clone(), store.watch_stall.clone()))
    };
    let (stop, stall) = stop;
    shared.open_watches.fetch_add(1, Ordering::SeqCst);
    let mut bookmarks = tokio::time::interval(BOOKMARK_PERIOD);
    bookmarks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let stream = WatchStream {
        shared: shared.clone(),
        resource,
        filter,
        cursor,
        first: Some(first).filter(|first| !first.is_empty()),
        done,
        bookmarks: flag("allowWatchBookmarks").then_some(bookmarks),
        deadline: Box::pin(tokio::time::sleep_until(Instant::now() + timeout)),
        changed: shared.changed.subscribe(),
        stop,
        stall,
    };
    let body = futures::stream::unfold(stream, |mut stream| async move {
        let chunk = stream.next_chunk().await?;
        Some((Ok::<_, Infallible>(Bytes::from(chunk)), stream))
    });
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONNECTION, "close")
        .body(Body::from_stream(body))
        .expect("status and headers are valid"))
}

/// The state of one open watch; dropping it (the client went away, or the stream ended) closes it.
struct WatchStream {
    shared: Arc<Shared>,
    resource: Resource,
    filter: Filter,
    /// Every change up to here has been sent (or filtered out).
    cursor: u64,
    /// Synthetic ADDED events or the 410 error, sent before anything else.
    first: Option<Vec<u8>>,
    /// Nothing follows `first` (the watch was expired).
    done: bool,
    bookmarks: Option<Interval>,
    deadline: Pin<Box<Sleep>>,
    changed: tokio::sync::watch::Receiver<u64>,
    /// Cancelled by `compact()` and by dropping the `FakeKube`.
    stop: CancellationToken,
    /// Cancelled by `stall_watches()`: from then on the watch sends nothing until stopped.
    stall: CancellationToken,
}

impl WatchStream {
    async fn next_chunk(&mut self) -> Option<Vec<u8>> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        loop {
            if self.done {
                return None;
            }
            if self.stall.is_cancelled() {
                self.stop.cancelled().await;
                return None;
            }
            let chunk = self.drain();
            if !chunk.is_empty() {
                return Some(chunk);
            }
            let bookmarks = &mut self.bookmarks;
            let tick = async move {
                match bookmarks {
                    Some(interval) => _ = interval.tick().await,
                    None => std::future::pending().await,
                }
            };
            let bookmark_due = tokio::select! {
                _ = self.stop.cancelled() => None,
                _ = self.stall.cancelled() => continue,
                _ = self.deadline.as_mut() => None,
                changed = self.changed.changed() => changed.ok().map(|()| false),
                _ = tick => Some(true),
            };
            match bookmark_due {
                None => return None,
                Some(false) => continue,
                Some(true) => {}
            }
            let mut chunk = Vec::new();
            push_line(&mut chunk, "BOOKMARK", &bookmark(self.resource, self.cursor, json!({})));
            return Some(chunk);
        }
    }

    /// The lines for every logged change after the cursor, which moves to the current version.
    fn drain(&mut self) -> Vec<u8> {
        let store = self.shared.lock();
        let start = store.log.partition_point(|change| change.rv <= self.cursor);
        let mut chunk = Vec::new();
        for change in store.log[start..].iter().filter(|change| change.resource == self.resource) {
            if let Some((kind, object)) = self.filter.translate(change) {
                push_line(&mut chunk, kind, &object);
            }
        }
        self.cursor = self.cursor.max(store.rv);
        chunk
    }
}

impl Drop for WatchStream {
    fn drop(&mut self) {
        self.shared.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

fn bookmark(resource: Resource, rv: u64, annotations: Value) -> Value {
    let metadata = json!({"resourceVersion": rv.to_string(), "annotations": annotations});
    json!({"kind": resource.kind(), "apiVersion": resource.api_version(), "metadata": metadata})
}

fn push_line(chunk: &mut Vec<u8>, kind: &str, object: &Value) {
    let event = json!({"type": kind, "object": object});
    chunk.extend(serde_json::to_vec(&event).expect("a JSON value always serializes"));
    chunk.push(b'\n');
}
