//! IMDSv2 session tokens, minted by the agent itself rather than by the node's metadata service.
//! A token is `v1.<expiry>.<hmac>`: an HMAC-SHA256, under a key drawn at start-up, of the
//! caller's IP and the expiry. Tokens are therefore bound to the pod that asked for them, expire
//! on time, cost no memory however many are minted, and die with the process.

use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::{hmac, rand};

/// The header carrying an IMDSv2 token.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";
/// The header carrying an IMDSv2 token's TTL.
pub const TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// The label that starts every tagged message.
const LABEL: &[u8] = b"kiam-imds-token";
/// The label, the address family and its 16 octets (IPv4 as IPv4-mapped), the expiry.
const MESSAGE_LEN: usize = LABEL.len() + 1 + 16 + 8;
/// An HMAC-SHA256 tag's length in bytes.
const TAG_LEN: usize = 32;

/// The largest TTL the metadata service accepts, in seconds (6 hours).
pub const MAX_TTL_SECONDS: u64 = 21_600;

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("malformed token")]
    Malformed,
    #[error("token expired")]
    Expired,
    #[error("token was not issued to this client")]
    Invalid,
}

/// Mints and checks tokens.
pub struct Tokens {
    key: hmac::Key,
}

impl Tokens {
    /// A minter with a fresh random key.
    pub fn new() -> Result<Tokens, aws_lc_rs::error::Unspecified> {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &rand::SystemRandom::new())?;
        Ok(Tokens { key })
    }

    /// What the tag covers: a label, the address (family and octets) and the expiry, in a fixed
    /// binary layout. Built on the stack: verifying is on every credential GET's path (figure 1),
    /// and tokens die with the process, so the layout need not be stable across versions.
    fn message(ip: IpAddr, expiry: u64) -> [u8; MESSAGE_LEN] {
        let (family, octets) = match ip {
            IpAddr::V4(v4) => (4, v4.to_ipv6_mapped().octets()),
            IpAddr::V6(v6) => (6, v6.octets()),
        };
        let mut message = [0u8; MESSAGE_LEN];
        let (label, rest) = message.split_at_mut(LABEL.len());
        label.copy_from_slice(LABEL);
        let (address, time) = rest.split_at_mut(17);
        address[0] = family;
        address[1..].copy_from_slice(&octets);
        time.copy_from_slice(&expiry.to_be_bytes());
        message
    }

    /// A token for `ip`, valid for `ttl` from `now`.
    pub fn mint(&self, ip: IpAddr, ttl: Duration, now: SystemTime) -> String {
        let expiry = (now + ttl).duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        let tag = hmac::sign(&self.key, &Self::message(ip, expiry));
        format!("v1.{expiry}.{}", hex(tag.as_ref()))
    }

    /// Checks that `token` was minted for `ip` and has not expired at `now`.
    pub fn verify(&self, token: &str, ip: IpAddr, now: SystemTime) -> Result<(), TokenError> {
        self.expiry_of(token, ip, now).map(|_| ())
    }

    /// [`Tokens::verify`], answered from `last` when the token is the one that passed there
    /// before, for the same address (then only its expiry is checked); `last` then holds it.
    pub fn verify_again(
        &self,
        last: &LastToken,
        token: &str,
        ip: IpAddr,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        let mut last = last.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(passed) = last.as_ref().filter(|p| p.ip == ip && *p.token == *token) {
            let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            return if now < passed.expiry { Ok(()) } else { Err(TokenError::Expired) };
        }
        let expiry = self.expiry_of(token, ip, now)?;
        *last = Some(Passed { token: token.into(), ip, expiry });
        Ok(())
    }

    /// The token's expiry, in seconds since the epoch, once it is checked as [`Tokens::verify`]
    /// describes.
    fn expiry_of(&self, token: &str, ip: IpAddr, now: SystemTime) -> Result<u64, TokenError> {
        let mut parts = token.trim().splitn(3, '.');
        let (Some("v1"), Some(expiry), Some(tag)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(TokenError::Malformed);
        };
        // Only the canonical form minted here: digits without a sign or a leading zero, and
        // lowercase hex. `u64::from_str` and `from_str_radix` also take `+1`, `01` and `AB`,
        // which made many spellings of one token valid (found by the `token` fuzz target).
        let canonical_expiry = expiry.bytes().all(|b| b.is_ascii_digit()) && !expiry.starts_with('0');
        let canonical_tag = tag.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !canonical_expiry || !canonical_tag {
            return Err(TokenError::Malformed);
        }
        let expiry: u64 = expiry.parse().map_err(|_| TokenError::Malformed)?;
        let tag = unhex(tag).ok_or(TokenError::Malformed)?;
        hmac::verify(&self.key, &Self::message(ip, expiry), &tag).map_err(|_| TokenError::Invalid)?;
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(expiry)
    }
}

/// The last token that passed on one connection. SDKs send one token for hours, request after
/// request on a kept-alive connection, so the agent checks its MAC once per connection and then
/// compares (figure 1's hit path). A token that differs in any byte is checked in full.
#[derive(Debug, Default)]
pub struct LastToken(Mutex<Option<Passed>>);

#[derive(Debug)]
struct Passed {
    token: Box<str>,
    ip: IpAddr,
    expiry: u64,
}

/// Parses `X-aws-ec2-metadata-token-ttl-seconds`: a whole number from 1 to 21600.
pub fn parse_ttl(value: Option<&str>) -> Result<u64, &'static str> {
    let value = value.ok_or("missing X-aws-ec2-metadata-token-ttl-seconds header")?;
    match value.trim().parse::<u64>() {
        Ok(ttl) if (1..=MAX_TTL_SECONDS).contains(&ttl) => Ok(ttl),
        _ => Err("X-aws-ec2-metadata-token-ttl-seconds must be a whole number from 1 to 21600"),
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().flat_map(|b| [HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]).map(char::from).collect()
}

