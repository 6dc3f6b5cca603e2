//! Who may call what on the server: the one authorization table, as data. Every RPC of every
//! gRPC service the server serves ([`Rpc`]) × every kind of caller ([`Who`]) × node binding on or
//! off gives one [`Access`]. Each service asks [`access`] before anything else and obeys the
//! answer; `tests/it/security/access.rs` calls every cell over real mutual TLS and checks the answer is
//! what the table says.
//!
//! A caller's kind comes from its client certificate first (a certificate from another CA never
//! completes the handshake): a role other than the debug one ([`Who::UnknownRole`]), the debug
//! role with or without a node, a node URI SAN; only a certificate with none of these may prove a
//! node by token, and the token is checked only where it changes the answer
//! ([`token_matters`]).

/// Every RPC the server serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rpc {
    /// `kiam.KiamService/GetPodRole`.
    GetPodRole,
    /// `kiam.KiamService/GetPodCredentials`.
    GetPodCredentials,
    /// `kiam.KiamService/GetHealth`.
    GetHealth,
    /// `kiamrs.node.NodeView/Watch`.
    ViewWatch,
    /// `kiamrs.node.NodeView/Credentials`.
    ViewCredentials,
    /// `kiamrs.token.PodTokens/Credentials`.
    TokenCredentials,
    /// `kiamrs.debug.Debug/CacheState`.
    CacheState,
}

impl Rpc {
    /// Every RPC, in the table's order.
    pub const ALL: [Rpc; 7] = [
        Rpc::GetPodRole,
        Rpc::GetPodCredentials,
        Rpc::GetHealth,
        Rpc::ViewWatch,
        Rpc::ViewCredentials,
        Rpc::TokenCredentials,
        Rpc::CacheState,
    ];
}

/// Every kind of caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Who {
    /// A certificate with no node and no role (kiam's agent certificate), proving no node: it
    /// sent no token, or one that proves none.
    Agent,
    /// The same certificate with a token that proves the agent's node.
    TokenNode,
    /// A per-node certificate (`urn:kiam:node:<name>`).
    NodeCert,
    /// A debug certificate (`urn:kiam:role:debug`) naming no node.
    Debug,
    /// A debug certificate that also names a node.
    DebugNode,
    /// A certificate with a role kiam-rs does not know (`urn:kiam:role:<other>`).
    UnknownRole,
    /// No client certificate at all (the listener's TLS refuses these first).
    Anonymous,
}

impl Who {
    /// Every kind of caller, in the table's order.
    pub const ALL: [Who; 7] = [
        Who::Agent,
        Who::TokenNode,
        Who::NodeCert,
        Who::Debug,
        Who::DebugNode,
        Who::UnknownRole,
        Who::Anonymous,
    ];
}

/// Which pods or identities a call may concern.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Any in the cluster (node binding off, as kiam).
    Cluster,
    /// Only those of pods scheduled on the node the caller proves.
    OwnNode,
}

/// Why a call is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A debug certificate reads cache state, never pods' roles, views or credentials.
    Debug,
    /// The call needs a proven node (node binding, or a service that always binds).
    NoNode,
    /// The `Debug` service answers only debug certificates.
    NotDebug,
    /// A role kiam-rs does not know gets nothing.
    UnknownRole,
    /// No client certificate.
    Anonymous,
}

impl Refusal {
    /// The text callers see.
    pub fn text(self) -> &'static str {
        match self {
            Refusal::Debug => "a debug certificate gets no pods' roles, views or credentials",
            Refusal::NoNode => {
                "node binding is on and the client certificate names no node (urn:kiam:node:<name>)"
            }
            Refusal::NotDebug => {
                "the Debug service needs a certificate with the debug role (urn:kiam:role:debug)"
            }
            Refusal::UnknownRole => {
                "the client certificate has a role (urn:kiam:role:...) this server does not know"
            }
            Refusal::Anonymous => "no client certificate",
        }
    }
}

/// What a caller may do with one RPC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Pods' roles, views or credentials, within the scope.
    Pods(Scope),
    /// The health answer, which carries nothing about pods.
    Health,
    /// Cache state (never credentials) of identities within the scope.
    CacheState(Scope),
    /// Nothing.
    Refused(Refusal),
}

use Access::{CacheState as Cache, Health, Pods, Refused};
use Refusal::{Anonymous as Anon, Debug as Dbg, NoNode, NotDebug, UnknownRole as Unknown};
use Scope::{Cluster, OwnNode};

