//! The answers the agent writes itself: the pod's role, its credentials (legacy and extended),
//! `iam/info`, and `/health`. Each is answered from the node view when the pod is in it (one
//! lookup of the view per request: role, verdict and credentials all come from that entry), and
//! otherwise asks the [`Backend`] within the request's budget. Either way a failure reaches the
//! pod through [`answer`], as the backend's would.

use std::borrow::Cow;
use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use std::sync::Arc;

use super::documents::{ExtendedDocument, IamInfo, role_account};
use super::error::{AgentError, Endpoint, answer};
use super::view::sync::fetch;
use super::view::{Lookup, ViewEntry};
use super::{Agent, Backend, BackendError};
use crate::creds::ImdsDocument;
use crate::metrics::Handler;
use crate::model::listed_name;

/// Calls `f` until it succeeds, fails for good, or `budget` runs out: a pod the server has not
/// seen yet, or a server that is briefly unreachable, is waited for instead of failing at once.
/// Policy denials are final and never retried. The budget bounds the whole, not each attempt: an
/// attempt still running when it ends is dropped, and the last failure (or, with none yet,
/// "unavailable") is the answer, so a pod is answered within `--pod-wait-timeout` however long
/// one call to a server may wait.
pub async fn with_budget<T, F, Fut>(budget: Duration, mut f: F) -> Result<T, BackendError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, BackendError>>,
{
    let deadline = tokio::time::Instant::now() + budget;
    let mut delay = Duration::from_millis(5);
    let mut last = None;
    loop {
        let Ok(result) = tokio::time::timeout_at(deadline, f()).await else {
            return Err(
                last.unwrap_or_else(|| BackendError::Unavailable("no answer within the pod wait".into()))
            );
        };
        match result {
            Err(e) if e.is_transient() && tokio::time::Instant::now() + delay < deadline => {
                last = Some(e);
                tokio::time::sleep(delay).await;
                delay = (delay * 3 / 2).min(Duration::from_millis(250));
            }
            other => return other,
        }
    }
}

/// What answers for one request: the pod's entry in the node view, or the backend.
enum Source {
    Entry(Arc<ViewEntry>),
    Backend,
}

/// Looks the caller up in the node view once. A live view waits (bounded) for a pod it does not
/// have yet and then says there is none; a view that is not synced, or is down and lacks the IP,
/// defers to the backend.
async fn source<B>(agent: &Agent<B>, ip: IpAddr) -> Result<Source, AgentError> {
    let Some(node) = &agent.view else { return Ok(Source::Backend) };
    match node.view.lookup(ip, tokio::time::Instant::now() + agent.pod_wait).await {
        Lookup::Entry(entry) => Ok(Source::Entry(entry)),
        Lookup::NoPod => Err(answer(BackendError::PodNotFound, Endpoint::Metadata(ip))),
        Lookup::Unknown => Ok(Source::Backend),
    }
}

/// The pod's role (borrowed from a view entry: a hit copies no string) and its identity's key
/// among the servers (see [`super::PodRole`]); `handler` labels kiam's `find_role_errors` and
/// `empty_role` counters.
async fn pod_role<'s, B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    source: &'s Source,
    handler: &'static str,
) -> Result<(Cow<'s, str>, u64), AgentError> {
    let label = Handler { handler };
    let role = match source {
        Source::Entry(entry) => entry.role().map(|role| (Cow::Borrowed(role), entry.pod.affinity)),
        // Boxed, as every call to the servers below: a hit's future stays small (figure 1).
        Source::Backend => Box::pin(with_budget(agent.pod_wait, || agent.backend.pod_role(ip)))
            .await
            .map_err(|e| {
                agent.metrics.agent.find_role_errors.get_or_create(&label).inc();
                answer(e, Endpoint::Metadata(ip))
            })?
            .map(|role| (Cow::Owned(role.name), role.affinity)),
    };
    role.ok_or_else(|| {
        agent.metrics.agent.empty_role.get_or_create(&label).inc();
        AgentError::NotFound("no role annotated for this pod".into())
    })
}

/// Credentials for `role` from the pod's view entry: held ones when fresh (a hit, no network
/// call), else fetched now for exactly that pod.
async fn entry_credentials<B>(
    agent: &Agent<B>,
    ip: IpAddr,
    entry: &ViewEntry,
) -> Result<ImdsDocument, BackendError> {
    if !entry.pod.allowed {
        return Err(BackendError::Forbidden);
    }
    if let Some(document) = entry.credentials(SystemTime::now()) {
        agent.metrics.agent.view_hits.inc();
        return Ok(document);
    }
    let Some(node) = &agent.view else { return Err(BackendError::Unavailable("no node view".into())) };
    fetch(&node.client, ip, entry).await.map_err(super::remote::backend_error)
}

