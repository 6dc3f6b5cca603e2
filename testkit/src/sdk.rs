//! The real AWS SDKs as pod-side clients: boto3, the AWS CLI, the Rust SDK (aws-config), the
//! node SDK (`@smithy/credential-provider-imds`, and the JavaScript SDK v3's default credential
//! chain, from the repo's `node_modules`) and the Ruby SDK (Debian's `ruby-aws-sdk-core`).
//!
//! Each one runs inside a [`PodNet`] and may find credentials through the instance-metadata
//! provider only (a scrubbed environment: no env keys, no config or credentials files, a temp
//! HOME). The metadata service is the one named by a URL, or, with `None`, the SDK's default
//! (169.254.169.254, reached through the node's DNAT as a real pod does). Each one then calls `sts get-caller-identity` against moto to prove the credentials it got
//! work. A loopback STS URL is not reachable from inside a pod, so it is relayed through the
//! pod's `host_ip` for the call (see [`PodNet::expose`]).
//!
//! These functions block (they wait for a child process or drive their own runtime on a fresh
//! thread). From a tokio test call them through `tokio::task::spawn_blocking`, or use a
//! multi-thread runtime, so the fakes the SDK talks to keep running meanwhile.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use aws_config::imds::credentials::ImdsCredentialsProvider;
use aws_sdk_sts::config::{BehaviorVersion, Credentials, ProvideCredentials, Region};
use aws_sdk_sts::error::DisplayErrorContext;

use crate::moto::venv_bin;
use crate::netns::{PodNet, Relay};

/// Upper bound on one SDK run (credential fetch plus the STS call).
pub const SDK_TIMEOUT: Duration = Duration::from_secs(60);

const BOTO3_PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/it/py/boto3_probe.py");
const NODE_PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/it/js/imds_probe.mjs");
const NODE_DEFAULT_CHAIN_PROBE: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/it/js/default_chain_probe.mjs");
const RUBY_PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/it/rb/imds_probe.rb");
const NODE_CONTAINER_PROBE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/it/js/container_probe.mjs");

/// What a pod-side SDK ended up with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SdkOutcome {
    /// The access key id the SDK obtained from the metadata service.
    pub access_key_id: String,
    /// `GetCallerIdentity`'s `Arn` when called with those credentials.
    pub caller_arn: String,
}

/// boto3 (`tests/it/py/boto3_probe.py` with the venv's python) inside `net`.
pub fn boto3(net: &PodNet, imds_url: &str, sts_url: &str) -> Result<SdkOutcome, String> {
    boto3_at(net, Some(imds_url), sts_url)
}

/// [`boto3`], with the SDK's default metadata endpoint when `imds_url` is `None`.
pub fn boto3_at(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command(&venv_bin("python").to_string_lossy());
    cmd.arg(BOTO3_PROBE).arg(&sts_url);
    let (stdout, _stderr) = run_isolated(cmd, imds_url)?;
    probe_outcome("boto3 probe", &stdout)
}

/// The node SDK (`tests/it/js/imds_probe.mjs`): `fromInstanceMetadata`, then STS
/// `GetCallerIdentity`, inside `net`.
pub fn node_sdk(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command("node");
    cmd.arg(NODE_PROBE).arg(&sts_url);
    let (stdout, _stderr) = run_isolated(cmd, imds_url)?;
    probe_outcome("node probe", &stdout)
}

/// The JavaScript SDK v3's default credential chain (`tests/it/js/default_chain_probe.mjs`): an
/// STS client given no credentials, as most apps build one, inside `net`.
pub fn node_default_chain(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command("node");
    cmd.arg(NODE_DEFAULT_CHAIN_PROBE).arg(&sts_url);
    let (stdout, _stderr) = run_isolated(cmd, imds_url)?;
    probe_outcome("default chain probe", &stdout)
}

