//! A real `moto_server` (from the project's Python virtualenv) standing in for AWS STS.
//!
//! moto routes a request to STS by the SigV4 credential scope, accepts any role ARN and records
//! every request when its recorder is on; [`Moto::recorded_assume_roles`] turns that recording
//! into typed [`AssumeRoleCall`]s so tests can assert what the server under test really sent
//! (role, session name, external id, duration, signing region).

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::http;

/// How long moto may take to answer `/moto-api/` (it is usually ready in about a second).
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The Python virtualenv made by `scripts/test-deps`: `$KIAM_IT_VENV`, else `<crate>/.venv`.
pub fn venv_dir() -> PathBuf {
    std::env::var_os("KIAM_IT_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv")))
}

/// A program in the virtualenv's `bin/`, checked to exist so a missing venv fails clearly.
pub fn venv_bin(program: &str) -> PathBuf {
    let path = venv_dir().join("bin").join(program);
    assert!(path.exists(), "{} is missing: run scripts/test-deps (or set KIAM_IT_VENV)", path.display());
    path
}

/// A running `moto_server` on 127.0.0.1; the process is killed when this is dropped.
pub struct Moto {
    child: Child,
    port: u16,
    log_dir: TempDir,
}

/// One `AssumeRole` request as moto received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRoleCall {
    /// `RoleArn` form field.
    pub role_arn: String,
    /// `RoleSessionName` form field.
    pub session_name: String,
    /// `ExternalId` form field, if sent.
    pub external_id: Option<String>,
    /// `DurationSeconds` form field, if sent.
    pub duration_seconds: Option<u64>,
    /// The region of the SigV4 credential scope (`Credential=AK/date/<region>/sts/aws4_request`).
    pub region: String,
    /// `Tags.member.N.Key`/`Value`, in order.
    pub tags: Vec<(String, String)>,
    /// `TransitiveTagKeys.member.N`.
    pub transitive: Vec<String>,
    /// `Policy`, if sent.
    pub policy: Option<String>,
    /// `SourceIdentity`, if sent.
    pub source_identity: Option<String>,
}