/// The table: for each RPC, one row per node binding (off, then on), one cell per [`Who`] in
/// [`Who::ALL`]'s order: Agent, TokenNode, NodeCert, Debug, DebugNode, UnknownRole, Anonymous.
#[rustfmt::skip]
const TABLE: [(Rpc, [[Access; 7]; 2]); 7] = [
    (Rpc::GetPodRole, [
        [Pods(Cluster),    Pods(Cluster), Pods(Cluster), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
    ]),
    (Rpc::GetPodCredentials, [
        [Pods(Cluster),    Pods(Cluster), Pods(Cluster), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
    ]),
    (Rpc::GetHealth, [
        [Health,           Health,        Health,        Health,       Health,       Health,           Refused(Anon)],
        [Health,           Health,        Health,        Health,       Health,       Health,           Refused(Anon)],
    ]),
    // The node view and tokens always bind to the proven node, whatever --agent-node-binding says.
    (Rpc::ViewWatch, [
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
    ]),
    (Rpc::ViewCredentials, [
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
    ]),
    (Rpc::TokenCredentials, [
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
        [Refused(NoNode),  Pods(OwnNode), Pods(OwnNode), Refused(Dbg), Refused(Dbg), Refused(Unknown), Refused(Anon)],
    ]),
    (Rpc::CacheState, [
        [Refused(NotDebug), Refused(NotDebug), Refused(NotDebug), Cache(Cluster),  Cache(Cluster), Refused(Unknown), Refused(Anon)],
        [Refused(NotDebug), Refused(NotDebug), Refused(NotDebug), Refused(NoNode), Cache(OwnNode), Refused(Unknown), Refused(Anon)],
    ]),
];

/// What `who` may do with `rpc`, node binding on or off.
pub fn access(rpc: Rpc, binding: bool, who: Who) -> Access {
    let row = TABLE.iter().find(|(r, _)| *r == rpc).map(|(_, rows)| &rows[usize::from(binding)]);
    let cell = Who::ALL.iter().position(|w| *w == who);
    match (row, cell) {
        (Some(row), Some(cell)) => row[cell],
        // Unreachable (the table covers every RPC and kind, as a test checks): fail closed.
        _ => Refused(Anon),
    }
}

/// Whether a token would change the answer for a certificate with no node and no role: only then
/// does the server check it (a TokenReview).
pub fn token_matters(rpc: Rpc, binding: bool) -> bool {
    access(rpc, binding, Who::TokenNode) != access(rpc, binding, Who::Agent)
}

/// The kind of caller a certificate makes, before any token: `debug` (the debug role), `node`
/// (a node URI SAN) and `unknown_role` (a `urn:kiam:role:` other than debug). An unknown role
/// wins over everything, so that no combination of URIs widens a certificate.
pub fn certificate_kind(present: bool, unknown_role: bool, debug: bool, node: bool) -> Who {
    match (present, unknown_role, debug, node) {
        (false, ..) => Who::Anonymous,
        (true, true, ..) => Who::UnknownRole,
        (true, false, true, true) => Who::DebugNode,
        (true, false, true, false) => Who::Debug,
        (true, false, false, true) => Who::NodeCert,
        (true, false, false, false) => Who::Agent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_every_rpc_once() {
        for rpc in Rpc::ALL {
            assert_eq!(TABLE.iter().filter(|(r, _)| *r == rpc).count(), 1, "{rpc:?}");
        }
    }

    /// Properties every cell must have, whatever the table is edited to.
    #[test]
    fn no_cell_gives_credentials_to_a_debug_unknown_or_anonymous_caller() {
        for rpc in Rpc::ALL {
            for binding in [false, true] {
                for who in Who::ALL {
                    let got = access(rpc, binding, who);
                    if matches!(who, Who::Debug | Who::DebugNode | Who::UnknownRole | Who::Anonymous) {
                        assert!(!matches!(got, Pods(_)), "{rpc:?} {binding} {who:?}: {got:?}");
                    }
                    if who == Who::Agent
                        && (binding || !matches!(rpc, Rpc::GetPodRole | Rpc::GetPodCredentials))
                    {
                        assert!(!matches!(got, Pods(_)), "no node proven: {rpc:?} {binding}: {got:?}");
                    }
                    if binding {
                        assert_ne!(got, Pods(Cluster), "binding on: {rpc:?} {who:?}");
                        assert_ne!(got, Cache(Cluster), "binding on: {rpc:?} {who:?}");
                    }
                    if matches!(got, Cache(_)) {
                        assert!(rpc == Rpc::CacheState && matches!(who, Who::Debug | Who::DebugNode));
                    }
                }
            }
        }
        // The hole this table closed: a debug certificate on PodTokens.
        assert_eq!(access(Rpc::TokenCredentials, false, Who::Debug), Refused(Dbg));
        assert_eq!(access(Rpc::TokenCredentials, true, Who::DebugNode), Refused(Dbg));
    }

    #[test]
    fn tokens_are_checked_only_where_they_change_the_answer() {
        assert!(
            !token_matters(Rpc::GetPodCredentials, false),
            "binding off: kiam's behaviour, no TokenReview"
        );
        assert!(token_matters(Rpc::GetPodCredentials, true));
        assert!(token_matters(Rpc::ViewWatch, false) && token_matters(Rpc::TokenCredentials, false));
        assert!(!token_matters(Rpc::GetHealth, true) && !token_matters(Rpc::CacheState, true));
    }

    #[test]
    fn an_unknown_role_wins_over_every_other_uri() {
        assert_eq!(certificate_kind(true, true, true, true), Who::UnknownRole);
        assert_eq!(certificate_kind(true, false, true, true), Who::DebugNode);
        assert_eq!(certificate_kind(true, false, true, false), Who::Debug);
        assert_eq!(certificate_kind(true, false, false, true), Who::NodeCert);
        assert_eq!(certificate_kind(true, false, false, false), Who::Agent);
        assert_eq!(certificate_kind(false, false, true, true), Who::Anonymous);
    }
}
