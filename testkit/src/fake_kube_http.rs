//! Request handling for the fake API server: routing, reads and writes, and discovery.
//!
//! Every answer is JSON; errors are `kind: Status` bodies with the HTTP code repeated in `code`, as
//! kube's client expects. Watches are handed to `fake_kube_watch.rs`.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use serde_json::{Value, json};

use crate::fake_kube::{Key, Resource, Shared};
use crate::fake_kube_watch::{self as watch, Filter};

/// An API error, sent as a `kind: Status` body with the same HTTP code.
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn new(code: u16, reason: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { code, reason, message: message.into() }
    }

    pub(crate) fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": self.reason, "code": self.code, "message": self.message})
    }
}

pub(crate) fn respond(code: u16, body: &Value) -> Response {
    let bytes = serde_json::to_vec(body).expect("a JSON value always serializes");
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(bytes))
        .expect("status and header are valid")
}

/// What a request path names.
enum Target {
    /// A fixed discovery document.
    Document(Value),
    /// A collection, optionally limited to one namespace.
    Collection(Resource, Option<String>),
    Object(Key),
    /// TokenReview.
    TokenReview,
    /// Issuer discovery (`true`) or the JWKS (`false`).
    Keys(bool),
}

pub(crate) async fn handle(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let path_and_query = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    shared.lock().requests.push(format!("{} {path_and_query}", parts.method));
    if shared.down.load(std::sync::atomic::Ordering::SeqCst) {
        let error = ApiError::new(503, "ServiceUnavailable", "the API server is down");
        return respond(error.code, &error.status());
    }
    // Always drain the body: DELETE carries DeleteOptions, and unread bytes break keep-alive.
    let body = axum::body::to_bytes(body, 16 << 20).await;
    let query = Query::<HashMap<String, String>>::try_from_uri(&parts.uri);
    let result = match (body, query) {
        (Ok(body), Ok(Query(query))) => {
            serve(&shared, &parts.method, &parts.headers, parts.uri.path(), &query, &body)
        }
        (Err(error), _) => Err(ApiError::new(400, "BadRequest", format!("reading the body: {error}"))),
        (_, Err(error)) => Err(ApiError::new(400, "BadRequest", format!("bad query: {error}"))),
    };
    result.unwrap_or_else(|error| respond(error.code, &error.status()))
}

fn serve(
    shared: &Arc<Shared>,
    method: &Method,
    headers: &HeaderMap,
    path: &str,
    query: &HashMap<String, String>,
    body: &[u8],
) -> Result<Response, ApiError> {
    let not_found = || {
        ApiError::new(404, "NotFound", format!("the server could not find the requested resource ({path})"))
    };
    let target = route(path, headers).ok_or_else(not_found)?;
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    match (target, method.as_str()) {
        (Target::Document(document), "GET") => Ok(respond(200, &document)),
        (Target::TokenReview, "POST") => crate::fake_kube_auth::token_review(shared, headers, body),
        (Target::Keys(discovery), "GET") => crate::fake_kube_auth::keys(shared, headers, discovery),
        (Target::Collection(resource, namespace), "GET") if watching => {
            watch::watch(shared, resource, namespace, query)
        }
        (Target::Collection(resource, namespace), "GET") => list(shared, resource, namespace, query),
        (Target::Collection(resource, Some(namespace)), "POST") => {
            create(shared, Key::new(resource, &namespace, ""), body)
        }
        (Target::Collection(Resource::Namespace, None), "POST") => {
            create(shared, Key::new(Resource::Namespace, "", ""), body)
        }
        (Target::Object(key), "GET") => get(shared, &key),
        (Target::Object(key), "PUT") => update(shared, key, body, |_, new| Ok(new)),
        (Target::Object(key), "PATCH") => {
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|value| value.to_str().ok());
            if !content_type.is_some_and(|ct| ct.contains("merge-patch+json")) {
                let message = format!("the fake only supports merge patches, not {content_type:?}");
                return Err(ApiError::new(415, "UnsupportedMediaType", message));
            }
            update(shared, key, body, |mut old, patch| {
                merge_patch(&mut old, &patch);
                Ok(old)
            })
        }
        (Target::Object(key), "DELETE") => {
            let deleted = shared.commit(|store| store.remove(&key)).ok_or_else(|| missing(&key))?;
            Ok(respond(200, &deleted))
        }
        (_, method) => {
            Err(ApiError::new(405, "MethodNotAllowed", format!("{method} is not supported on {path}")))
        }
    }
}

