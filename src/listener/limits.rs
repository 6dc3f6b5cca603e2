//! What one listener allows a client ([`Limits`]) and what it counts ([`Tally`]).

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Limits on what one client may hold or send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for a request head to arrive, counted from the connection's start or, on a
    /// kept-alive connection, from the moment the previous answer was ready.
    pub header_read_timeout: Duration,
    /// The largest request head (request line and headers), in bytes. SDKs send well under 1 KiB.
    /// (The most headers in one request is hyper's fixed 100: setting another number makes hyper
    /// fill a vector of that size for every request, a percent of a hit's cost.)
    pub max_header_bytes: usize,
    /// The most connections open at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// The most connections one source address may hold open; more are closed at once. SDKs
    /// use one or two; a pod is one address, so it cannot take its neighbours' slots.
    pub max_connections_per_source: usize,
    /// How long one write may make no progress before the connection is cut.
    pub write_timeout: Duration,
    /// How long a connection may live. Then it is closed after the request in flight (or,
    /// failing that, [`Limits::drain`] later); the client reconnects.
    pub max_connection_age: Duration,
    /// How long open connections get to finish at shutdown.
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            max_connections_per_source: 64,
            write_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(120),
            drain: Duration::from_secs(5),
        }
    }
}

impl Limits {
    /// The limits of a metrics listener: one scraper or two, so far fewer connections.
    pub fn metrics() -> Limits {
        Limits { max_connections: 64, max_connections_per_source: 8, ..Limits::default() }
    }
}

/// What a listener counts: its open connections, and the connections it cut, by reason. The
/// agent passes in the series of its registered metrics (`kiam_agent_connections_*`).
#[derive(Clone, Debug, Default)]
pub struct Tally {
    /// Connections open now.
    pub open: Gauge,
    /// Connections closed at once: their source already held its share.
    pub source_cap: Counter,
    /// Connections cut because a request head was late (or a kept-alive connection idle).
    pub head_timeout: Counter,
    /// Connections cut because a write made no progress.
    pub write_timeout: Counter,
    /// Connections closed for their age.
    pub max_age: Counter,
}

impl Tally {
    /// How many connections were cut for `reason` (`source_cap`, `head_timeout`,
    /// `write_timeout`, `max_age`).
    pub fn cut(&self, reason: &str) -> u64 {
        match reason {
            "source_cap" => self.source_cap.get(),
            "head_timeout" => self.head_timeout.get(),
            "write_timeout" => self.write_timeout.get(),
            "max_age" => self.max_age.get(),
            _ => 0,
        }
    }
}
