//! Printing explanations: a short aligned list for people, or JSON with the same information
//! for scripts (one object for one pod, an array when every pod of the manifests is explained).

use std::fmt::Write as _;

use super::chain::Explanation;
use super::remote::{CacheView, ServerView};

/// The key column's width.
const KEY: usize = 14;

struct Lines(String);

impl Lines {
    fn row(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{key:<KEY$}{value}");
    }

    fn sub(&mut self, key: &str, value: impl std::fmt::Display) {
        let _ = writeln!(self.0, "  {key:<w$}{value}", w = KEY - 2);
    }
}

fn yes(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Seconds as `1h02m`, `14m` or `40s`.
fn span(seconds: i64) -> String {
    let s = seconds.max(0);
    match (s / 3600, (s % 3600) / 60) {
        (0, 0) => format!("{s}s"),
        (0, m) => format!("{m}m"),
        (h, m) => format!("{h}h{m:02}m"),
    }
}

fn cache(lines: &mut Lines, c: &CacheView) {
    if !c.known {
        lines.sub("cache", "no entry for this identity (no pod has used it since the server started)");
        return;
    }
    match (&c.issued, &c.expiration) {
        (Some(issued), Some(expires)) => {
            let state = if c.fresh {
                "served as they are"
            } else if c.usable {
                "renewed at the next request; served only while STS fails"
            } else {
                "expired: renewed at the next request"
            };
            let left = span(c.remaining_seconds);
            lines.sub("cached", format!("issued {issued}, expire {expires} ({left} left): {state}"));
            lines.sub("refresh", if c.refresh_due { "due now" } else { "not due yet" });
        }
        _ => lines.sub("cached", "no credentials"),
    }
    if c.fetching {
        lines.sub("sts", "a call to STS is in flight");
    } else if let Some(error) = &c.last_error {
        let retry = c.retry_at.as_deref().map(|at| format!("; retried after {at}")).unwrap_or_default();
        lines.sub(
            "sts",
            format!("last error: {error} ({} failures since the last success{retry})", c.failures),
        );
    } else {
        lines.sub("sts", "no failures since the last success");
    }
    lines.sub("server time", &c.server_time);
}

fn server(lines: &mut Lines, s: &ServerView) {
    lines.row("server", &s.address);
    if let Some(error) = &s.error {
        lines.sub("error", error);
    }
    if let Some(c) = &s.cache {
        cache(lines, c);
    }
}

fn one(lines: &mut Lines, e: &Explanation) {
    let pod_name = e.pod.as_ref().map(|p| format!("{}/{}", p.namespace, p.name));
    if pod_name.as_deref() != Some(e.query.as_str()) {
        lines.row("query", &e.query);
    }
    match (&e.pod, pod_name) {
        (Some(pod), Some(name)) => {
            lines.row("pod", name);
            lines.sub("lookup", &e.lookup.detail);
            if !e.lookup.pods.is_empty() {
                lines.sub("other pods", e.lookup.pods.join(", "));
            }
            lines.sub("phase", &pod.phase);
            lines.sub("ip", pod.ip.as_deref().unwrap_or("(none)"));
            lines.sub("node", pod.node.as_deref().unwrap_or("(none)"));
            lines.sub("hostNetwork", yes(pod.host_network));
            if pod.terminating {
                lines.sub("terminating", "yes");
            }
        }
        _ => {
            lines.row("lookup", &e.lookup.detail);
            if !e.lookup.pods.is_empty() {
                lines.sub("pods", e.lookup.pods.join(", "));
            }
        }
    }
    if let Some(role) = &e.role {
        lines.row("role", role.annotation.as_deref().unwrap_or("(no iam.amazonaws.com/role annotation)"));
        if role.source != "annotation" && role.source != "none" {
            lines.sub("from", role.source.clone());
        }
        match (&role.arn, &role.error) {
            (Some(arn), _) => lines.sub("arn", arn),
            (None, Some(error)) => lines.sub("arn", format!("(unresolved: {error})")),
            (None, None) => {}
        }
        let note = match role.requested_matches {
            Some(true) => " (the annotated role)",
            Some(false) => " (not the annotated role)",
            None => "",
        };
        if !role.requested.is_empty() {
            lines.sub("requested", format!("{}{note}", role.requested));
        }
    }
    if let Some(ns) = &e.namespace {
        lines.row("namespace", &ns.name);
        if ns.found {
            let permitted = match &ns.permitted {
                Some(expr) if ns.anchored => format!("{expr} (must match the whole ARN)"),
                Some(expr) => format!("{expr} (may match anywhere in the ARN)"),
                None => "(no iam.amazonaws.com/permitted annotation: no role is permitted)".to_string(),
            };
            lines.sub("permitted", permitted);
        }
        let matches = match ns.matches {
            Some(true) => "yes: ",
            Some(false) => "no: ",
            None => "",
        };
        lines.sub("matches", format!("{matches}{}", ns.detail));
        // Said once: a denial by this expression already carries the advice.
        if let Some(form) = ns.arn_form.as_deref().filter(|f| !ns.detail.contains(*f)) {
            lines.sub("pitfall", crate::policy::name_only_advice(form));
        }
    }
    if let Some(session) = &e.session {
        let source = match session.source {
            "annotation" => "from iam.amazonaws.com/session-name",
            _ => "from --session",
        };
        lines.row("session", format!("{} ({source})", session.name));
        lines.sub("external id", if session.external_id_set { "set (not shown)" } else { "not set" });
        if !session.tags.is_empty() {
            let tags: Vec<String> = session.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
            lines.sub("session tags", tags.join(", "));
        }
        if let Some(policy) = &session.policy {
            lines.sub("session policy", policy.clone());
        }
    }
    let node = &e.node_binding;
    if e.pod.is_some() {
        let detail = if node.enabled { format!("on: {}", node.detail) } else { node.detail.clone() };
        lines.row("node binding", detail);
    }
    if let Some(s) = &e.server {
        server(lines, s);
    }
    let verdict = &e.verdict;
    match verdict.allowed {
        true => lines.row("verdict", format!("ALLOWED: {}", verdict.reason)),
        false => lines.row("verdict", format!("DENIED ({}): {}", verdict.code, verdict.reason)),
    }
}

/// The explanations as text, separated by blank lines.
pub fn text(explanations: &[Explanation]) -> String {
    let mut lines = Lines(String::new());
    for (i, e) in explanations.iter().enumerate() {
        if i > 0 {
            lines.0.push('\n');
        }
        one(&mut lines, e);
    }
    if explanations.is_empty() {
        lines.0.push_str("no pods to explain\n");
    }
    lines.0
}

/// The explanations as JSON: the object itself when one pod was asked for, else an array.
pub fn json(explanations: &[Explanation], single: bool) -> String {
    let text = match (single, explanations) {
        (true, [one]) => serde_json::to_string_pretty(one),
        _ => serde_json::to_string_pretty(explanations),
    };
    // Only strings, numbers, booleans and options of them: serialising cannot fail.
    let mut text = text.expect("explanations serialise to JSON");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans() {
        assert_eq!(span(40), "40s");
        assert_eq!(span(14 * 60 + 5), "14m");
        assert_eq!(span(3600 + 120), "1h02m");
        assert_eq!(span(-5), "0s");
    }
}
