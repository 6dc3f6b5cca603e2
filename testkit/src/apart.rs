//! A tokio runtime on one thread of its own, for a peer that must not share the caller's task
//! queues: a real API server, or a real watch, runs in its own process and gets a core from
//! the kernel's scheduler in turn with everything else, where on the caller's runtime it would
//! wait behind whatever the caller started (the benchmarks' hundreds of client tasks).

use std::future::Future;

use tokio::runtime::{Builder, EnterGuard, Runtime};

/// The runtime; shut down without waiting when dropped, since it may be dropped on another
/// runtime's thread, where blocking is refused.
pub struct Apart(Option<Runtime>);

impl Apart {
    /// A runtime whose one worker thread is named `name`.
    pub fn new(name: &str) -> Apart {
        let runtime = Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .expect("build a runtime of its own");
        Apart(Some(runtime))
    }

    /// While the guard lives, `tokio::spawn` starts tasks on this runtime.
    pub fn enter(&self) -> Option<EnterGuard<'_>> {
        self.0.as_ref().map(Runtime::enter)
    }

    /// Runs `future` to completion on this runtime; callable from inside another runtime too (it
    /// blocks the calling thread meanwhile). Tasks it spawns stay on this runtime.
    pub fn run<F: Future + Send>(&self, future: F) -> F::Output
    where
        F::Output: Send,
    {
        let runtime = self.0.as_ref().expect("a runtime until dropped");
        // `block_on` from a thread that is not a runtime's (the caller's may be).
        std::thread::scope(|scope| {
            scope.spawn(|| runtime.block_on(future)).join().expect("the future panicked")
        })
    }
}

impl Drop for Apart {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
