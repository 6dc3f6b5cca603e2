//! Which server owns an identity: rendezvous (highest random weight) hashing over the live
//! servers' addresses. Pure and deterministic, so every server and every agent that knows the same
//! key and the same set of addresses computes the same ranking, with no coordination.
//!
//! Each server gets a weight from a hash of the identity's key and the server's IP; the highest
//! weight owns the identity and the rest follow in rank. When a server leaves, only the
//! identities it owned move (each to its own next in rank); when one joins, it takes only the
//! identities it now outweighs the owner for.
//!
//! The hash is hand-written (FNV-1a, then a SplitMix64 finaliser to spread the bits) rather than
//! `std`'s `DefaultHasher`, whose output may change between Rust releases: servers and agents
//! built at different times must agree.

use std::net::IpAddr;

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for byte in bytes {
        hash ^= u64::from(*byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// SplitMix64's finaliser: every input bit affects every output bit.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The key of an identity made of `parts` (each length-prefixed, so `["ab", "c"]` and
/// `["a", "bc"]` differ); `None` parts differ from empty ones.
pub fn key<'a>(parts: impl IntoIterator<Item = Option<&'a [u8]>>) -> u64 {
    let mut hash = FNV_OFFSET;
    for part in parts {
        match part {
            None => hash = fnv(hash, &[0]),
            Some(bytes) => {
                hash = fnv(hash, &[1]);
                hash = fnv(hash, &(bytes.len() as u64).to_le_bytes());
                hash = fnv(hash, bytes);
            }
        }
    }
    mix(hash)
}

/// The weight of `server` for `key`.
pub fn weight(key: u64, server: IpAddr) -> u64 {
    let bytes = match server {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    mix(fnv(key, &bytes))
}

/// `servers` ranked for `key`: the owner first, then who takes over if it goes, and so on.
/// Duplicates are kept once; ties (which need a hash collision) go to the lower address.
pub fn rank(key: u64, servers: &[IpAddr]) -> Vec<IpAddr> {
    let mut ranked: Vec<(u64, IpAddr)> = servers.iter().map(|s| (weight(key, *s), *s)).collect();
    ranked.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    ranked.dedup_by_key(|(_, s)| *s);
    ranked.into_iter().map(|(_, s)| s).collect()
}

/// The owner of `key` among `servers` (`None` when there are none).
pub fn owner(key: u64, servers: &[IpAddr]) -> Option<IpAddr> {
    servers.iter().copied().max_by(|a, b| weight(key, *a).cmp(&weight(key, *b)).then(b.cmp(a)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn servers(n: u8) -> Vec<IpAddr> {
        (0..n).map(|i| IpAddr::from([10, 0, 0, i + 1])).collect()
    }

    fn keys(n: u64) -> Vec<u64> {
        (0..n).map(|i| key([Some(format!("arn:aws:iam::1:role/r{i}").as_bytes()), None])).collect()
    }

    #[test]
    fn parts_are_delimited() {
        assert_ne!(key([Some(&b"ab"[..]), Some(b"c")]), key([Some(&b"a"[..]), Some(b"bc")]));
        assert_ne!(key([Some(&b""[..])]), key([None]));
        assert_eq!(key([Some(&b"x"[..]), None]), key([Some(&b"x"[..]), None]));
    }

    #[test]
    fn the_hash_is_fixed_across_builds() {
        // Agents and servers built by different compilers must agree: these values are the
        // contract (checked against an independent implementation of the same definition).
        assert_eq!(key([Some(&b"arn:aws:iam::123456789012:role/app"[..])]), 0x9309_e70f_a3f3_6997);
        assert_eq!(weight(1, IpAddr::from([127, 0, 0, 2])), 0x0fcc_3271_4be0_0481);
    }

    #[test]
    fn rank_and_owner_agree_and_ignore_order() {
        let all = servers(5);
        let mut reversed = all.clone();
        reversed.reverse();
        for k in keys(200) {
            let ranked = rank(k, &all);
            assert_eq!(ranked, rank(k, &reversed), "the order servers are listed in does not matter");
            assert_eq!(Some(ranked[0]), owner(k, &all));
            assert_eq!(ranked.len(), all.len());
        }
    }

    #[test]
    fn identities_spread_over_servers() {
        let all = servers(3);
        let mut counts = [0usize; 3];
        for k in keys(3000) {
            let o = owner(k, &all).expect("an owner");
            counts[all.iter().position(|s| *s == o).expect("one of them")] += 1;
        }
        for c in counts {
            assert!((800..1200).contains(&c), "roughly a third each: {counts:?}");
        }
    }

    #[test]
    fn only_a_leaving_servers_identities_move_and_they_go_to_the_next_in_rank() {
        let all = servers(4);
        let gone = all[2];
        let rest: Vec<IpAddr> = all.iter().copied().filter(|s| *s != gone).collect();
        let mut moved = 0;
        for k in keys(1000) {
            let before = rank(k, &all);
            let after = owner(k, &rest).expect("an owner");
            if before[0] == gone {
                moved += 1;
                assert_eq!(after, before[1], "the next in rank takes over");
            } else {
                assert_eq!(after, before[0], "an identity of a server that stays does not move");
            }
        }
        assert!(moved > 0);
    }

    #[test]
    fn a_joining_server_takes_only_what_it_now_owns() {
        let all = servers(4);
        let fewer = &all[..3];
        for k in keys(1000) {
            let (before, after) = (owner(k, fewer), owner(k, &all));
            assert!(after == before || after == Some(all[3]));
        }
    }

    #[test]
    fn no_servers_no_owner() {
        assert_eq!(owner(7, &[]), None);
        assert!(rank(7, &[]).is_empty());
    }
}
