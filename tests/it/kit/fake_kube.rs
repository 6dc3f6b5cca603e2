//! Tests of the fake API server itself, with kube-rs's real `watcher`, `reflector` and events
//! `Recorder` as clients (plus raw HTTP where the protocol detail is the point).
//!
//! Every wait is bounded by [`WAIT`] and driven by what the client receives, never by sleeping.

use std::time::Duration;

use futures::StreamExt;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Namespace, Pod};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::support::fake_kube::FakeKube;
use crate::support::objects::{self, namespace, pod};

/// Upper bound on any one wait.
const WAIT: Duration = Duration::from_secs(10);

/// A kube `watcher` + `reflector` over Pods running in a task, with its events forwarded so a
/// test can wait on them.
struct PodWatch {
    store: Store<Pod>,
    events: mpsc::UnboundedReceiver<Result<watcher::Event<Pod>, watcher::Error>>,
    /// What the watcher yielded so far, one line per event, e.g. `InitApply(a/web)`.
    seen: Vec<String>,
    task: tokio::task::JoinHandle<()>,
}

impl PodWatch {
    fn start(api: Api<Pod>, config: watcher::Config) -> PodWatch {
        let (store, writer) = reflector::store();
        let (sender, events) = mpsc::unbounded_channel();
        let stream = watcher(api, config).default_backoff().reflect(writer);
        let task = tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(event) = stream.next().await {
                if sender.send(event).is_err() {
                    break;
                }
            }
        });
        PodWatch { store, events, seen: Vec::new(), task }
    }

    /// Waits until `done(store)` holds, checking after every watcher event.
    async fn until(&mut self, what: &str, done: impl Fn(&Store<Pod>) -> bool) {
        let wait = async {
            while !done(&self.store) {
                let event = self.events.recv().await.expect("the watcher task ended");
                self.seen.push(describe(event));
            }
        };
        if tokio::time::timeout(WAIT, wait).await.is_err() {
            panic!(
                "timed out waiting for {what}; store {:?}, watcher saw {:#?}",
                names(&self.store),
                self.seen
            );
        }
    }

    /// Whether the watcher yielded `line` after its first `InitDone`.
    fn saw_after_first_sync(&self, line: &str) -> bool {
        let first = self.seen.iter().position(|seen| seen == "InitDone");
        first.is_some_and(|first| self.seen[first + 1..].iter().any(|seen| seen.starts_with(line)))
    }
}

impl Drop for PodWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn describe(event: Result<watcher::Event<Pod>, watcher::Error>) -> String {
    let key = |pod: &Pod| format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any());
    match event {
        Ok(watcher::Event::Init) => "Init".into(),
        Ok(watcher::Event::InitApply(pod)) => format!("InitApply({})", key(&pod)),
        Ok(watcher::Event::InitDone) => "InitDone".into(),
        Ok(watcher::Event::Apply(pod)) => format!("Apply({})", key(&pod)),
        Ok(watcher::Event::Delete(pod)) => format!("Delete({})", key(&pod)),
        Err(error) => format!("Error({error})"),
    }
}

/// The store's pods as sorted `namespace/name`.
fn names(store: &Store<Pod>) -> Vec<String> {
    let mut names: Vec<String> = (store.state().iter())
        .map(|pod| format!("{}/{}", pod.namespace().unwrap_or_default(), pod.name_any()))
        .collect();
    names.sort();
    names
}

/// List (not watch) requests the fake received for all pods.
fn pod_lists(kube: &FakeKube) -> usize {
    let requests = kube.requests();
    (requests.iter())
        .filter(|request| request.starts_with("GET /api/v1/pods?") && !request.contains("watch="))
        .count()
}