/// A tag's lowercase hex (already checked by the caller) as bytes, without allocating; `None`
/// unless it is exactly one HMAC-SHA256 tag long.
fn unhex(s: &str) -> Option<[u8; TAG_LEN]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * TAG_LEN {
        return None;
    }
    let nibble = |d: u8| (d as char).to_digit(16).and_then(|n| u8::try_from(n).ok());
    let mut tag = [0u8; TAG_LEN];
    for (byte, pair) in tag.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minter, two addresses, a time, and a token for the first address valid 60 s from then.
    fn minted() -> (Tokens, IpAddr, IpAddr, SystemTime, String) {
        let tokens = Tokens::new().expect("key");
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().expect("ip"), "10.0.0.2".parse().expect("ip"));
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let t = tokens.mint(a, Duration::from_secs(60), now);
        (tokens, a, b, now, t)
    }

    #[test]
    fn tokens_are_bound_to_ip_and_time() {
        let (tokens, a, b, now, t) = minted();
        assert_eq!(tokens.verify(&t, a, now), Ok(()));
        assert_eq!(tokens.verify(&t, b, now), Err(TokenError::Invalid));
        assert_eq!(tokens.verify(&t, a, now + Duration::from_secs(60)), Err(TokenError::Expired));
        let other = Tokens::new().expect("key");
        assert_eq!(other.verify(&t, a, now), Err(TokenError::Invalid));
        // Extending the expiry in the token breaks the MAC.
        let forged = t.replacen("v1.1000060.", "v1.9000060.", 1);
        assert_eq!(tokens.verify(&forged, a, now), Err(TokenError::Invalid));
        for bad in ["", "v1", "v1.x.y", "v2.1.00", "v1.5.zz"] {
            assert!(tokens.verify(bad, a, now).is_err(), "{bad}");
        }
        // Other spellings of the same expiry and tag are not the token.
        let (expiry, tag) = t.strip_prefix("v1.").and_then(|r| r.split_once('.')).expect("v1.expiry.tag");
        for variant in [
            format!("v1.+{expiry}.{tag}"),
            format!("v1.0{expiry}.{tag}"),
            format!("v1.{expiry}.{}", tag.to_uppercase()),
        ] {
            assert_eq!(tokens.verify(&variant, a, now), Err(TokenError::Malformed), "{variant}");
        }
    }

    #[test]
    fn a_remembered_token_passes_only_as_verify_would() {
        let (tokens, a, b, now, t) = minted();
        let last = LastToken::default();
        assert_eq!(tokens.verify_again(&last, &t, a, now), Ok(()));
        // Remembered, with its address and expiry: the next request compares instead of a MAC.
        let remembered = |last: &LastToken| {
            let held = last.0.lock().expect("not poisoned");
            held.as_ref().map(|p| (p.token.to_string(), p.ip, p.expiry))
        };
        assert_eq!(remembered(&last), Some((t.clone(), a, 1_000_060)));
        assert_eq!(tokens.verify_again(&last, &t, a, now), Ok(()));
        // Another address, another key's token, a forged one, an expired one: refused as before.
        assert_eq!(tokens.verify_again(&last, &t, b, now), Err(TokenError::Invalid));
        assert_eq!(tokens.verify_again(&last, &t, a, now), Ok(()));
        let forged = t.replacen("v1.1000060.", "v1.9000060.", 1);
        assert_eq!(tokens.verify_again(&last, &forged, a, now), Err(TokenError::Invalid));
        let other = Tokens::new().expect("key").mint(a, Duration::from_secs(60), now);
        assert_eq!(tokens.verify_again(&last, &other, a, now), Err(TokenError::Invalid));
        assert_eq!(
            tokens.verify_again(&last, &t, a, now + Duration::from_secs(60)),
            Err(TokenError::Expired)
        );
        // A failure does not forget the token that passed, nor make it pass for another address.
        assert_eq!(tokens.verify_again(&last, &t, a, now + Duration::from_secs(59)), Ok(()));
        assert_eq!(tokens.verify_again(&last, "v1", a, now), Err(TokenError::Malformed));
        assert_eq!(tokens.verify_again(&last, &t, b, now), Err(TokenError::Invalid));
    }

    #[test]
    fn a_token_names_its_address_family() {
        let tokens = Tokens::new().expect("key");
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let v4: IpAddr = "10.0.0.1".parse().expect("ip");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        let t = tokens.mint(v4, Duration::from_secs(60), now);
        assert_eq!(tokens.verify(&t, v4, now), Ok(()));
        assert_eq!(tokens.verify(&t, mapped, now), Err(TokenError::Invalid));
        let t6 = tokens.mint(mapped, Duration::from_secs(60), now);
        assert_eq!(tokens.verify(&t6, v4, now), Err(TokenError::Invalid));
        // A tag one byte short or long is malformed, not merely wrong.
        let (head, tag) = t.rsplit_once('.').expect("v1.expiry.tag");
        assert_eq!(tokens.verify(&format!("{head}.{}", &tag[2..]), v4, now), Err(TokenError::Malformed));
        assert_eq!(tokens.verify(&format!("{head}.{tag}00"), v4, now), Err(TokenError::Malformed));
    }

    #[test]
    fn ttl_bounds() {
        assert_eq!(parse_ttl(Some("21600")), Ok(21_600));
        assert_eq!(parse_ttl(Some("1")), Ok(1));
        for bad in [None, Some("0"), Some("21601"), Some("-1"), Some("abc"), Some("")] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
    }
}
