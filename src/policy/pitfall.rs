//! The kiam v4 migration pitfall, detected purely. kiam v4 matches a namespace's `permitted`
//! expression against the role's full ARN, anchored at both ends, so an expression written for
//! role names (`k8s-production-.*`, the example in widely copied kiam install guides) can never
//! match and the namespace denies every role. `kiam explain`, the denial's Event and the server's
//! warning all say so with the ARN form to write instead, from [`name_only`].

use regex_automata::hybrid::dfa::DFA;
use regex_automata::{Anchored, Input};

use crate::model::BaseArn;

/// Every ARN starts with this.
const ARN_PREFIX: &[u8] = b"arn:";
/// The base written into a suggestion when the server's base ARN is not known.
const UNKNOWN_BASE: &str = "arn:aws:iam::<account>:role/";

/// `expr`, anchored as kiam v4 anchors it, can match no ARN: the ARN form to write instead.
/// `None` when it can match some ARN, when it is empty, or when that cannot be decided (an
/// expression that does not compile, or one the lazy DFA gives up on): it then says nothing
/// rather than guess.
pub fn name_only(expr: &str, base: Option<&BaseArn>) -> Option<String> {
    let expr = expr.trim();
    if expr.is_empty() || can_match_arn(expr)? {
        return None;
    }
    let body = expr.strip_prefix('^').unwrap_or(expr);
    let body = match body.strip_suffix('$') {
        Some(stripped) if !stripped.ends_with('\\') => stripped,
        _ => body,
    };
    let body = if body.contains('|') { format!("(?:{body})") } else { body.to_string() };
    let prefix = base.map_or_else(|| UNKNOWN_BASE.to_string(), |b| escape(b.as_str()));
    Some(format!("{prefix}{body}"))
}

/// Whether `^(?:expr)$` can match some text starting with `arn:`: the lazy DFA is fed `arn:`
/// and asked whether it is dead. `None` when undecidable.
fn can_match_arn(expr: &str) -> Option<bool> {
    let dfa = DFA::new(&format!("^(?:{expr})$")).ok()?;
    let mut cache = dfa.create_cache();
    let input = Input::new(ARN_PREFIX).anchored(Anchored::Yes);
    let mut state = dfa.start_state_forward(&mut cache, &input).ok()?;
    for &byte in ARN_PREFIX {
        state = dfa.next_state(&mut cache, state, byte).ok()?;
        if state.is_dead() {
            return Some(false);
        }
        if state.is_quit() || state.is_unknown() {
            return None;
        }
    }
    Some(true)
}

/// Escapes the characters of an ARN that a regular expression reads as operators (an ARN may
/// hold `+` and `.`), leaving `-` alone so that the suggestion reads as the ARN it matches.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> BaseArn {
        BaseArn::parse("arn:aws:iam::123456789012:role/").expect("base")
    }

    #[test]
    fn role_name_expressions_are_caught_with_the_arn_form() {
        let b = base();
        let table = [
            ("k8s-production-.*", "arn:aws:iam::123456789012:role/k8s-production-.*"),
            ("^k8s-production-.*$", "arn:aws:iam::123456789012:role/k8s-production-.*"),
            ("app", "arn:aws:iam::123456789012:role/app"),
            ("web|worker", "arn:aws:iam::123456789012:role/(?:web|worker)"),
            ("team/.*", "arn:aws:iam::123456789012:role/team/.*"),
            (" k8s-.* ", "arn:aws:iam::123456789012:role/k8s-.*"),
        ];
        for (expr, want) in table {
            assert_eq!(name_only(expr, Some(&b)).as_deref(), Some(want), "{expr}");
        }
        let unknown = name_only("k8s-production-.*", None);
        assert_eq!(unknown.as_deref(), Some("arn:aws:iam::<account>:role/k8s-production-.*"));
    }

    #[test]
    fn expressions_that_can_match_an_arn_are_left_alone() {
        for expr in [
            ".*",
            ".+",
            "arn:aws:iam::123456789012:role/k8s-.*",
            "arn:.*|zzz",
            "zzz|.*/app",
            "(?i)ARN:.*",
            "[a-z]+:.*",
            "",
            "  ",
            "(",
            r"\barn:.*",
        ] {
            assert_eq!(name_only(expr, Some(&base())), None, "{expr:?}");
        }
    }

    #[test]
    fn the_suggestion_matches_what_the_expression_meant() {
        let b = BaseArn::parse("arn:aws-cn:iam::123456789012:role/a.b+c/").expect("base");
        let suggestion = name_only("k8s-.*", Some(&b)).expect("caught");
        assert_eq!(suggestion, r"arn:aws-cn:iam::123456789012:role/a\.b\+c/k8s-.*");
        let anchored = regex::Regex::new(&format!("^(?:{suggestion})$")).expect("compiles");
        assert!(anchored.is_match("arn:aws-cn:iam::123456789012:role/a.b+c/k8s-web"));
        assert!(!anchored.is_match("arn:aws-cn:iam::123456789012:role/aXb+c/k8s-web"));
        let suggestion = name_only("web|worker", Some(&base())).expect("caught");
        let anchored = regex::Regex::new(&format!("^(?:{suggestion})$")).expect("compiles");
        assert!(anchored.is_match("arn:aws:iam::123456789012:role/worker"));
        assert!(!anchored.is_match("worker"));
    }
}
