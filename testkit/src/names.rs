//! A server name whose addresses the test sets: stands for the servers' headless Service, so
//! that several servers on loopback addresses are found behind one name by agents and peers.

use std::net::SocketAddr;
use std::sync::Mutex;

use kiam::client::Resolve;

/// A name whose addresses the test sets ([`Name::set`]); it resolves to them whatever the host
/// and port asked for.
#[derive(Default)]
pub struct Name(Mutex<Vec<SocketAddr>>);

impl Name {
    /// From now on the name resolves to `addrs`.
    pub fn set(&self, addrs: &[SocketAddr]) {
        *self.0.lock().expect("lock") = addrs.to_vec();
    }
}

impl Resolve for Name {
    fn resolve(
        &self,
        _: &str,
        _: u16,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Vec<SocketAddr>>> + Send + '_>>
    {
        let addrs = self.0.lock().expect("lock").clone();
        Box::pin(async move { Ok(addrs) })
    }
}