fn route(path: &str, headers: &HeaderMap) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segments.as_slice() {
        ["api" | "apis" | "version"] | ["api", "v1"] | ["apis", "events.k8s.io", "v1"] => {
            let host = headers.get(header::HOST).and_then(|value| value.to_str().ok()).unwrap_or_default();
            return discovery(path.trim_matches('/'), host).map(Target::Document);
        }
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => return Some(Target::TokenReview),
        [".well-known", "openid-configuration"] => return Some(Target::Keys(true)),
        ["openid", "v1", "jwks"] => return Some(Target::Keys(false)),
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "events.k8s.io", "v1", rest @ ..] => ("events.k8s.io", rest),
        _ => return None,
    };
    let resource = |plural: &str| match (group, plural) {
        ("", "pods") => Some(Resource::Pod),
        ("", "serviceaccounts") => Some(Resource::ServiceAccount),
        ("", "nodes") => Some(Resource::Node),
        ("", "namespaces") => Some(Resource::Namespace),
        ("", "events") => Some(Resource::CoreEvent),
        ("events.k8s.io", "events") => Some(Resource::Event),
        _ => None,
    };
    let namespaced = |plural| resource(plural).filter(|resource| resource.namespaced());
    Some(match rest {
        [plural] => Target::Collection(resource(plural)?, None),
        ["namespaces", name] if group.is_empty() => Target::Object(Key::new(Resource::Namespace, "", name)),
        ["nodes", name] if group.is_empty() => Target::Object(Key::new(Resource::Node, "", name)),
        ["namespaces", namespace, plural] => {
            Target::Collection(namespaced(plural)?, Some(namespace.to_string()))
        }
        ["namespaces", namespace, plural, name] => {
            Target::Object(Key::new(namespaced(plural)?, namespace, name))
        }
        _ => return None,
    })
}

fn missing(key: &Key) -> ApiError {
    let plural = key.resource.kind().to_lowercase();
    ApiError::new(404, "NotFound", format!("{plural}s \"{}\" not found", key.name))
}

/// Parses a request body as a JSON object whose `metadata`, if present, is an object too.
fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    let object: Value = serde_json::from_slice(body).map_err(|error| {
        ApiError::new(400, "BadRequest", format!("the fake only accepts JSON bodies: {error}"))
    })?;
    let meta = &object["metadata"];
    if !object.is_object() || !(meta.is_object() || meta.is_null()) {
        return Err(ApiError::new(400, "BadRequest", "the body must be an object with object metadata"));
    }
    Ok(object)
}

fn get(shared: &Shared, key: &Key) -> Result<Response, ApiError> {
    let store = shared.lock();
    let stored = store.objects.get(key).ok_or_else(|| missing(key))?;
    Ok(respond(200, &stored.object))
}

/// POST to a collection: 201, or 409 AlreadyExists. `key.name` is empty; the body names the object.
fn create(shared: &Shared, mut key: Key, body: &[u8]) -> Result<Response, ApiError> {
    let object = parse_object(body)?;
    let meta = &object["metadata"];
    if let Some(namespace) =
        meta["namespace"].as_str().filter(|ns| key.resource.namespaced() && *ns != key.namespace)
    {
        let message =
            format!("the namespace of the object ({namespace}) does not match the namespace on the request");
        return Err(ApiError::new(400, "BadRequest", message));
    }
    let (name, prefix) =
        (meta["name"].as_str().map(str::to_owned), meta["generateName"].as_str().map(str::to_owned));
    shared.commit(|store| {
        key.name = match (name, prefix) {
            (Some(name), _) if !name.is_empty() => name,
            (_, Some(prefix)) => format!("{prefix}{:05x}", store.rv + 1),
            _ => {
                return Err(ApiError::new(422, "Invalid", "name or generateName is required"));
            }
        };
        if store.objects.contains_key(&key) {
            let message = format!("{}s \"{}\" already exists", key.resource.kind().to_lowercase(), key.name);
            return Err(ApiError::new(409, "AlreadyExists", message));
        }
        Ok(respond(201, &store.write(key, object)))
    })
}

/// PUT or PATCH: combines the stored object with the body, honouring a resourceVersion precondition.
fn update(
    shared: &Shared,
    key: Key,
    body: &[u8],
    combine: impl FnOnce(Value, Value) -> Result<Value, ApiError>,
) -> Result<Response, ApiError> {
    let body = parse_object(body)?;
    shared.commit(|store| {
        let old = store.objects.get(&key).ok_or_else(|| missing(&key))?.object.clone();
        let wanted = body["metadata"]["resourceVersion"].as_str().filter(|rv| !rv.is_empty());
        if wanted.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
            let message = "the object has been modified; please apply your changes to the latest version";
            return Err(ApiError::new(409, "Conflict", message));
        }
        let mut new = combine(old.clone(), body)?;
        if !new["metadata"].is_object() {
            new["metadata"] = json!({});
        }
        for field in ["uid", "creationTimestamp"] {
            new["metadata"][field] = old["metadata"][field].clone();
        }
        Ok(respond(200, &store.write(key, new)))
    })
}

