//! A short memory of each pod's role annotation, so that the usual SDK sequence (list the role,
//! then fetch its credentials, every refresh) makes one server call for the role instead of two.
//!
//! It cannot hand out another pod's credentials: the server checks every credentials request
//! against the pod that has the IP *now*. A stale entry (an IP reused within the TTL) can only
//! make the agent ask for the old pod's role, which the server then refuses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

/// How long an answer is remembered.
pub const TTL: Duration = Duration::from_secs(1);
/// At most this many IPs are remembered; past it, expired entries are dropped, then all.
const CAPACITY: usize = 16_384;

/// IP → (when learned, role annotation).
#[derive(Default)]
pub struct RoleMemory {
    entries: Mutex<HashMap<IpAddr, (Instant, Option<String>)>>,
}

impl RoleMemory {
    /// The role remembered for `ip`, if learned less than [`TTL`] before `now`.
    pub fn get(&self, ip: IpAddr, now: Instant) -> Option<Option<String>> {
        let entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        entries.get(&ip).filter(|(at, _)| now.duration_since(*at) < TTL).map(|(_, role)| role.clone())
    }

    /// Remembers `role` for `ip` as of `now`.
    pub fn put(&self, ip: IpAddr, role: Option<String>, now: Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= CAPACITY {
            entries.retain(|_, (at, _)| now.duration_since(*at) < TTL);
            if entries.len() >= CAPACITY {
                entries.clear();
            }
        }
        entries.insert(ip, (now, role));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn answers_expire_after_the_ttl() {
        let memory = RoleMemory::default();
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let t0 = Instant::now();
        assert_eq!(memory.get(ip, t0), None);
        memory.put(ip, Some("app".into()), t0);
        assert_eq!(memory.get(ip, t0 + TTL / 2), Some(Some("app".into())));
        assert_eq!(memory.get(ip, t0 + TTL), None);
        memory.put(ip, None, t0);
        assert_eq!(memory.get(ip, t0), Some(None), "no role is remembered too");
    }
}
