//! Credentials and the identity they were issued for. `Debug` never prints a secret key, a
//! session token or an external ID, so neither can reach a log by accident.

use std::fmt;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::model::RoleArn;

/// What STS is asked for: credentials are shared by every pod with the same identity.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: RoleArn,
    pub session_name: String,
    pub external_id: Option<String>,
    /// STS session tags (`--session-tags`), sorted by key; marked transitive.
    pub tags: Vec<(String, String)>,
    /// An inline session policy (minified JSON) that narrows the role.
    pub policy: Option<String>,
    /// STS `SourceIdentity` (`--source-identity`): the pod, recorded by CloudTrail.
    pub source_identity: Option<String>,
}

impl Identity {
    /// An identity with no session tags and no session policy.
    pub fn plain(role: RoleArn, session_name: String, external_id: Option<String>) -> Identity {
        Identity { role, session_name, external_id, tags: Vec::new(), policy: None, source_identity: None }
    }

    /// The key servers (`--peers`) rank owners by ([`crate::policy::rendezvous`]): every field STS
    /// is asked with, so two identities share an owner only by chance.
    pub fn affinity_key(&self) -> u64 {
        let tags = self.encoded_tags();
        crate::policy::rendezvous::key(self.parts(&tags))
    }

    /// The first 128 bits of a SHA-256 digest of every field STS is asked with, each part
    /// delimited as in [`affinity_key`](Self::affinity_key), as (high, low): equal for equal
    /// identities, and, unlike that key, not to be matched by a pod owner choosing annotations
    /// (that is a second preimage, 2^128 work). The node view sends it, so that an agent fetches
    /// the credentials of its pods that share an identity once.
    pub fn digest(&self) -> (u64, u64) {
        let tags = self.encoded_tags();
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        for part in self.parts(&tags) {
            match part {
                None => context.update(&[0]),
                Some(bytes) => {
                    context.update(&[1]);
                    context.update(&(bytes.len() as u64).to_le_bytes());
                    context.update(bytes);
                }
            }
        }
        let digest = context.finish();
        let half = |at: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&digest.as_ref()[at..at + 8]);
            u64::from_be_bytes(bytes)
        };
        (half(0), half(8))
    }

    /// The tags, each key and value length-prefixed.
    fn encoded_tags(&self) -> Vec<u8> {
        let mut tags = Vec::new();
        for part in self.tags.iter().flat_map(|(k, v)| [k, v]) {
            tags.extend_from_slice(&(part.len() as u64).to_le_bytes());
            tags.extend_from_slice(part.as_bytes());
        }
        tags
    }

    /// The fields STS is asked with, in a fixed order (`tags` from [`Self::encoded_tags`]).
    fn parts<'a>(&'a self, tags: &'a [u8]) -> [Option<&'a [u8]>; 6] {
        [
            Some(self.role.as_str().as_bytes()),
            Some(self.session_name.as_bytes()),
            self.external_id.as_deref().map(str::as_bytes),
            Some(tags),
            self.policy.as_deref().map(str::as_bytes),
            self.source_identity.as_deref().map(str::as_bytes),
        ]
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("role", &self.role.as_str())
            .field("session_name", &self.session_name)
            .field("external_id", &self.external_id.as_ref().map(|_| "<redacted>"))
            .field("tags", &self.tags)
            .field("policy", &self.policy.is_some())
            .field("source_identity", &self.source_identity)
            .finish()
    }
}

/// Temporary credentials from STS.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
    /// When the server received them (the document's `LastUpdated`).
    pub issued: SystemTime,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &super::time::format(self.expiration))
            .finish()
    }
}

impl Credentials {
    /// The metadata-service document for these credentials.
    pub fn to_document(&self) -> ImdsDocument {
        ImdsDocument {
            code: "Success".into(),
            last_updated: super::time::format(self.issued),
            kind: "AWS-HMAC".into(),
            access_key_id: self.access_key_id.clone(),
            secret_access_key: self.secret_access_key.clone(),
            token: self.session_token.clone(),
            expiration: super::time::format(self.expiration),
        }
    }
}

/// The JSON the EC2 metadata service serves for a role, field for field (and the gRPC
/// `Credentials` message, which has the same fields).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ImdsDocument {
    pub code: String,
    pub last_updated: String,
    #[serde(rename = "Type")]
    pub kind: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub token: String,
    pub expiration: String,
}

impl fmt::Debug for ImdsDocument {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsDocument")
            .field("code", &self.code)
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    fn creds(expires_in: u64) -> Credentials {
        Credentials {
            access_key_id: "ASIAEXAMPLE".into(),
            secret_access_key: "very-secret".into(),
            session_token: "token-secret".into(),
            expiration: UNIX_EPOCH + Duration::from_secs(1000 + expires_in),
            issued: UNIX_EPOCH + Duration::from_secs(1000),
        }
    }

    #[test]
    fn debug_hides_secrets() {
        let c = creds(60);
        let text = format!("{c:?} {:?}", c.to_document());
        assert!(text.contains("ASIAEXAMPLE"));
        assert!(!text.contains("very-secret") && !text.contains("token-secret"), "{text}");
    }

    #[test]
    fn document_has_imds_field_names() {
        let json = serde_json::to_value(creds(3600).to_document()).expect("serialises");
        for key in ["Code", "LastUpdated", "Type", "AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["Expiration"], "1970-01-01T01:16:40Z");
        assert_eq!(json["Type"], "AWS-HMAC");
    }
}
