//! Logging: text or JSON lines (`--json-log`) at `--level`, overridable with `RUST_LOG`.

use tracing_subscriber::EnvFilter;

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
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (in tests) is harmless, so its error is ignored.
    if json {
        let _ = builder.json().flatten_event(true).try_init();
    } else {
        let _ = builder.try_init();
    }
}
