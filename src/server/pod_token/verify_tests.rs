//! Unit tests of local token verification, with keys made here and tokens signed as the API
//! server signs them.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
    RsaPublicKeyComponents,
};
use serde_json::{Value, json};

use super::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "pods.eks.amazonaws.com";
const NOW: u64 = 1_800_000_000;

fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..=chunk.len() {
            out.push(char::from(ALPHABET[(n >> (18 - 6 * i) & 63) as usize]));
        }
    }
    out
}

fn claims() -> Value {
    json!({"iss": ISSUER, "aud": [AUDIENCE], "exp": NOW + 3600, "nbf": NOW - 10, "iat": NOW - 10,
        "sub": "system:serviceaccount:team-a:default",
        "kubernetes.io": {"namespace": "team-a", "pod": {"name": "web", "uid": "uid-web"},
            "serviceaccount": {"name": "default", "uid": "sa"}}})
}

fn es256(key: &EcdsaKeyPair, claims: &Value) -> String {
    let input = format!("{}.{}", b64(br#"{"alg":"ES256","kid":"ec"}"#), b64(claims.to_string().as_bytes()));
    let sig = key.sign(&SystemRandom::new(), input.as_bytes()).expect("sign");
    format!("{input}.{}", b64(sig.as_ref()))
}

fn ec_key() -> (EcdsaKeyPair, Key) {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
    let public = Key::P256(pair.public_key().as_ref().to_vec());
    (pair, public)
}

fn check(token: &str, keys: &[Key]) -> Result<(PodClaims, u64), TokenRefusal> {
    verify(token, keys, ISSUER, AUDIENCE, NOW)
}

#[test]
fn an_es256_token_of_the_cluster_names_its_pod() {
    let (pair, key) = ec_key();
    let (claims, exp) = check(&es256(&pair, &claims()), &[key]).expect("valid");
    assert_eq!(exp, NOW + 3600);
    assert_eq!(
        claims,
        PodClaims {
            namespace: "team-a".into(),
            service_account: "default".into(),
            pod_name: "web".into(),
            pod_uid: "uid-web".into()
        }
    );
}

#[test]
fn an_rs256_token_of_the_cluster_verifies() {
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).expect("key");
    let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let key = Key::Rsa { n: public.n, e: public.e };
    let input = format!("{}.{}", b64(br#"{"alg":"RS256","kid":"r"}"#), b64(claims().to_string().as_bytes()));
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(&RSA_PKCS1_SHA256, &SystemRandom::new(), input.as_bytes(), &mut sig).expect("sign");
    let token = format!("{input}.{}", b64(&sig));
    assert!(check(&token, std::slice::from_ref(&key)).is_ok());
    // The same bytes announced as ES256 do not verify with an RSA key (no algorithm confusion).
    let (_, ec) = ec_key();
    assert!(check(&token, &[ec]).is_err());
}

#[test]
fn every_bad_token_is_refused() {
    let (pair, key) = ec_key();
    let (other, _) = ec_key();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = claims();
        edit(&mut c);
        es256(&pair, &c)
    };
    let auth =
        |r: Result<(PodClaims, u64), TokenRefusal>| matches!(r, Err(TokenRefusal::NotAuthenticated(_)));
    let keys = std::slice::from_ref(&key);
    assert!(auth(check(&es256(&other, &claims()), keys)), "another key");
    assert!(auth(check(&with(&|c| c["exp"] = json!(NOW - 3600)), keys)), "expired");
    assert!(auth(check(&with(&|c| c["nbf"] = json!(NOW + 3600)), keys)), "nbf in the future");
    assert!(auth(check(&with(&|c| c["iss"] = json!("https://evil")), keys)), "issuer");
    assert!(auth(check(&with(&|c| c["exp"] = Value::Null), keys)), "no exp");
    assert!(matches!(
        check(&with(&|c| c["aud"] = json!("vault")), keys),
        Err(TokenRefusal::WrongAudience(_))
    ));
    let unbound = with(&|c| c["kubernetes.io"]["pod"]["uid"] = json!(""));
    assert_eq!(check(&unbound, keys).err(), Some(TokenRefusal::NotPodBound));
    // A valid signature over other bytes: the payload swapped after signing.
    let token = es256(&pair, &claims());
    let mut parts: Vec<&str> = token.split('.').collect();
    let forged = b64(json!({"iss": ISSUER, "aud": AUDIENCE, "exp": NOW + 60,
        "kubernetes.io": {"namespace": "team-a", "pod": {"name": "db", "uid": "uid-db"}}})
    .to_string()
    .as_bytes());
    parts[1] = &forged;
    assert!(auth(check(&parts.join("."), keys)), "payload swapped");
    assert_eq!(check("a.b", keys).err(), Some(TokenRefusal::Malformed));
    assert!(header("not a token").is_err());
}