#[tokio::test]
async fn watcher_and_reflector_follow_a_pod_through_add_modify_delete() {
    let kube = FakeKube::start().await;
    kube.apply(pod("team-a", "existing").ip("10.1.0.1").build());
    let mut watch = PodWatch::start(Api::all(kube.kube_client()), watcher::Config::default());
    watch.until("the initial list", |store| names(store) == ["team-a/existing"]).await;

    kube.apply(pod("team-a", "web").ip("10.1.0.2").role("reader").build());
    watch.until("web to be added", |store| names(store).contains(&"team-a/web".to_owned())).await;
    let web = ObjectRef::new("web").within("team-a");
    let first = watch.store.get(&web).expect("web is in the store");
    let meta = &first.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some(),
        "create stamps uid and creationTimestamp"
    );

    let rv = kube.apply(pod("team-a", "web").ip("10.1.0.2").role("writer").build());
    let role_is = |role: &'static str| {
        move |store: &Store<Pod>| {
            let pod = store.get(&ObjectRef::new("web").within("team-a"));
            pod.is_some_and(|pod| pod.annotations().get(objects::ROLE_ANNOTATION).is_some_and(|r| r == role))
        }
    };
    watch.until("web to be modified", role_is("writer")).await;
    let second = watch.store.get(&web).expect("web is still in the store");
    assert_eq!(second.metadata.resource_version.as_deref(), Some(rv.as_str()));
    assert_eq!(second.metadata.uid, first.metadata.uid, "a replace keeps the uid");

    assert!(kube.delete("Pod", Some("team-a"), "web"));
    assert!(!kube.delete("Pod", Some("team-a"), "web"), "a second delete finds nothing");
    watch.until("web to be deleted", |store| names(store) == ["team-a/existing"]).await;
    assert!(watch.saw_after_first_sync("Apply(team-a/web)"));
    assert!(watch.saw_after_first_sync("Delete(team-a/web)"));
    assert_eq!(pod_lists(&kube), 1, "the watch followed the list without re-listing: {:?}", kube.requests());
    assert_eq!(kube.watch_count(), 1);
}

#[tokio::test]
async fn field_selector_filters_list_and_watch() {
    let kube = FakeKube::start().await;
    kube.apply(pod("a", "one").node("node-1").ip("10.0.0.1").label("app", "web").build());
    kube.apply(pod("a", "two").node("node-2").label("app", "db").build());
    let api: Api<Pod> = Api::all(kube.kube_client());

    let listed =
        |pods: kube::core::ObjectList<Pod>| pods.items.iter().map(ResourceExt::name_any).collect::<Vec<_>>();
    let on_node_1 =
        api.list(&ListParams::default().fields("spec.nodeName=node-1")).await.expect("list node-1");
    assert!(on_node_1.metadata.resource_version.as_ref().is_some_and(|rv| !rv.is_empty()));
    assert_eq!(listed(on_node_1), ["one"]);
    let elsewhere =
        api.list(&ListParams::default().fields("spec.nodeName!=node-1")).await.expect("list !node-1");
    assert_eq!(listed(elsewhere), ["two"]);
    let by_ip =
        ListParams::default().fields("status.podIP=10.0.0.1,metadata.namespace==a,status.phase!=Failed");
    assert_eq!(listed(api.list(&by_ip).await.expect("list by IP")), ["one"]);
    let db = api.list(&ListParams::default().labels("app in (db,cache),!gone")).await.expect("list by label");
    assert_eq!(listed(db), ["two"]);
    let unsupported = api.list(&ListParams::default().fields("spec.bogus=x")).await;
    assert!(matches!(unsupported, Err(kube::Error::Api(status)) if status.code == 400));

    let config = watcher::Config::default().fields("spec.nodeName=node-1");
    let mut watch = PodWatch::start(api, config);
    watch.until("the filtered list", |store| names(store) == ["a/one"]).await;
    // Moving onto node-1 must arrive as ADDED, moving off it as DELETED; node-2 pods never show.
    kube.apply(pod("a", "two").node("node-1").build());
    watch.until("two to start matching", |store| names(store) == ["a/one", "a/two"]).await;
    kube.apply(pod("a", "three").node("node-2").build());
    kube.apply(pod("a", "one").node("node-2").build());
    watch.until("one to stop matching", |store| names(store) == ["a/two"]).await;
    assert!(watch.saw_after_first_sync("Delete(a/one)"), "{:?}", watch.seen);
    assert!(!watch.seen.iter().any(|seen| seen.contains("a/three")), "{:?}", watch.seen);
    assert!(
        kube.requests().iter().any(|request| request.contains("watch=true")
            && request.contains("fieldSelector=spec.nodeName%3Dnode-1"))
    );
}

