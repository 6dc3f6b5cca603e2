//! Background tasks tied to shutdown: every task the process spawns stops when its
//! cancellation token fires, so a stopped server or agent leaves nothing running behind it.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Spawns `work`, dropped (and so stopped) at `shutdown` if it has not finished by then.
pub fn spawn_until<F>(shutdown: &CancellationToken, work: F) -> JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = work => {}
        }
    })
}
