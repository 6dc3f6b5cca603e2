//! Kubernetes Events on pods, as kiam records them: Warning `KiamRoleForbidden` and
//! `KiamCredentialError` (and `KiamAmbiguousIP`, new), from the `kiam.server` component.
//!
//! Publishing never blocks a request: events go out on a spawned task. A [`Limiter`] keeps a
//! crash-looping pod from flooding the API server: one event per pod and reason per interval,
//! and a global cap per minute.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::model::PodFacts;
use tokio_util::sync::CancellationToken;

/// The reporting component, as in kiam.
pub const COMPONENT: &str = "kiam.server";
/// The pod asked for a role the policy forbids.
pub const ROLE_FORBIDDEN: &str = "KiamRoleForbidden";
/// STS failed for the pod's role.
pub const CREDENTIAL_ERROR: &str = "KiamCredentialError";
/// Several live pods claim the pod's IP.
pub const AMBIGUOUS_IP: &str = "KiamAmbiguousIP";

/// Where the server records Warning events about pods.
pub trait EventSink: Send + Sync + 'static {
    /// Records a Warning `reason` with `note` on `pod` (best effort, never blocking).
    fn warn(&self, pod: &PodFacts, reason: &'static str, note: String);
}

/// No events (the manifest-file source has no API server to write to).
pub struct NoEvents;

impl EventSink for NoEvents {
    fn warn(&self, _: &PodFacts, _: &'static str, _: String) {}
}

/// Per-key and global rate limiting, over an explicit `now`.
pub struct Limiter {
    per_key: Duration,
    global_per_minute: u32,
    last: HashMap<(String, String, &'static str), Instant>,
    window: Option<(Instant, u32)>,
}

impl Limiter {
    /// At most one event per (pod, reason) every `per_key`, and `global_per_minute` in all.
    pub fn new(per_key: Duration, global_per_minute: u32) -> Limiter {
        Limiter { per_key, global_per_minute, last: HashMap::new(), window: None }
    }

    /// Whether an event for `pod` with `reason` may go out at `now` (and records it if so).
    pub fn allow(&mut self, pod: &PodFacts, reason: &'static str, now: Instant) -> bool {
        let per_key = self.per_key;
        self.last.retain(|_, t| now.duration_since(*t) < per_key);
        let key = (pod.namespace.to_string(), pod.name.to_string(), reason);
        if self.last.contains_key(&key) {
            return false;
        }
        let (start, count) = match self.window {
            Some((start, count)) if now.duration_since(start) < Duration::from_secs(60) => (start, count),
            _ => (now, 0),
        };
        if count >= self.global_per_minute {
            return false;
        }
        self.window = Some((start, count + 1));
        self.last.insert(key, now);
        true
    }
}

/// Events through kube's `Recorder` (events.k8s.io/v1, which also aggregates repeats).
pub struct KubeEvents {
    recorder: Arc<Recorder>,
    limiter: Mutex<Limiter>,
    /// Publishing still in flight stops with it.
    shutdown: CancellationToken,
}

impl KubeEvents {
    /// Records through `client` until `shutdown`; `instance` names this server replica.
    pub fn new(client: kube::Client, instance: Option<String>, shutdown: CancellationToken) -> KubeEvents {
        let reporter = Reporter { controller: COMPONENT.into(), instance };
        KubeEvents {
            recorder: Arc::new(Recorder::new(client, reporter)),
            limiter: Mutex::new(Limiter::new(Duration::from_secs(60), 300)),
            shutdown,
        }
    }
}

impl EventSink for KubeEvents {
    fn warn(&self, pod: &PodFacts, reason: &'static str, note: String) {
        let allowed =
            self.limiter.lock().unwrap_or_else(PoisonError::into_inner).allow(pod, reason, Instant::now());
        if !allowed {
            tracing::debug!(pod.namespace = %pod.namespace, pod.name = %pod.name, reason, "event rate-limited");
            return;
        }
        let reference = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            name: Some(pod.name.to_string()),
            namespace: Some(pod.namespace.to_string()),
            uid: Some(pod.uid.to_string()).filter(|u| !u.is_empty()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: "AssumeRole".into(),
            secondary: None,
        };
        let recorder = Arc::clone(&self.recorder);
        crate::task::spawn_until(&self.shutdown, async move {
            if let Err(error) = recorder.publish(&event, &reference).await {
                tracing::warn!(%error, "cannot record a Kubernetes event");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_per_pod_and_reason_and_globally() {
        let mut l = Limiter::new(Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let a = PodFacts::test("ns", "a", "10.0.0.1", Some("r"));
        let b = PodFacts::test("ns", "b", "10.0.0.2", Some("r"));
        assert!(l.allow(&a, ROLE_FORBIDDEN, t0));
        assert!(!l.allow(&a, ROLE_FORBIDDEN, t0 + Duration::from_secs(1)), "a crash-looping pod is quiet");
        assert!(l.allow(&a, CREDENTIAL_ERROR, t0), "another reason is another key");
        assert!(l.allow(&b, ROLE_FORBIDDEN, t0));
        let c = PodFacts::test("ns", "c", "10.0.0.3", Some("r"));
        assert!(!l.allow(&c, ROLE_FORBIDDEN, t0), "the global cap holds");
        assert!(l.allow(&a, ROLE_FORBIDDEN, t0 + Duration::from_secs(61)), "after the interval, again");
    }
}
