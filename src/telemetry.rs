//! Logging: text or JSON lines (`--json-log`) at `--level`, overridable with `RUST_LOG`.
//!
//! Logs go to stderr through [`Stderr`], which drops what cannot be written. Writing a log line
//! must never stop the process: when stderr is a closed pipe (`kiam agent ... 2>&1 | head`),
//! tracing-subscriber reports a failed write with `eprintln!`, which panics, and a panic in the
//! task that handles SIGTERM would leave the agent's DNAT rules behind.

use std::io::{self, Write};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::MakeWriter;

use crate::cli::Level;

/// Installs the global subscriber. Logs go to stderr.
pub fn init(json: bool, level: Level) {
    let level = match level {
        Level::Debug => "debug",
        Level::Info => "info",
        Level::Warn => "warn",
        Level::Error => "error",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(Stderr);
    // A second init (in tests) is harmless, so its error is ignored.
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.try_init();
    }
}

/// Standard error that never fails: a line that cannot be written (a closed pipe, a full disk)
/// is dropped, and nothing downstream learns of it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stderr;

impl<'a> MakeWriter<'a> for Stderr {
    type Writer = Lossy<io::Stderr>;

    fn make_writer(&'a self) -> Self::Writer {
        Lossy(io::stderr())
    }
}

/// A writer that reports every write as done, whatever became of it.
#[derive(Debug)]
pub struct Lossy<W>(pub W);

impl<W: Write> Write for Lossy<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let _ = self.0.write_all(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.0.flush();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_closed_pipe_is_not_an_error() {
        let mut w = Lossy(Closed);
        assert_eq!(w.write(b"line\n").expect("never fails"), 5);
        w.write_all(b"more").expect("never fails");
        w.flush().expect("never fails");
    }
}