#[tokio::test]
async fn compaction_forces_a_relist_that_keeps_the_store_whole() {
    let kube = FakeKube::start().await;
    kube.apply(pod("a", "before").build());
    let mut watch = PodWatch::start(Api::all(kube.kube_client()), watcher::Config::default());
    watch.until("the initial list", |store| names(store) == ["a/before"]).await;
    assert_eq!(pod_lists(&kube), 1);

    kube.compact();
    kube.apply(pod("a", "during").build());
    watch
        .until("the pod added while the watch was down", |store| names(store) == ["a/before", "a/during"])
        .await;
    assert!(watch.saw_after_first_sync("Error("), "the resumed watch failed: {:?}", watch.seen);
    assert!(watch.seen.iter().any(|seen| seen.contains("Expired")), "{:?}", watch.seen);
    assert!(watch.saw_after_first_sync("Init"), "a second Init means a relist: {:?}", watch.seen);
    assert_eq!(pod_lists(&kube), 2);
}

/// A watch opened with raw HTTP, read line by line.
struct RawWatch {
    response: hyper::Response<Incoming>,
    buffer: Vec<u8>,
}

impl RawWatch {
    async fn open(kube: &FakeKube, path_and_query: &str) -> RawWatch {
        let client = HttpClient::builder(TokioExecutor::new()).build_http::<Empty<Bytes>>();
        let uri = format!("{}{path_and_query}", kube.url()).parse().expect("valid URI");
        let response =
            tokio::time::timeout(WAIT, client.get(uri)).await.expect("response in time").expect("request");
        RawWatch { response, buffer: Vec::new() }
    }

    fn header(&self, name: &str) -> &str {
        self.response.headers().get(name).and_then(|value| value.to_str().ok()).unwrap_or_default()
    }

    /// The next line as JSON (a whole non-watch body counts as one line), or `None` at the end.
    async fn next(&mut self) -> Option<Value> {
        let read = async {
            loop {
                if let Some(end) = self.buffer.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = self.buffer.drain(..=end).collect();
                    return Some(serde_json::from_slice(&line).expect("each line is one JSON document"));
                }
                let Some(frame) = self.response.body_mut().frame().await else {
                    let rest = std::mem::take(&mut self.buffer);
                    return (!rest.is_empty()).then(|| serde_json::from_slice(&rest).expect("a JSON body"));
                };
                let frame = frame.expect("body frame");
                self.buffer.extend(frame.into_data().unwrap_or_default());
            }
        };
        tokio::time::timeout(WAIT, read).await.expect("the watch sent nothing in time")
    }
}

