//! The `kiam` binary as a child process: a free loopback port for it, and its command line with
//! TLS files and a bare environment (the server's AWS identity only), logging to a file.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::certs::CertFiles;

/// The binary under test.
pub const KIAM: &str = env!("CARGO_BIN_EXE_kiam");

pub use super::moto::free_port;

/// `kiam <args> --cert --key --ca` with `tls`, killed on drop, its stderr written to `log`.
pub fn kiam(args: &[&str], tls: &CertFiles, log: &Path) -> Command {
    kiam_through(Command::new(KIAM), args, tls, log)
}

/// [`kiam`] through `cmd`, a command that ends by running the binary with the arguments it is
/// given (a shell that sets a limit first, say).
pub fn kiam_through(mut cmd: Command, args: &[&str], tls: &CertFiles, log: &Path) -> Command {
    cmd.args(args)
        .arg("--cert")
        .arg(&tls.cert)
        .arg("--key")
        .arg(&tls.key)
        .arg("--ca")
        .arg(&tls.ca)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // The server's own AWS identity, from the default chain; moto accepts any key.
        .env("AWS_ACCESS_KEY_ID", "AKIDSERVER")
        .env("AWS_SECRET_ACCESS_KEY", "server-secret-key")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"))
        .kill_on_drop(true);
    cmd
}

/// What a finished `kiam` run printed, and its exit code (-1 when killed by a signal).
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Its standard output as JSON (`-o json`).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("JSON ({e}): {}{}", self.stdout, self.stderr))
    }
}

/// `kiam explain <args>` with a bare environment, within 30 s.
pub async fn kiam_explain(args: &[&str]) -> Run {
    let mut cmd = Command::new(KIAM);
    cmd.arg("explain")
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out =
        tokio::time::timeout(Duration::from_secs(30), cmd.output()).await.expect("exits").expect("runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
