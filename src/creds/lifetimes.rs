//! When credentials are handed out, refreshed, and kept in spite of STS failures. Pure
//! arithmetic over an explicit `now`, so every decision is tested without waiting.
//!
//! SDKs refetch on every call when fewer than 15 minutes are left (botocore, Java v1), so
//! credentials are never served with less than that when the session length allows it. They are
//! refreshed in the background at half-life, well before that floor, so a request almost never
//! waits for STS; and when STS fails, credentials that are still valid keep being served.

use std::time::{Duration, SystemTime};

use super::Credentials;

/// The SDKs' refresh window: below this, botocore and Java v1 refetch on every call.
pub const SDK_REFRESH_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Credentials closer than this to expiry are not served even when STS is down: the caller
/// would not get to use them.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(60);

/// Session length and refresh lead (`--session-duration`, `--session-refresh`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Lifetimes {
    /// STS `DurationSeconds`.
    pub session: Duration,
    /// The least time credentials must have left to be served (kiam's meaning of the flag).
    pub refresh_lead: Duration,
}

fn remaining(creds: &Credentials, now: SystemTime) -> Duration {
    creds.expiration.duration_since(now).unwrap_or(Duration::ZERO)
}

impl Lifetimes {
    /// Credentials with no more than this left are replaced before being served: the refresh
    /// lead, raised to the SDK window when half the session allows it.
    pub fn serve_floor(&self) -> Duration {
        self.refresh_lead.max(SDK_REFRESH_WINDOW.min(self.session / 2))
    }

    /// Background refresh is due once no more than this is left: at half-life, or at the floor
    /// when that comes first.
    pub fn refresh_window(&self) -> Duration {
        (self.session / 2).max(self.serve_floor())
    }

    /// Whether `creds` may be served at `now` while STS works.
    pub fn is_fresh(&self, creds: &Credentials, now: SystemTime) -> bool {
        remaining(creds, now) > self.serve_floor()
    }

    /// Whether a background refresh of `creds` is due at `now`.
    pub fn refresh_due(&self, creds: &Credentials, now: SystemTime) -> bool {
        remaining(creds, now) <= self.refresh_window()
    }

    /// Whether `creds` may still be served when STS cannot renew them.
    pub fn is_usable(&self, creds: &Credentials, now: SystemTime) -> bool {
        remaining(creds, now) > EXPIRY_MARGIN
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    const MIN: u64 = 60;

    fn creds(left_min: u64) -> Credentials {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        Credentials {
            access_key_id: "AKIA".into(),
            secret_access_key: "s".into(),
            session_token: "t".into(),
            expiration: now + Duration::from_secs(left_min * MIN),
            issued: now,
        }
    }

    fn at() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_000_000)
    }

    fn lifetimes(session_min: u64, refresh_min: u64) -> Lifetimes {
        Lifetimes {
            session: Duration::from_secs(session_min * MIN),
            refresh_lead: Duration::from_secs(refresh_min * MIN),
        }
    }

    #[test]
    fn defaults_never_serve_under_fifteen_minutes_and_refresh_at_half_life() {
        let l = lifetimes(60, 5);
        assert_eq!(l.serve_floor(), Duration::from_secs(15 * MIN));
        assert_eq!(l.refresh_window(), Duration::from_secs(30 * MIN));
        assert!(l.is_fresh(&creds(16), at()) && !l.is_fresh(&creds(15), at()));
        assert!(!l.refresh_due(&creds(31), at()) && l.refresh_due(&creds(30), at()));
    }

    #[test]
    fn short_sessions_keep_a_usable_floor() {
        // kiam's 15m/5m: the SDK window cannot be met, so the floor is half the session.
        let l = lifetimes(15, 5);
        assert_eq!(l.serve_floor(), Duration::from_secs(15 * MIN / 2));
        assert!(l.is_fresh(&creds(15), at()));
        // A refresh lead above half-life wins over both.
        let l = lifetimes(60, 40);
        assert_eq!(l.serve_floor(), Duration::from_secs(40 * MIN));
        assert_eq!(l.refresh_window(), Duration::from_secs(40 * MIN));
        assert!(l.refresh_window() >= l.serve_floor());
    }

    #[test]
    fn stale_credentials_stay_usable_until_the_margin() {
        let l = lifetimes(60, 5);
        let c = creds(2);
        assert!(!l.is_fresh(&c, at()) && l.is_usable(&c, at()));
        assert!(!l.is_usable(&c, at() + Duration::from_secs(MIN)));
        assert!(!l.is_usable(&c, at() + Duration::from_secs(10 * MIN)));
    }
}