#[tokio::test]
async fn raw_watch_sends_bookmarks_replays_and_expires() {
    let kube = FakeKube::start().await;
    let first_rv = kube.apply(pod("a", "one").build());
    let path = format!("/api/v1/pods?watch=true&allowWatchBookmarks=true&resourceVersion={first_rv}");
    let mut watch = RawWatch::open(&kube, &path).await;
    assert_eq!(watch.response.status(), 200);
    assert_eq!(watch.header("content-type"), "application/json");
    assert_eq!(watch.header("connection"), "close");
    assert_eq!(watch.header("transfer-encoding"), "chunked");
    let bookmark = watch.next().await.expect("a bookmark");
    assert_eq!(bookmark["type"], "BOOKMARK");
    assert_eq!(bookmark["object"]["kind"], "Pod");
    assert_eq!(bookmark["object"]["metadata"]["resourceVersion"], first_rv.as_str());
    let second_rv = kube.apply(pod("a", "two").build());
    let added = watch.next().await.expect("an event for the new pod");
    assert_eq!(
        (added["type"].as_str(), added["object"]["metadata"]["name"].as_str()),
        (Some("ADDED"), Some("two"))
    );
    assert_eq!(added["object"]["metadata"]["resourceVersion"], second_rv.as_str());
    assert_eq!(kube.watch_count(), 1);

    kube.compact();
    assert_eq!(watch.next().await, None, "compaction closes open watches");
    assert_eq!(kube.watch_count(), 0);
    let mut expired =
        RawWatch::open(&kube, &format!("/api/v1/pods?watch=1&resourceVersion={second_rv}")).await;
    assert_eq!(expired.response.status(), 200);
    let error = expired.next().await.expect("an error event");
    assert_eq!(error["type"], "ERROR");
    assert_eq!(
        (error["object"]["code"].as_u64(), error["object"]["reason"].as_str()),
        (Some(410), Some("Expired"))
    );
    assert_eq!(expired.next().await, None);

    // From "0": the current state first, then the stream ends at its timeout.
    let mut fresh =
        RawWatch::open(&kube, "/api/v1/namespaces/a/pods?watch=true&resourceVersion=0&timeoutSeconds=1")
            .await;
    let mut replayed = Vec::new();
    while let Some(event) = fresh.next().await {
        assert_eq!(event["type"], "ADDED", "{event}");
        replayed.push(event["object"]["metadata"]["name"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(replayed, ["one", "two"]);

    let client = kube.kube_client();
    let api: Api<Pod> = Api::all(client);
    let exact = ListParams::default().at(&second_rv).matching(kube::api::VersionMatch::Exact);
    assert!(matches!(api.list(&exact).await, Err(kube::Error::Api(status)) if status.code == 410));
    let plain = ListParams::default().at(&second_rv);
    assert_eq!(api.list(&plain).await.expect("a plain list ignores compaction").items.len(), 2);
}

#[tokio::test]
async fn recorder_events_are_stored_and_patched() {
    let kube = FakeKube::start().await;
    let client = kube.kube_client();
    kube.apply(pod("team-a", "web").build());
    let web = Api::<Pod>::namespaced(client.clone(), "team-a").get("web").await.expect("get web");
    let reporter = Reporter { controller: "kiam-server".into(), instance: None };
    let recorder = Recorder::new(client.clone(), reporter);
    let event = Event {
        type_: EventType::Warning,
        reason: "RoleDenied".into(),
        note: Some("role admin is not permitted".into()),
        action: "AssumeRole".into(),
        secondary: None,
    };
    recorder.publish(&event, &web.object_ref(&())).await.expect("first publish (POST)");
    recorder.publish(&event, &web.object_ref(&())).await.expect("repeat publish (PATCH)");

    let core = Api::<CoreEvent>::namespaced(client, "team-a");
    let core_event = serde_json::from_value(json!({"metadata": {"name": "core.1"}, "reason": "Legacy",
        "involvedObject": {"kind": "Pod", "name": "web", "namespace": "team-a"}}))
    .expect("a core Event");
    core.create(&PostParams::default(), &core_event).await.expect("create a core v1 event");

    let events = kube.events();
    assert_eq!(events.len(), 2, "{events:#?}");
    let recorded = &events[0];
    assert_eq!(recorded["apiVersion"], "events.k8s.io/v1");
    assert_eq!(
        (recorded["reason"].as_str(), recorded["type"].as_str()),
        (Some("RoleDenied"), Some("Warning"))
    );
    assert_eq!(recorded["note"], "role admin is not permitted");
    assert_eq!(recorded["regarding"]["name"], "web");
    assert_eq!(recorded["series"]["count"], 2, "the repeat was merged into the stored event");
    assert_eq!(events[1]["reason"], "Legacy");
    let requests = kube.requests();
    assert!(
        requests
            .iter()
            .any(|request| { request.starts_with("POST /apis/events.k8s.io/v1/namespaces/team-a/events?") })
    );
    assert!(requests.iter().any(|request| {
        request.starts_with("PATCH /apis/events.k8s.io/v1/namespaces/team-a/events/web.")
    }));
}

#[tokio::test]
async fn writes_and_discovery_follow_api_server_semantics() {
    let kube = FakeKube::start().await;
    let client = kube.kube_client();
    let pods: Api<Pod> = Api::namespaced(client.clone(), "team-a");
    let new_pod: Pod = serde_json::from_value(pod("team-a", "web").build()).expect("a Pod");
    let created = pods.create(&PostParams::default(), &new_pod).await.expect("create");
    assert!(created.metadata.resource_version.is_some() && created.metadata.uid.is_some());
    let again = pods.create(&PostParams::default(), &new_pod).await;
    assert!(
        matches!(again, Err(kube::Error::Api(status)) if status.code == 409 && status.reason == "AlreadyExists")
    );

    let patch = Patch::Merge(json!({"metadata": {"annotations": {objects::ROLE_ANNOTATION: "reader"}}}));
    let patched = pods.patch("web", &PatchParams::default(), &patch).await.expect("merge patch");
    assert_eq!(patched.annotations().get(objects::ROLE_ANNOTATION).map(String::as_str), Some("reader"));
    assert_eq!(patched.metadata.uid, created.metadata.uid);
    let missing = pods.patch("nope", &PatchParams::default(), &patch).await;
    assert!(matches!(missing, Err(kube::Error::Api(status)) if status.code == 404));
    pods.delete("web", &DeleteParams::default()).await.expect("delete");
    let gone = pods.delete("web", &DeleteParams::default()).await;
    assert!(
        matches!(gone, Err(kube::Error::Api(status)) if status.code == 404 && status.reason == "NotFound")
    );

    let namespaces: Api<Namespace> = Api::all(client.clone());
    let team: Namespace = serde_json::from_value(namespace("team-b").build()).expect("a Namespace");
    namespaces.create(&PostParams::default(), &team).await.expect("create a namespace");
    assert_eq!(namespaces.get("team-b").await.expect("get").name_any(), "team-b");

    assert_eq!(client.list_core_api_versions().await.expect("/api").versions, ["v1"]);
    let core = client.list_core_api_resources("v1").await.expect("/api/v1");
    assert!(core.resources.iter().any(|resource| resource.name == "pods" && resource.namespaced));
    let groups = client.list_api_groups().await.expect("/apis");
    assert!(groups.groups.iter().any(|group| group.name == "events.k8s.io"));
    assert_eq!(client.apiserver_version().await.expect("/version").minor, "33");

    let mut unknown = RawWatch::open(&kube, "/apis/apps/v1/deployments").await;
    assert_eq!(unknown.response.status(), 404);
    let status = unknown.next().await.map(|status| (status["kind"].clone(), status["code"].clone()));
    assert_eq!(status, Some((json!("Status"), json!(404))));
}

#[tokio::test]
async fn kubeconfig_and_builders_produce_what_kube_expects() {
    let kube = FakeKube::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let path = kube.write_kubeconfig(dir.path());
    let kubeconfig = Kubeconfig::read_from(&path).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("config");
    assert_eq!(config.cluster_url.to_string().trim_end_matches('/'), kube.url());
    let client = kube::Client::try_from(config).expect("client from the kubeconfig");

    kube.apply(namespace("team-a").permitted("app-.*").annotation("owner", "me").build());
    kube.apply(
        pod("team-a", "web")
            .ip("10.1.2.3")
            .role("app-reader")
            .annotation("extra", "x")
            .node("node-1")
            .phase("Pending")
            .host_network(true)
            .terminating()
            .build(),
    );
    let ns = Api::<Namespace>::all(client.clone()).get("team-a").await.expect("get the namespace");
    assert_eq!(ns.annotations().get(objects::PERMITTED_ANNOTATION).map(String::as_str), Some("app-.*"));
    assert_eq!(ns.annotations().get("owner").map(String::as_str), Some("me"));
    let web = Api::<Pod>::namespaced(client, "team-a").get("web").await.expect("get the pod");
    let (spec, status) = (web.spec.clone().unwrap_or_default(), web.status.clone().unwrap_or_default());
    assert_eq!(web.annotations().get(objects::ROLE_ANNOTATION).map(String::as_str), Some("app-reader"));
    assert_eq!(web.annotations().get("extra").map(String::as_str), Some("x"));
    assert_eq!((spec.node_name.as_deref(), spec.host_network), (Some("node-1"), Some(true)));
    assert_eq!(spec.containers.len(), 1);
    assert_eq!((status.phase.as_deref(), status.pod_ip.as_deref()), (Some("Pending"), Some("10.1.2.3")));
    assert_eq!(status.pod_ips.unwrap_or_default().len(), 1);
    assert!(web.metadata.deletion_timestamp.is_some());
    assert!(web.meta().creation_timestamp.is_some());
}
