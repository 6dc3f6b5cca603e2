//! What a projected token says about itself before anyone has checked it: its `exp` and the pod
//! UID it claims. Used only to bound how long a TokenReview verdict is remembered; never to
//! decide who the caller is, nor to key a budget (a pod can write anything there).

use serde::Deserialize;

/// The unverified claims a verifier may use for bookkeeping.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Unverified {
    /// `exp`, in seconds since the epoch.
    pub expires: Option<u64>,
    /// `kubernetes.io.pod.uid`.
    pub pod_uid: Option<String>,
}

#[derive(Deserialize)]
struct Payload {
    exp: Option<u64>,
    #[serde(rename = "kubernetes.io")]
    kubernetes: Option<Kubernetes>,
}

#[derive(Deserialize)]
struct Kubernetes {
    pod: Option<Pod>,
}

#[derive(Deserialize)]
struct Pod {
    uid: Option<String>,
}

impl Unverified {
    /// Reads the payload of a compact JWS; `None` for anything else.
    pub fn read(token: &str) -> Option<Unverified> {
        let mut parts = token.split('.');
        let (_header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let payload: Payload = serde_json::from_slice(&base64url(payload)?).ok()?;
        let pod_uid = payload.kubernetes.and_then(|k| k.pod).and_then(|p| p.uid);
        Some(Unverified { expires: payload.exp, pod_uid })
    }
}

/// Decodes unpadded base64url (RFC 7515 §2).
pub(crate) fn base64url(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_exp_and_pod_uid_of_a_projected_token() {
        // {"exp":1700000000,"kubernetes.io":{"pod":{"name":"web","uid":"u-1"}}}
        let payload =
            "eyJleHAiOjE3MDAwMDAwMDAsImt1YmVybmV0ZXMuaW8iOnsicG9kIjp7Im5hbWUiOiJ3ZWIiLCJ1aWQiOiJ1LTEifX19";
        let token = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln");
        let read = Unverified::read(&token).expect("a JWT");
        assert_eq!(read, Unverified { expires: Some(1_700_000_000), pod_uid: Some("u-1".into()) });
        for bad in ["", "a.b", "a.b.c.d", "x.!!.y", "x.bm90IGpzb24.y"] {
            assert_eq!(Unverified::read(bad), None, "{bad}");
        }
    }
}
