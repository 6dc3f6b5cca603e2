//! The domain model, the ground floor of the crate: pod and namespace facts, a pod's phase,
//! the compiled `permitted` expression, ARNs (parsed once, by one parser), and the one rule for
//! which pod owns an IP ([`ip_owner`]). Plain data and
//! pure functions only: this module imports nothing with I/O, no Kubernetes, gRPC, AWS or async
//! types, so that [`crate::policy`] on top of it is pure by construction. Adapters
//! (`cluster::project`, `aws`, `agent`) convert into these types at the edges.

pub mod arn;
pub mod owner;
pub mod permitted;
pub mod pod;

pub use arn::{Arn, BaseArn, RoleArn, RoleError, listed_name};
pub use owner::{IpOwner, ip_owner};
pub use permitted::Permitted;
pub use pod::{
    ALLOWED_ROLES_ANNOTATION, EXTERNAL_ID_ANNOTATION, IRSA_ROLE_ANNOTATION, NamespaceFacts,
    PERMITTED_ANNOTATION, Phase, PodExtras, PodFacts, ROLE_ANNOTATION, SESSION_NAME_ANNOTATION,
    SESSION_POLICY_ANNOTATION, ServiceAccountFacts, Uid,
};
