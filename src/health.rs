//! `kiam health`: asks a server for `GetHealth` every 100 ms until it answers `ok` or the
//! timeout passes. The exit code says which (0 healthy, 1 not), for exec probes.

use std::time::Duration;

use tokio::time::Instant;

use crate::client::GrpcClient;

/// How often to retry.
const INTERVAL: Duration = Duration::from_millis(100);

/// Polls `client` until healthy or `timeout`. Returns the server's message, or the last error.
pub async fn check(client: &GrpcClient, timeout: Duration) -> Result<String, String> {
    let deadline = Instant::now() + timeout;
    loop {
        let attempt = tokio::time::timeout_at(deadline, client.get_health()).await;
        let error = match attempt {
            Ok(Ok(message)) if message == "ok" => return Ok(message),
            Ok(Ok(message)) => format!("server answered {message:?}"),
            Ok(Err(status)) => format!("{}: {}", status.code(), status.message()),
            Err(_) => "timed out".to_string(),
        };
        if Instant::now() + INTERVAL >= deadline {
            return Err(error);
        }
        tracing::debug!(%error, "server not healthy yet; retrying");
        tokio::time::sleep(INTERVAL).await;
    }
}