/// The Ruby SDK (`tests/it/rb/imds_probe.rb`): `Aws::InstanceProfileCredentials`, then STS
/// `GetCallerIdentity`, inside `net`.
pub fn ruby_sdk(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command("ruby");
    cmd.arg(RUBY_PROBE).arg(&sts_url);
    let (stdout, _stderr) = run_isolated(cmd, imds_url)?;
    probe_outcome("ruby probe", &stdout)
}

/// Reads a probe's one-line JSON `{"access_key_id", "caller_arn"}`.
fn probe_outcome(probe: &str, stdout: &str) -> Result<SdkOutcome, String> {
    let json: serde_json::Value = serde_json::from_str(stdout.trim())
        .map_err(|e| format!("{probe} printed non-JSON ({e}): {stdout}"))?;
    let field = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| format!("{probe} output lacks {name}: {stdout}"))
    };
    Ok(SdkOutcome { access_key_id: field("access_key_id")?, caller_arn: field("caller_arn")? })
}

/// The AWS CLI (v1, from the venv): `aws sts get-caller-identity --endpoint-url <sts> --debug`
/// inside `net`. awscli v1 has no `configure export-credentials`, so the access key id is read
/// from the SigV4 `Credential=` scope that `--debug` logs for the request.
pub fn awscli(net: &PodNet, imds_url: &str, sts_url: &str) -> Result<SdkOutcome, String> {
    awscli_at(net, Some(imds_url), sts_url)
}

/// [`awscli`], with the default metadata endpoint when `imds_url` is `None`.
pub fn awscli_at(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command(&venv_bin("aws").to_string_lossy());
    cmd.args(["sts", "get-caller-identity", "--output", "json", "--debug"])
        .args(["--endpoint-url", &sts_url]);
    let (stdout, stderr) = run_isolated(cmd, imds_url)?;
    let json: serde_json::Value =
        serde_json::from_str(stdout.trim()).map_err(|e| format!("aws printed non-JSON ({e}): {stdout}"))?;
    let caller_arn = json
        .get("Arn")
        .and_then(|v| v.as_str())
        .ok_or_else(|| format!("aws output lacks Arn: {stdout}"))?
        .to_string();
    let access_key_id = stderr
        .split("Credential=")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .ok_or("aws --debug log shows no signed request (no Credential=)")?
        .to_string();
    Ok(SdkOutcome { access_key_id, caller_arn })
}

/// The Rust SDK: aws-config's `ImdsCredentialsProvider` (IMDSv2 token flow, no v1 fallback) on
/// a current-thread runtime inside `net`, then aws-sdk-sts `GetCallerIdentity` from the host
/// side with those credentials.
pub fn rust_sdk(net: &PodNet, imds_url: &str, sts_url: &str) -> Result<SdkOutcome, String> {
    rust_sdk_at(net, Some(imds_url), sts_url)
}

/// [`rust_sdk`], with the SDK's default endpoint (`http://169.254.169.254`) when `imds_url` is
/// `None`.
pub fn rust_sdk_at(net: &PodNet, imds_url: Option<&str>, sts_url: &str) -> Result<SdkOutcome, String> {
    let credentials = net.run_in(|| {
        block_on_here(async {
            let mut client = aws_config::imds::Client::builder();
            if let Some(url) = imds_url {
                client = client.endpoint(url).map_err(|e| format!("bad IMDS endpoint {url}: {e}"))?;
            }
            let client = client.build();
            let provider = ImdsCredentialsProvider::builder().imds_client(client).build();
            tokio::time::timeout(SDK_TIMEOUT, provider.provide_credentials())
                .await
                .map_err(|_| format!("IMDS credentials: no answer within {SDK_TIMEOUT:?}"))?
                .map_err(|e| format!("IMDS credentials: {}", DisplayErrorContext(&e)))
        })
    })?;
    let access_key_id = credentials.access_key_id().to_string();
    let caller_arn = std::thread::scope(|scope| {
        scope
            .spawn(|| block_on_here(get_caller_identity(sts_url, credentials)))
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })?;
    Ok(SdkOutcome { access_key_id, caller_arn })
}