/// The entry's held credentials as the legacy document's JSON, when the pod may have its role
/// and they are fresh: what [`entry_credentials`] would return, already encoded. `None` sends
/// the request down the general path (which refuses, fetches or encodes).
fn held_body<B>(agent: &Agent<B>, entry: &ViewEntry) -> Option<Bytes> {
    if !entry.pod.allowed {
        return None;
    }
    let body = entry.credentials_body(SystemTime::now())?;
    agent.metrics.agent.view_hits.inc();
    Some(body)
}

/// The 404 for the extended path and `iam/info` when the role's account is not known to the
/// agent (see [`super::documents`]).
fn no_account() -> AgentError {
    AgentError::NotFound("the pod's role is not a full ARN, so its account is unknown here".into())
}

/// `security-credentials/` (and `-extended/`): the bare role name.
pub async fn role_list<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    extended: bool,
) -> Result<Response, AgentError> {
    let source = source(agent, ip).await?;
    let (role, _) = pod_role(agent, ip, &source, "roleName").await?;
    if extended && role_account(&role).is_none() {
        return Err(no_account());
    }
    Ok(([(header::CONTENT_TYPE, "text/plain")], listed_name(&role).to_string()).into_response())
}

/// `security-credentials/{role}` (and `-extended/{role}`, which adds `AccountId`).
pub async fn credentials<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    requested: &str,
    extended: bool,
) -> Result<Response, AgentError> {
    let source = source(agent, ip).await?;
    let (role, affinity) = pod_role(agent, ip, &source, "credentials").await?;
    // SDKs list the role, then ask for that name; any other name is not this pod's (404, so
    // that SDKs which pin a profile name rediscover it).
    if requested != listed_name(&role) && requested != role.trim().trim_start_matches('/') {
        return Err(AgentError::NotFound(format!("role {requested:?} is not this pod's role")));
    }
    let account = match extended {
        true => Some(role_account(&role).ok_or_else(no_account)?.account),
        false => None,
    };
    // A hit on the legacy path: the held document, as encoded when it was stored.
    if let (Source::Entry(entry), None) = (&source, &account)
        && let Some(body) = held_body(agent, entry)
    {
        return Ok(([(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response());
    }
    let label = Handler { handler: "credentials" };
    Box::pin(fetched(agent, ip, &source, (&role, affinity), account, label)).await
}

/// [`credentials`] when the document is not held: fetched for exactly that pod, from the
/// owner of its identity first when `role` comes with a key.
async fn fetched<B: Backend>(
    agent: &Agent<B>,
    ip: IpAddr,
    source: &Source,
    (role, affinity): (&str, u64),
    account: Option<&str>,
    label: Handler,
) -> Result<Response, AgentError> {
    let unary = || with_budget(agent.pod_wait, || agent.backend.pod_credentials(ip, role, affinity));
    let document = match source {
        // A fetch through the view that fails for a passing reason (a server over its per-node
        // rate, a server going away) falls back to kiam's call, within the request's budget.
        Source::Entry(entry) => match entry_credentials(agent, ip, entry).await {
            Err(e) if e.is_transient() => unary().await,
            other => other,
        },
        Source::Backend => unary().await,
    }
    .map_err(|e| {
        agent.metrics.agent.credential_fetch_errors.get_or_create(&label).inc();
        answer(e, Endpoint::Metadata(ip))
    })?;
    let body = match account {
        Some(account_id) => serde_json::to_vec(&ExtendedDocument { credentials: &document, account_id }),
        None => serde_json::to_vec(&document),
    }
    .map_err(|e| {
        agent.metrics.agent.credential_encode_errors.get_or_create(&label).inc();
        AgentError::Internal(e.to_string())
    })?;
    Ok(([(header::CONTENT_TYPE, "application/json")], Body::from(body)).into_response())
}

/// `iam/info` for the pod's role, never the node's.
pub async fn iam_info<B: Backend>(agent: &Agent<B>, ip: IpAddr) -> Result<Response, AgentError> {
    let source = source(agent, ip).await?;
    let (role, _) = pod_role(agent, ip, &source, "iamInfo").await?;
    let account = role_account(&role).ok_or_else(no_account)?;
    let info = IamInfo::new(&account, crate::creds::time::format(SystemTime::now()));
    let body = serde_json::to_vec(&info).map_err(|e| AgentError::Internal(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain")], Body::from(body)).into_response())
}

/// `/health`: 200 with the node's instance ID as the body, as kiam answers (scripts and
/// liveness checks read it), when the node's metadata service answers `instance-id` (with a
/// token when the node requires one; the answer is reused for a second, see `instance_check`),
/// and with `?deep` when a server answers too; 503 otherwise. What `?deep` found is in the
/// `kiam-health` header: `server: ok, node view: ...`.
pub async fn health<B: Backend>(agent: &Agent<B>, query: Option<&str>) -> Result<Response, AgentError> {
    let unavailable = |what: String| AgentError::Unavailable(format!("metadata service: {what}"));
    let instance = agent.upstream.instance_id().await.map_err(unavailable)?;
    let deep = query.is_some_and(|q| q.split('&').any(|kv| kv.split('=').next() == Some("deep")));
    if deep {
        let message = with_budget(agent.pod_wait, || agent.backend.health())
            .await
            .map_err(|e| AgentError::Unavailable(format!("kiam server: {e}")))?;
        if message != "ok" {
            return Err(AgentError::Unavailable(format!("kiam server: {message}")));
        }
        let view = match &agent.view {
            None => "off".to_string(),
            Some(node) => {
                let h = node.view.health();
                let age =
                    h.age.map_or_else(|| "never synced".to_string(), |a| format!("{}s stale", a.as_secs()));
                match h.live {
                    true => format!("live, node {}, {} entries", h.node, h.entries),
                    false => format!("down ({age}), {} entries held", h.entries),
                }
            }
        };
        let detail = format!("server: {message}, node view: {view}");
        let detail =
            header::HeaderValue::from_str(&detail).map_err(|e| AgentError::Internal(e.to_string()))?;
        return Ok(([(header::HeaderName::from_static("kiam-health"), detail)], instance).into_response());
    }
    Ok(instance.into_response())
}

/// kube2iam's `/healthz` (kube2iam mode): 200 with `{"hostIP", "instanceId"}` when the node's
/// metadata service answers `instance-id`, 500 with the reason otherwise. Elsewhere: 404.
pub async fn healthz<B>(agent: &Agent<B>) -> Result<Response, AgentError> {
    let Some(host) = agent.healthz else {
        return Err(AgentError::NotFound("/healthz is kube2iam mode's; use /health or /ping".into()));
    };
    let status = |up: bool| agent.metrics.health_checked(up);
    let Ok(instance) = agent.upstream.instance_id().await else {
        status(false);
        return Err(AgentError::Internal("the metadata service did not answer instance-id".into()));
    };
    status(true);
    let body = serde_json::json!({"hostIP": host.to_string(), "instanceId": instance.trim()});
    Ok(([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    async fn calls_until_done(budget: Duration, error: BackendError) -> (u32, Duration) {
        let calls = AtomicU32::new(0);
        let started = tokio::time::Instant::now();
        let result: Result<(), BackendError> = with_budget(budget, || {
            calls.fetch_add(1, Ordering::Relaxed);
            let error = error.clone();
            async move { Err(error) }
        })
        .await;
        assert_eq!(result, Err(error));
        (calls.load(Ordering::Relaxed), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn denials_are_final_and_unknown_pods_are_waited_for_within_the_budget() {
        let budget = Duration::from_secs(5);
        let (calls, took) = calls_until_done(budget, BackendError::Forbidden).await;
        assert_eq!((calls, took), (1, Duration::ZERO), "a policy denial is never retried");
        let (calls, took) = calls_until_done(budget, BackendError::Failed("sts".into())).await;
        assert_eq!((calls, took), (1, Duration::ZERO));
        let (calls, took) = calls_until_done(budget, BackendError::PodNotFound).await;
        assert!(
            calls > 10 && took <= budget && took > budget - Duration::from_millis(300),
            "{calls} {took:?}"
        );
        let (calls, _) = calls_until_done(budget, BackendError::Unavailable("down".into())).await;
        assert!(calls > 10);
    }

    /// A server that waits almost the whole budget for an unknown pod before saying "not found"
    /// (as it does with the request's deadline) is not asked again with a fresh wait: the
    /// answer comes within the budget (it came after 1.8 times the budget before).
    #[tokio::test(start_paused = true)]
    async fn the_budget_bounds_every_attempt_together() {
        let budget = Duration::from_secs(2);
        let started = tokio::time::Instant::now();
        let result: Result<(), BackendError> = with_budget(budget, || async {
            tokio::time::sleep(budget * 9 / 10).await;
            Err(BackendError::PodNotFound)
        })
        .await;
        assert_eq!(result, Err(BackendError::PodNotFound));
        assert_eq!(started.elapsed(), budget);
        let silent: Result<(), BackendError> = with_budget(budget, std::future::pending).await;
        assert!(matches!(silent, Err(BackendError::Unavailable(_))), "{silent:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pod_that_appears_within_the_budget_is_answered() {
        let calls = AtomicU32::new(0);
        let result = with_budget(Duration::from_secs(5), || {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move { if n < 3 { Err(BackendError::PodNotFound) } else { Ok(n) } }
        })
        .await;
        assert_eq!(result, Ok(3));
    }
}
