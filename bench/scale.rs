//! Figure 10 (issue 31): AssumeRole calls against the number of server replicas. 1, 2, 3 and 5
//! servers on 127.0.0.2, .3, ... behind one name (an injected resolver standing for the
//! headless Service), each started from the server's library as `kiam server` assembles it,
//! with the same pods; moto's recorder counts the calls.
//!
//! For each replica count: the calls the servers make to warm every identity (a refresh
//! period's worth: each identity is fetched once per period), with `--peers`, against the same
//! servers without it (kiam's model: every server fetches every identity); then one server
//! stops, and the calls the survivors make to take its identities over are counted against the
//! identities it owned. A real refresh period is 30 minutes; figure 4 shows in-process that a
//! refresh costs what the first fetch did, so the first period stands for the others.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use kiam::policy::rendezvous;
use kiam_testkit::fake_kube::FakeKube;
use kiam_testkit::names::Name;
use kiam_testkit::objects::{namespace, pod};
use kiam_testkit::stack::{Options, TestServer, start_server};
use kiam_testkit::wait::until;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::deploy::Env;
use crate::report::{Report, Row, Verdict};

/// Distinct identities (one role each), and the pods that use them.
const ROLES: usize = 40;
const PODS: usize = 400;
const REPLICAS: [u8; 4] = [1, 2, 3, 5];
/// Every wait of this figure is bounded by this.
const WAIT: Duration = Duration::from_secs(60);
/// A count is read once no call has come for this long (late duplicates would show).
const QUIET: Duration = Duration::from_millis(500);

/// Runs figure 10.
pub async fn run(env: &Env, report: &mut Report) {
    for n in REPLICAS {
        let kiams = Servers::start(env, n, false).await;
        let baseline = kiams.settle(n as usize * ROLES).await;
        kiams.stop();
        let shared = Servers::start(env, n, true).await;
        let calls = shared.settle(ROLES).await;
        report.row(Row::compared(
            10,
            &format!(
                "AssumeRole calls to warm {ROLES} identities, {n} server(s) with --peers (baseline: \
                 without, as kiam)"
            ),
            format!("{calls} ({:.2}× the identities)", calls as f64 / ROLES as f64),
            format!("{baseline}"),
            crate::stats::ratio(calls as f64, baseline as f64),
            "1 per identity",
            Verdict::of(calls == ROLES),
        ));
        if n > 1 {
            let (owned, takeover) = shared.stop_one().await;
            report.row(Row::compared(
                10,
                &format!(
                    "AssumeRole calls after one of {n} servers stops (baseline: the identities it owned)"
                ),
                format!("{takeover}"),
                format!("{owned}"),
                crate::stats::ratio(takeover as f64, owned as f64),
                "1 per identity it owned",
                Verdict::of(takeover == owned),
            ));
        }
        shared.stop();
    }
    report.note(format!(
        "Figure 10, STS calls against replicas: {PODS} pods on {ROLES} roles; the servers run from \
         the library in this process on 127.0.0.2 onwards behind one injected name, with `--peers` \
         (or without it, as kiam runs: the baseline), and moto's recorder counts AssumeRole. Each \
         count is read once every server knows every identity, the expected calls have come, and \
         none has come for {} ms. A takeover is counted from the stopped server's leaving the \
         name.",
        QUIET.as_millis()
    ));
}

/// `n` servers behind one name, with the figure's pods.
struct Servers<'a> {
    env: &'a Env,
    _kube: FakeKube,
    name: Arc<Name>,
    servers: Vec<TestServer>,
}

impl<'a> Servers<'a> {
    async fn start(env: &'a Env, n: u8, peers: bool) -> Servers<'a> {
        env.moto.start_recording().await;
        let kube = FakeKube::start().await;
        let probe = std::net::TcpListener::bind("127.0.0.2:0").expect("probe a port");
        let port = probe.local_addr().expect("a probed address").port();
        drop(probe);
        let all: Vec<SocketAddr> =
            (2..2 + n).map(|last| SocketAddr::from(([127, 0, 0, last], port))).collect();
        let name = Arc::new(Name::default());
        name.set(&all);
        let target: &'static str = Box::leak(format!("kiam-peers:{port}").into_boxed_str());
        let mut servers = Vec::new();
        for addr in &all {
            let options = Options {
                server_flags: if peers {
                    vec!["--peers", target, "--peers-interval", "100ms"]
                } else {
                    vec![]
                },
                peers: peers.then(|| Arc::clone(&name) as Arc<dyn kiam::client::Resolve>),
                ..Options::default()
            };
            let listener = TcpListener::bind(addr).await.expect("bind a server address");
            servers.push(
                start_server(&kube, &env.moto, &env.pki, listener, &options, CancellationToken::new()).await,
            );
        }
        let this = Servers { env, _kube: kube, name, servers };
        if peers {
            this.wait_for_peers(usize::from(n)).await;
        }
        this._kube.apply(namespace("scale").permitted(".*").build());
        for i in 0..PODS {
            let ip = format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256 + 1);
            let role = format!("scale-{}", i % ROLES);
            this._kube.apply(pod("scale", &format!("p{i}")).ip(&ip).role(&role).build());
        }
        this
    }

    async fn wait_for_peers(&self, n: usize) {
        let seen = || {
            let all = self.servers.iter().all(|s| s.core.metrics().scale.peers.get() == n as i64);
            std::future::ready(all)
        };
        until(&format!("every server sees {n} peers"), WAIT, seen).await;
    }

    async fn calls(&self) -> usize {
        self.env.moto.recorded_assume_roles().await.len()
    }

    /// The calls made once every server knows every identity, `want` calls have come, and
    /// none came for [`QUIET`].
    async fn settle(&self, want: usize) -> usize {
        let known =
            || std::future::ready(self.servers.iter().all(|s| s.core.active_identities().len() == ROLES));
        until("every server knows every identity", WAIT, known).await;
        until(&format!("{want} AssumeRole calls"), WAIT, || async { self.calls().await >= want }).await;
        let mut last = self.calls().await;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            tokio::time::sleep(QUIET).await;
            let now = self.calls().await;
            if now == last || tokio::time::Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Stops the last server and takes it out of the name: the identities it owned, and the
    /// calls the survivors made to take them over.
    async fn stop_one(&self) -> (usize, usize) {
        let ips: Vec<IpAddr> = self.servers.iter().map(|s| s.addr.ip()).collect();
        let victim = self.servers.len() - 1;
        let identities = self.servers[0].core.active_identities();
        let owned = identities
            .iter()
            .filter(|id| rendezvous::owner(id.affinity_key(), &ips) == Some(ips[victim]))
            .count();
        let before = self.calls().await;
        self.servers[victim].shutdown.cancel();
        let survivors: Vec<SocketAddr> = self.servers[..victim].iter().map(|s| s.addr).collect();
        self.name.set(&survivors);
        let seen = || {
            let all =
                self.servers[..victim].iter().all(|s| s.core.metrics().scale.peers.get() == victim as i64);
            std::future::ready(all)
        };
        until("the survivors see the server gone", WAIT, seen).await;
        let taken = self.settle(before + owned).await;
        (owned, taken - before)
    }

    fn stop(&self) {
        self.servers.iter().for_each(|s| s.shutdown.cancel());
    }
}
