//! The view's waiting lookups and its per-identity credentials, without a server.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use super::*;

fn view() -> NodeView {
    NodeView::new(Arc::new(Metrics::default()))
}

fn entry(ip: &str, role: &str, identity: (u64, u64)) -> pb::Entry {
    pb::Entry {
        ip: ip.into(),
        uid: format!("uid-{ip}"),
        namespace: "team".into(),
        name: format!("pod-{ip}"),
        role: role.into(),
        allowed: true,
        role_arn: format!("arn:aws:iam::123456789012:role/{role}"),
        identity_high: identity.0,
        identity_low: identity.1,
        ..pb::Entry::default()
    }
}

fn live(view: &NodeView, entries: Vec<pb::Entry>) {
    view.replace(pb::Snapshot { node: "node-a".into(), entries });
}

fn document(key: &str) -> crate::creds::ImdsDocument {
    let now = SystemTime::now();
    crate::creds::ImdsDocument {
        code: "Success".into(),
        last_updated: crate::creds::time::format(now),
        kind: "AWS-HMAC".into(),
        access_key_id: key.into(),
        secret_access_key: "secret".into(),
        token: "token".into(),
        expiration: crate::creds::time::format(now + Duration::from_secs(3600)),
    }
}

/// A future that counts how often it was polled.
struct Counted<F> {
    inner: Pin<Box<F>>,
    polls: Arc<AtomicUsize>,
}

impl<F: Future> Future for Counted<F> {
    type Output = F::Output;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.inner.as_mut().poll(cx)
    }
}

#[tokio::test]
async fn a_lookup_waiting_for_its_pod_is_woken_by_its_own_ip_only() {
    let view = Arc::new(view());
    live(&view, Vec::new());
    let polls = Arc::new(AtomicUsize::new(0));
    let waiting = {
        let (view, polls) = (Arc::clone(&view), Arc::clone(&polls));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        tokio::spawn(async move {
            let inner =
                Box::pin(async move { view.lookup("10.0.0.200".parse().expect("ip"), deadline).await });
            matches!(Counted { inner, polls }.await, Lookup::Entry(_))
        })
    };
    // Once it waits (registered under its IP), 50 other pods arrive, then its own.
    let registered = || view.waiting.lock().unwrap_or_else(PoisonError::into_inner).len() == 1;
    for _ in 0..10_000 {
        if registered() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(registered(), "the lookup waits under its IP");
    for i in 0..50 {
        view.upsert(entry(&format!("10.0.0.{i}"), "app", (1, 1)));
        tokio::task::yield_now().await;
    }
    let before = polls.load(Ordering::SeqCst);
    view.upsert(entry("10.0.0.200", "app", (1, 1)));
    assert!(waiting.await.expect("the lookup ends"), "the lookup found its pod");
    // Polled when it started and when its own pod came; other IPs' pods did not wake it.
    assert!(before <= 1, "polled {before} times before its pod came");
    assert!(
        view.waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty(),
        "its signal went with it"
    );
}

#[tokio::test]
async fn a_lookup_that_times_out_leaves_no_signal_behind() {
    let view = view();
    live(&view, Vec::new());
    let deadline = tokio::time::Instant::now() + Duration::from_millis(20);
    assert!(matches!(view.lookup("10.0.0.9".parse().expect("ip"), deadline).await, Lookup::NoPod));
    assert!(view.waiting.lock().unwrap_or_else(PoisonError::into_inner).is_empty());
}

#[test]
fn entries_of_one_identity_share_credentials_and_no_other_entry_sees_them() {
    let view = view();
    let (same, other) = ((7, 7), (8, 8));
    live(
        &view,
        vec![
            entry("10.0.0.1", "app", same),
            entry("10.0.0.2", "app", same),
            // The same role with another identity (an external ID, a session policy): not shared.
            entry("10.0.0.3", "app", other),
            // No digest (a denied pod): a slot of its own.
            pb::Entry { allowed: false, ..entry("10.0.0.4", "app", (0, 0)) },
        ],
    );
    let by_ip = |ip: &str| {
        let ip: IpAddr = ip.parse().expect("ip");
        view.entries().into_iter().find(|(at, _)| *at == ip).map(|(_, e)| e).expect("an entry")
    };
    let now = SystemTime::now();
    by_ip("10.0.0.1").store(document("AKIDSHARED"), now);
    let key = |ip: &str| by_ip(ip).credentials(now).map(|d| d.access_key_id);
    assert_eq!(key("10.0.0.2").as_deref(), Some("AKIDSHARED"), "the same identity shares them");
    assert!(!by_ip("10.0.0.2").due(now), "and is not fetched again");
    assert_eq!(key("10.0.0.3"), None, "another identity with the same role does not");
    assert_eq!(key("10.0.0.4"), None);
    assert!(Arc::ptr_eq(by_ip("10.0.0.1").slot(), by_ip("10.0.0.2").slot()));
    // A resync with the same entries keeps them; an entry whose identity changes starts empty.
    live(&view, vec![entry("10.0.0.1", "app", same), entry("10.0.0.2", "app", other)]);
    assert_eq!(key("10.0.0.1").as_deref(), Some("AKIDSHARED"));
    assert_eq!(key("10.0.0.2"), None);
    // A new pod of that identity (on a reused IP too) gets the identity's credentials.
    view.upsert(entry("10.0.0.3", "app", same));
    assert_eq!(key("10.0.0.3").as_deref(), Some("AKIDSHARED"));
}
