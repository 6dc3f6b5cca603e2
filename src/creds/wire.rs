//! The IMDS document in the replies of each gRPC service, and back: kiam's `Credentials`
//! (`GetPodCredentials`), the node view's `CredentialsReply` and the pod-token service's
//! `TokenCredentialsReply`. The servers and the agent map them here, once.

use super::ImdsDocument;
use crate::pb;

impl From<ImdsDocument> for pb::Credentials {
    fn from(d: ImdsDocument) -> pb::Credentials {
        pb::Credentials {
            code: d.code,
            r#type: d.kind,
            access_key_id: d.access_key_id,
            secret_access_key: d.secret_access_key,
            token: d.token,
            expiration: d.expiration,
            last_updated: d.last_updated,
        }
    }
}

impl From<pb::Credentials> for ImdsDocument {
    fn from(c: pb::Credentials) -> ImdsDocument {
        ImdsDocument {
            code: c.code,
            last_updated: c.last_updated,
            kind: c.r#type,
            access_key_id: c.access_key_id,
            secret_access_key: c.secret_access_key,
            token: c.token,
            expiration: c.expiration,
        }
    }
}

impl From<ImdsDocument> for pb::node::CredentialsReply {
    fn from(d: ImdsDocument) -> pb::node::CredentialsReply {
        pb::node::CredentialsReply {
            access_key_id: d.access_key_id,
            secret_access_key: d.secret_access_key,
            token: d.token,
            expiration: d.expiration,
            last_updated: d.last_updated,
        }
    }
}

/// The node view's reply carries no code or type: they are always these.
impl From<pb::node::CredentialsReply> for ImdsDocument {
    fn from(r: pb::node::CredentialsReply) -> ImdsDocument {
        ImdsDocument {
            code: "Success".into(),
            last_updated: r.last_updated,
            kind: "AWS-HMAC".into(),
            access_key_id: r.access_key_id,
            secret_access_key: r.secret_access_key,
            token: r.token,
            expiration: r.expiration,
        }
    }
}

/// The pod-token service's reply: the document and the role's full ARN.
pub fn token_reply(d: ImdsDocument, role_arn: String) -> pb::token::TokenCredentialsReply {
    pb::token::TokenCredentialsReply {
        access_key_id: d.access_key_id,
        secret_access_key: d.secret_access_key,
        token: d.token,
        expiration: d.expiration,
        role_arn,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn document() -> ImdsDocument {
        ImdsDocument {
            code: "Success".into(),
            last_updated: "2026-11-27T12:00:00Z".into(),
            kind: "AWS-HMAC".into(),
            access_key_id: "AKID".into(),
            secret_access_key: "secret".into(),
            token: "session".into(),
            expiration: "2026-11-27T13:00:00Z".into(),
        }
    }

    #[test]
    fn documents_survive_both_replies() {
        assert_eq!(ImdsDocument::from(pb::Credentials::from(document())), document());
        assert_eq!(ImdsDocument::from(pb::node::CredentialsReply::from(document())), document());
    }
}
