//! The open-file limit. Every pod connection, every gRPC stream and every watch costs the agent
//! and the server a descriptor, and the soft `RLIMIT_NOFILE` is often 1024 where the hard one is
//! far higher (Go raises it at start-up, so kiam never hit it). Below the listeners' connection
//! caps, `accept` would fail with EMFILE instead of the caps applying.

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-file limit before and after [`raise_open_files`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// The soft limit found (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit in force now.
    pub after: Option<u64>,
}

/// Raises the soft open-file limit to the hard limit. A failure leaves the limit as it was and
/// is returned for the caller to log: it costs capacity, not correctness.
pub fn raise_open_files() -> std::io::Result<Raised> {
    let limit = getrlimit(Resource::Nofile);
    let before = limit.current;
    if limit.current == limit.maximum {
        return Ok(Raised { before, after: before });
    }
    setrlimit(Resource::Nofile, Rlimit { current: limit.maximum, maximum: limit.maximum })?;
    Ok(Raised { before, after: getrlimit(Resource::Nofile).current })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// nextest runs each test in a process of its own, so lowering this one's limit concerns
    /// no other test.
    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let hard = getrlimit(Resource::Nofile).maximum;
        setrlimit(Resource::Nofile, Rlimit { current: Some(256), maximum: hard })
            .expect("lower the soft limit");
        let raised = raise_open_files().expect("raise");
        assert_eq!(raised, Raised { before: Some(256), after: hard });
        assert_eq!(getrlimit(Resource::Nofile).current, hard);
        assert_eq!(raise_open_files().expect("again").before, hard, "idempotent");
    }
}