impl Moto {
    /// Starts `.venv/bin/moto_server -H 127.0.0.1 -p <free port>` and waits (at most 60 s) until
    /// `GET /moto-api/` answers. Panics with moto's log if it does not come up.
    pub async fn start() -> Moto {
        let mut log_dir = tempfile::Builder::new()
            .prefix("kiam-it-moto-")
            .tempdir()
            .expect("create a temp dir for moto's log");
        let program = venv_bin("moto_server");
        // A free port can be taken by someone else between our probe and moto's bind; moto then
        // exits at once, and we try again with another port.
        for _attempt in 0..3 {
            let port = free_port();
            let log = std::fs::File::create(log_dir.path().join("moto.log")).expect("create moto.log");
            let child = Command::new(&program)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                // The recorder keeps its file (`moto_recording`) in the working directory unless
                // told otherwise: name it outright, so that it can never land in the work tree.
                .current_dir(log_dir.path())
                .env("MOTO_RECORDER_FILEPATH", log_dir.path().join("moto_recording"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone moto.log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
            let mut moto = Moto { child, port, log_dir };
            if moto.wait_ready().await {
                moto.warm().await;
                return moto;
            }
            log_dir = moto.into_log_dir();
        }
        panic!("moto_server did not start three times in a row")
    }

    /// Stops moto now (STS "down"); its port then refuses connections.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Base URL, `http://127.0.0.1:PORT`, to use as the STS endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// moto's process id (for the benchmarks' CPU accounting).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The socket address moto listens on.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    /// moto's combined stdout/stderr, for debugging a failing test.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_dir.path().join("moto.log")).unwrap_or_default()
    }

    /// Resets all of moto's state (`POST /moto-api/reset`).
    pub async fn reset(&self) {
        self.post("/moto-api/reset").await;
    }

    /// Clears any earlier recording and starts recording every request.
    pub async fn start_recording(&self) {
        self.post("/moto-api/recorder/reset-recording").await;
        self.post("/moto-api/recorder/start-recording").await;
    }

    /// The `AssumeRole` calls recorded since [`Moto::start_recording`], oldest first. Recording
    /// goes on, so a later call sees these again plus any newer ones.
    pub async fn recorded_assume_roles(&self) -> Vec<AssumeRoleCall> {
        let url = format!("{}/moto-api/recorder/download-recording", self.endpoint());
        let resp = http::request("GET", &url, &[], "", None).await.expect("download moto's recording");
        assert_eq!(resp.status, 200, "download-recording: {}", resp.body);
        resp.body
            .lines()
            .filter(|line| !line.trim().is_empty())
            .filter_map(parse_recorded_assume_role)
            .collect()
    }

    async fn post(&self, path: &str) {
        let url = format!("{}{path}", self.endpoint());
        let resp = http::request("POST", &url, &[], "", None)
            .await
            .unwrap_or_else(|e| panic!("POST {path} to moto: {e}"));
        assert_eq!(resp.status, 200, "POST {path} to moto: {}", resp.body);
    }

    /// Polls `/moto-api/` every 50 ms; false if the child exits first, panics after the timeout.
    async fn wait_ready(&mut self) -> bool {
        let url = format!("{}/moto-api/", self.endpoint());
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(resp) = http::request("GET", &url, &[], "", None).await
                && resp.status == 200
            {
                return true;
            }
            if let Some(status) = self.child.try_wait().expect("poll moto_server") {
                eprintln!("moto_server exited early ({status}):\n{}", self.log());
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "moto_server not ready after {READY_TIMEOUT:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// moto loads STS's backend on the first AssumeRole, which takes hundreds of milliseconds
    /// on a busy machine: more than a test stack's pod wait, so a test's first request would
    /// time out behind it. One AssumeRole here pays that before any test starts its clock. It
    /// precedes every recording ([`Moto::start_recording`] starts empty), so no count sees it.
    async fn warm(&self) {
        let headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            (
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIDWARMUP/20260101/us-east-1/sts/aws4_request, \
                 SignedHeaders=host, Signature=0",
            ),
        ];
        let body = "Action=AssumeRole&Version=2011-06-15&RoleSessionName=warm-up\
                    &RoleArn=arn%3Aaws%3Aiam%3A%3A123456789012%3Arole%2Fwarm-up";
        let resp = http::request("POST", &self.endpoint(), &headers, body, None).await;
        assert!(resp.is_ok_and(|r| r.status == 200), "moto answers a warm-up AssumeRole:\n{}", self.log());
    }

    fn into_log_dir(mut self) -> TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let placeholder = tempfile::tempdir().expect("create a placeholder temp dir");
        std::mem::replace(&mut self.log_dir, placeholder)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0 to find a free port")
        .port()
}

/// One recorder line: `{headers, method, url, body, body_encoded}`; `None` unless it is an
/// `Action=AssumeRole` form POST.
fn parse_recorded_assume_role(line: &str) -> Option<AssumeRoleCall> {
    let entry: serde_json::Value = serde_json::from_str(line).expect("recorder line is JSON");
    let raw_body = entry.get("body")?.as_str()?;
    let body = if entry.get("body_encoded").and_then(|v| v.as_bool()) == Some(true) {
        String::from_utf8_lossy(&base64_decode(raw_body)).into_owned()
    } else {
        raw_body.to_string()
    };
    let form = parse_form(&body);
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if field("Action").as_deref() != Some("AssumeRole") {
        return None;
    }
    let authorization = entry
        .get("headers")?
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .and_then(|(_, v)| v.as_str())
        .unwrap_or_default();
    Some(AssumeRoleCall {
        role_arn: field("RoleArn").unwrap_or_default(),
        session_name: field("RoleSessionName").unwrap_or_default(),
        external_id: field("ExternalId"),
        duration_seconds: field("DurationSeconds").and_then(|d| d.parse().ok()),
        region: scope_region(authorization).unwrap_or_default(),
        tags: (1..=50)
            .map_while(|n| {
                Some((field(&format!("Tags.member.{n}.Key"))?, field(&format!("Tags.member.{n}.Value"))?))
            })
            .collect(),
        transitive: (1..=50).map_while(|n| field(&format!("TransitiveTagKeys.member.{n}"))).collect(),
        policy: field("Policy"),
        source_identity: field("SourceIdentity"),
    })
}

/// `AWS4-HMAC-SHA256 Credential=AK/20261122/us-west-2/sts/aws4_request, ...` → `us-west-2`.
fn scope_region(authorization: &str) -> Option<String> {
    let scope = authorization.split("Credential=").nth(1)?;
    let scope = scope.split([',', ' ']).next()?;
    scope.split('/').nth(2).map(str::to_string)
}

/// Decodes `application/x-www-form-urlencoded` into (name, value) pairs.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 3 <= bytes.len() => {
                match u8::from_str_radix(s.get(i + 1..i + 3).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Standard (padded or not) base64, as moto's recorder writes request bodies.
fn base64_decode(s: &str) -> Vec<u8> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' | b'-' => Some(62),
            b'/' | b'_' => Some(63),
            _ => None,
        }
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for v in s.bytes().filter_map(value) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}