async fn get_caller_identity(sts_url: &str, credentials: Credentials) -> Result<String, String> {
    let conf = aws_sdk_sts::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(sts_url)
        .credentials_provider(credentials)
        .build();
    let call = aws_sdk_sts::Client::from_conf(conf).get_caller_identity().send();
    let out = tokio::time::timeout(SDK_TIMEOUT, call)
        .await
        .map_err(|_| format!("GetCallerIdentity: no answer within {SDK_TIMEOUT:?}"))?
        .map_err(|e| format!("GetCallerIdentity: {}", DisplayErrorContext(&e)))?;
    out.arn().map(str::to_string).ok_or_else(|| "GetCallerIdentity returned no Arn".to_string())
}

/// Drives `fut` on a new current-thread runtime on the calling thread (which must not be a
/// runtime thread: callers are fresh threads).
fn block_on_here<T>(fut: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("build a current-thread runtime for the SDK")
        .block_on(fut)
}

/// A URL the pod can reach for `url`: loopback URLs are relayed via the pod's host IP.
fn reachable_from_pod(net: &PodNet, url: &str) -> (Option<Relay>, String) {
    let Some(rest) = url.strip_prefix("http://") else {
        return (None, url.to_string());
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let target = match authority.strip_prefix("localhost:") {
        Some(port) => port.parse().ok().map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        None => authority.parse::<SocketAddr>().ok(),
    };
    match target {
        Some(target) if target.ip().is_loopback() => {
            let relay = net.expose(target);
            let url = format!("{}{path}", relay.url());
            (Some(relay), url)
        }
        _ => (None, url.to_string()),
    }
}

/// Runs `cmd` with only the metadata service as a credential source and a bounded wait.
/// Ok((stdout, stderr)) on exit status 0, else Err with the status and the end of stderr.
fn run_isolated(cmd: Command, imds_url: Option<&str>) -> Result<(String, String), String> {
    let env: Vec<(&str, &str)> =
        imds_url.map(|url| ("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)).into_iter().collect();
    run_scrubbed(cmd, &env)
}

/// The environment of a pod set up for the container provider, as EKS Pod Identity's webhook
/// sets it up: the endpoint and the token file, nothing else (IMDS off, so it cannot be the
/// source the SDK falls back to).
pub fn container_env<'a>(full_uri: &'a str, token_file: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", full_uri),
        ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ]
}

/// boto3 in the node's network namespace (as a hostNetwork pod runs), configured only by
/// [`container_env`]; the probe also reports the provider botocore chose.
pub fn boto3_container(
    full_uri: &str,
    token_file: &str,
    sts_url: &str,
) -> Result<(SdkOutcome, String), String> {
    let mut cmd = Command::new(venv_bin("python"));
    cmd.arg(BOTO3_PROBE).arg(sts_url);
    let (stdout, _stderr) = run_scrubbed(cmd, &container_env(full_uri, token_file))?;
    let method = serde_json::from_str::<serde_json::Value>(stdout.trim())
        .ok()
        .and_then(|v| v["method"].as_str().map(str::to_string))
        .unwrap_or_default();
    Ok((probe_outcome("boto3 probe", &stdout)?, method))
}

/// The node SDK's default chain (`tests/it/js/container_probe.mjs`) in the node's network
/// namespace, configured only by [`container_env`].
pub fn node_sdk_container(full_uri: &str, token_file: &str, sts_url: &str) -> Result<SdkOutcome, String> {
    let mut cmd = Command::new("node");
    cmd.arg(NODE_CONTAINER_PROBE).arg(sts_url);
    let (stdout, _stderr) = run_scrubbed(cmd, &container_env(full_uri, token_file))?;
    probe_outcome("node container probe", &stdout)
}

/// boto3 inside `net`, configured only by [`container_env`].
pub fn boto3_container_in(
    net: &PodNet,
    full_uri: &str,
    token_file: &str,
    sts_url: &str,
) -> Result<SdkOutcome, String> {
    let (_relay, sts_url) = reachable_from_pod(net, sts_url);
    let mut cmd = net.command(&venv_bin("python").to_string_lossy());
    cmd.arg(BOTO3_PROBE).arg(&sts_url);
    let (stdout, _stderr) = run_scrubbed(cmd, &container_env(full_uri, token_file))?;
    probe_outcome("boto3 probe", &stdout)
}

/// The test this binary runs as the Rust SDK's pod ([`rust_sdk_container`]).
pub const RUST_PROBE_TEST: &str = "pod_token::endpoint::rust_sdk_container_probe";
/// Where the Rust probe finds moto (the child's environment is scrubbed of everything else).
pub const RUST_PROBE_STS: &str = "KIAM_IT_PROBE_STS";
/// What the Rust probe prints its outcome after.
const RUST_PROBE_MARK: &str = "kiam-it-probe: ";

/// The Rust SDK's default credentials chain, configured only by [`container_env`], in a child
/// process (this test binary, running [`RUST_PROBE_TEST`]), since aws-config reads the real
/// environment and tests may not change their own.
pub fn rust_sdk_container(full_uri: &str, token_file: &str, sts_url: &str) -> Result<SdkOutcome, String> {
    let exe = std::env::current_exe().map_err(|e| format!("the test binary: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.args([RUST_PROBE_TEST, "--exact", "--ignored", "--nocapture", "--test-threads", "1"]);
    let mut env = container_env(full_uri, token_file).to_vec();
    env.push((RUST_PROBE_STS, sts_url));
    let (stdout, _stderr) = run_scrubbed(cmd, &env)?;
    let line = stdout
        .lines()
        .find_map(|l| l.split_once(RUST_PROBE_MARK).map(|(_, outcome)| outcome))
        .ok_or_else(|| format!("the Rust probe printed no outcome: {stdout}"))?;
    probe_outcome("Rust probe", line)
}

/// The Rust probe's body: the default chain, then GetCallerIdentity at `sts_url`; prints the
/// outcome line [`rust_sdk_container`] reads.
pub async fn rust_probe(sts_url: &str) -> Result<(), String> {
    let conf = aws_config::defaults(BehaviorVersion::latest()).region(Region::new("us-east-1")).load().await;
    let provider = conf.credentials_provider().ok_or("the default chain has no provider")?;
    let credentials = tokio::time::timeout(SDK_TIMEOUT, provider.provide_credentials())
        .await
        .map_err(|_| "no credentials within the limit".to_string())?
        .map_err(|e| format!("credentials: {}", DisplayErrorContext(&e)))?;
    let access_key_id = credentials.access_key_id().to_string();
    let caller_arn = get_caller_identity(sts_url, credentials).await?;
    let outcome = serde_json::json!({"access_key_id": access_key_id, "caller_arn": caller_arn});
    println!("{RUST_PROBE_MARK}{outcome}");
    Ok(())
}

/// Runs `cmd` with a scrubbed environment plus `env` and a bounded wait.
/// Ok((stdout, stderr)) on exit status 0, else Err with the status and the end of stderr.
fn run_scrubbed(mut cmd: Command, env: &[(&str, &str)]) -> Result<(String, String), String> {
    let home = tempfile::Builder::new()
        .prefix("kiam-it-sdk-home-")
        .tempdir()
        .expect("create a temp HOME for the SDK");
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .current_dir(home.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.envs(env.iter().copied());
    let what = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let child = cmd.spawn().map_err(|e| format!("spawn {what}: {e}"))?;
    let pid = child.id();
    let (done, finished) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait_with_output());
    });
    let output = match finished.recv_timeout(SDK_TIMEOUT) {
        Ok(output) => output.map_err(|e| format!("wait for {what}: {e}"))?,
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child we spawned and have not reaped yet.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            return Err(format!("{what} did not finish within {SDK_TIMEOUT:?}"));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        Ok((stdout, stderr))
    } else {
        Err(format!("{what} exited with {}: {}", output.status, tail(&stderr, 25)))
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