/// RFC 7386 JSON merge patch: objects merge key by key, `null` deletes, anything else replaces.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            match value {
                Value::Null => _ = target.remove(key),
                _ => merge_patch(target.entry(key.clone()).or_insert(Value::Null), value),
            }
        }
    }
}

/// A list: every matching object at the current resourceVersion. With `limit` (kube's watcher
/// asks for 500), one page and a `continue` token naming the last key served, as the real server
/// pages; the next page starts after that key. Unlike the real server, later pages come from the
/// current state rather than the first page's snapshot, which is the same while nothing changes.
fn list(
    shared: &Shared,
    resource: Resource,
    namespace: Option<String>,
    query: &HashMap<String, String>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(resource, namespace.as_deref(), query)?;
    let limit = query.get("limit").and_then(|limit| limit.parse::<usize>().ok()).filter(|limit| *limit > 0);
    let start = match query.get("continue").filter(|token| !token.is_empty()) {
        Some(token) => {
            let (namespace, name) = token.split_once('/').ok_or_else(|| {
                ApiError::new(400, "BadRequest", format!("invalid continue token {token:?}"))
            })?;
            Bound::Excluded(Key::new(resource, namespace, name))
        }
        None => Bound::Included(Key::new(resource, "", "")),
    };
    let store = shared.lock();
    let exact = query.get("resourceVersionMatch").is_some_and(|semantic| semantic == "Exact");
    let wanted = query.get("resourceVersion").and_then(|rv| rv.parse::<u64>().ok());
    if let Some(wanted) = wanted.filter(|wanted| exact && *wanted < store.compacted) {
        return Err(expired(wanted, store.compacted));
    }
    let (mut items, mut next) = (Vec::new(), None);
    let matching = (store.objects.range((start, Bound::Unbounded)))
        .take_while(|(key, _)| key.resource == resource)
        .filter(|(_, stored)| filter.matches(&stored.object));
    let mut last: Option<&Key> = None;
    for (key, stored) in matching {
        if limit.is_some_and(|limit| items.len() == limit) {
            next = last.map(|key| format!("{}/{}", key.namespace, key.name));
            break;
        }
        // The real server leaves apiVersion and kind off list items.
        let mut item = stored.object.clone();
        if let Some(fields) = item.as_object_mut() {
            fields.remove("apiVersion");
            fields.remove("kind");
        }
        items.push(item);
        last = Some(key);
    }
    let list_kind = format!("{}List", resource.kind());
    let mut metadata = json!({"resourceVersion": store.rv.to_string()});
    if let Some(token) = next {
        metadata["continue"] = json!(token);
    }
    let body = json!({"kind": list_kind, "apiVersion": resource.api_version(), "metadata": metadata, "items": items});
    Ok(respond(200, &body))
}

pub(crate) fn expired(wanted: u64, compacted: u64) -> ApiError {
    ApiError::new(410, "Expired", format!("too old resource version: {wanted} ({compacted})"))
}

/// The discovery documents kubectl reads: `/api`, `/apis`, `/api/v1`, `/apis/events.k8s.io/v1`
/// and `/version`. (kube-rs needs none of them for typed `Api`s.)
fn discovery(path: &str, host: &str) -> Option<Value> {
    let resource = |name: &str, kind: &str, namespaced: bool, verbs: &[&str], short: &[&str]| {
        json!({"name": name, "singularName": kind.to_lowercase(), "kind": kind, "namespaced": namespaced,
               "verbs": verbs, "shortNames": short})
    };
    let all = ["create", "delete", "get", "list", "patch", "update", "watch"];
    let events = resource("events", "Event", true, &all, &["ev"]);
    let group_version = json!({"groupVersion": "events.k8s.io/v1", "version": "v1"});
    Some(match path {
        "api" => json!({"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}),
        "apis" => {
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": [{"name": "events.k8s.io",
            "versions": [group_version], "preferredVersion": group_version}]})
        }
        "api/v1" => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
            resource("pods", "Pod", true, &all, &["po"]),
            resource("namespaces", "Namespace", false, &all, &["ns"]),
            events,
        ]}),
        "apis/events.k8s.io/v1" => {
            json!({"kind": "APIResourceList", "groupVersion": "events.k8s.io/v1", "resources": [events]})
        }
        "version" => {
            json!({"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "platform": "linux/amd64"})
        }
        _ => return None,
    })
}
